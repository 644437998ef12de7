"""Matching, in pipeline order: `pairing` (models share one topology) → `cka` and `align`
(depth alignment by CKA and dynamic programming) → `statistics` (streamed feature moments) →
`matchers` (average, Hungarian permutation, elastic ZipIt) → `match_graph` (what was paired)."""
