"""Model surgery shared by passes and users: `widen` (function-preserving wider copies),
`splice` (copies of a unit spliced into another graph of the family), `deepen` (exact identity
expansion to a deeper topology), `partial` (a merged trunk with each model's own tail),
`repair` (REPAIR's points, targets and corrections) and `norms` (the norm corrections)."""
