"""Outputs, all written atomically (`atomic`): `onnx` (checked in onnxruntime), `folder`
(GraphModule code + safetensors, safe loading), `match_graph` (GraphML/JSON/DOT), `plots`, and
`report` (everything a merge writes, with report.md and result.json)."""
