"""Model surgery shared by passes and users: `tensors` (read and replace parameters), `widen`
(function-preserving wider copies), `deepen` (exact identity expansion to a deeper topology)."""
