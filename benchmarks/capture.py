"""Capture on every architecture: front end, spaces, oracle, self-merge, ONNX, unsupported ops.

For each zoo family (ours and the community-style ones) with torch.fx and torch.export, and for
each transformers model of tests/hf_models.py (export only): the number of spaces and free
spaces, the oracle's float64 output error, the relative output error of
merge([m, permute(m)], heads="average", norms="none") on calibration data (3 × 16 samples),
the ONNX-vs-torch max abs diff of the merged module, and the ops that have no axis rule.
Norm statistics and affine values are randomised as in the tests.

Rerun:  .venv/bin/python benchmarks/capture.py          (about 2 min)
Writes: benchmarks/results/capture.md
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_capture import _like, _randomise_norms  # noqa: E402

import graphmerge as gm  # noqa: E402
from graphmerge.graph.oracle import output_error  # noqa: E402
from graphmerge.io.atomic import write_text_atomic  # noqa: E402
from graphmerge.lab.zoo.registry import COMMUNITY, FAMILIES, builtin  # noqa: E402


def row(name: str, model: torch.nn.Module, x: tuple, frontend: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = gm.trace(model, x, frontend=frontend)
            table = traced.space_table
            oracle = gm.check_spaces(model, x, frontend=frontend).max_output_error
            twin = gm.permute(model, x, seed=1, frontend=frontend)
            calib = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
            result = gm.merge([model, twin], calib, x, heads="average", norms="none",
                              frontend=frontend, progress=False)
            merge = output_error(model, result.module, calib[0])
            try:
                with tempfile.TemporaryDirectory() as d:
                    exported = gm.export_onnx(result.module, x, Path(d) / "m.onnx")
                    onnx = f"{exported.max_abs_diff:.0e} (rel {exported.max_rel_diff:.0e})"
            except gm.GraphmergeError as e:
                onnx = "fails: " + str(e).split("(")[1].split(":")[0]
        unsupported = ", ".join(sorted(table.unsupported)) or "-"
        return (f"| {name} | {traced.frontend} | {len(table)} / {len(table.free)} | "
                f"{oracle:.0e} | {merge:.1e} | {onnx} | {unsupported} |")
    except gm.GraphmergeError as e:
        return f"| {name} | {frontend} | refused: {str(e).splitlines()[0][:90]} | | | | |"


def main() -> None:
    torch.set_flush_denormal(True)
    lines = ["| model | front end | spaces / free | oracle error | self-merge error "
             "| ONNX diff (rel) | ops without a rule |", "|---|---|---|---|---|---|---|"]
    for name in [*FAMILIES, *COMMUNITY]:
        kwargs = {"depths": [1, 1, 1], "stem_stride": 2} if name == "resnet" else {}
        for frontend in ("fx", "export"):
            torch.manual_seed(0)
            model, x = builtin(name, batch=4, **kwargs)
            lines.append(row(name, _randomise_norms(model), (x,), frontend))
            print(lines[-1], flush=True)
    try:
        import hf_models
    except ImportError:
        hf_models = None
    for name, build in (hf_models.HF_MODELS.items() if hf_models else []):
        model, x = build()
        lines.append(row(f"transformers {name}", model, x, "export"))
        print(lines[-1], flush=True)
    text = ("# Capture on every architecture\n\nRerun: `.venv/bin/python benchmarks/capture.py`"
            "\n\n" + "\n".join(lines) + "\n")
    write_text_atomic(HERE / "results" / "capture.md", text)
    print(f"wrote {HERE / 'results' / 'capture.md'}")


if __name__ == "__main__":
    main()
