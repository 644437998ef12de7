"""Graph analysis, in pipeline order: `capture` (fx graph + shapes) → `axes` and `rules` (what
each op links) → `unionfind` → `spaces` (which axes share one transform) → `transforms`
(derived spaces composed from their parts) → `oracle` (the permutation check) → `stages`
(units of depth). `analyse.trace` runs capture and spaces in one call."""
