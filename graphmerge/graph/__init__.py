"""Graph analysis, in pipeline order: `capture` (fx graph + shapes) → `tensors` (parameters
and buffers by name) → `axes` and `rules` (what each op links) → `unionfind` → `spaces` (which
axes share one transform) → `transforms` (derived spaces composed from their parts) → `literals`
(shape constants tied to the spaces they size) → `oracle` (the permutation check) → `kinds`
(what an op is: the one op vocabulary) → `stages` (units of depth); `lockstep` runs several
graphs node by node together. `analyse.trace` runs capture and spaces in one call."""
