"""How much of every zoo family graphmerge merges: capture, spaces, coverage, self-merge, ONNX.

For each family of FAMILIES and COMMUNITY (random init, norms randomised as in the tests), on
torch.fx and torch.export: whether it captures, the permutation oracle (`gm.check_spaces`) output
error, #spaces / #free spaces, the coverage a self-merge reports (`graphmerge.match.coverage`:
the fraction of parameter elements, tied tensors once, with an axis the merge aligns), the
relative output error of `gm.merge([m, gm.permute(m, x, seed=1)], [x])` under default options
and under norms="none", whether the merged module exports to ONNX, and the frozen reasons with counts.

Rerun:  .venv/bin/python benchmarks/coverage.py [--families a,b]      (about 3 min for all)
Writes: benchmarks/results/coverage.md (the families run)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _protocol import rerun_command  # noqa: E402
from test_capture import _randomise_norms  # noqa: E402

import graphmerge as gm  # noqa: E402
from graphmerge.graph.oracle import output_error  # noqa: E402
from graphmerge.io.atomic import write_text_atomic  # noqa: E402
from graphmerge.lab.zoo.registry import COMMUNITY, FAMILIES, builtin  # noqa: E402
from graphmerge.match.coverage import coverage  # noqa: E402

HEADER = ("| family | front end | captures | oracle error | spaces / free | coverage "
          "| self-merge error (default) | self-merge error (norms=none) | ONNX | frozen reasons |")
KWARGS = {"resnet": {"depths": [1, 1, 1], "stem_stride": 2}}


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:70]}".replace("|", "/")


def _merge_error(model: nn.Module, twin: nn.Module, x: tuple, frontend: str, **options
                 ) -> tuple[str, object]:
    try:
        result = gm.merge([model, twin], [x], frontend=frontend, progress=False, **options)
        return f"{output_error(model, result.module, x):.1e}", result
    except gm.GraphmergeError as e:
        return f"refused ({_short(e)})", None


def _onnx(result, x: tuple) -> str:
    if result is None:
        return "-"
    try:
        with tempfile.TemporaryDirectory() as d:
            return f"ok ({gm.export_onnx(result.module, x, Path(d) / 'm.onnx').max_abs_diff:.0e})"
    except gm.GraphmergeError as e:
        return f"fails ({_short(e)})"


def measure(name: str, frontend: str) -> dict:
    """Every column of one family on one front end (errors recorded, never raised)."""
    torch.manual_seed(0)
    model, x = builtin(name, batch=4, **KWARGS.get(name, {}))
    model, x = _randomise_norms(model), (x,)
    row: dict = {"family": name, "frontend": frontend}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = gm.trace(model, x, frontend=frontend)
        except gm.GraphmergeError as e:
            return {**row, "captures": f"no ({_short(e)})"}
        table = traced.space_table
        row.update(captures="yes", spaces=len(table), free=len(table.free),
                   coverage=coverage(table, traced.graph_module).fraction,
                   reasons=Counter(re.sub(r" ?\(node `[^`]*`\)", "", s.why)
                                   for s in table if s.frozen))
        try:
            row["oracle"] = f"{gm.check_spaces(model, x, frontend=frontend).max_output_error:.0e}"
        except gm.GraphmergeError as e:
            row["oracle"] = f"refused ({_short(e)})"
        try:
            twin = gm.permute(model, x, seed=1, frontend=frontend)
        except gm.GraphmergeError as e:
            return {**row, "merge": f"permute refused ({_short(e)})"}
        row["merge"], result = _merge_error(model, twin, x, frontend)
        row["merge_none"], _ = _merge_error(model, twin, x, frontend, norms="none")
        row["onnx"] = _onnx(result, x)
    return row


def render(row: dict) -> str:
    if row["captures"] != "yes":
        return f"| {row['family']} | {row['frontend']} | {row['captures']} |" + " |" * 7
    reasons = "; ".join(f"{why} ×{n}" for why, n in row["reasons"].most_common()) or "-"
    return (f"| {row['family']} | {row['frontend']} | yes | {row.get('oracle', '-')} | "
            f"{row['spaces']} / {row['free']} | {row['coverage']:.0%} | {row.get('merge', '-')} | "
            f"{row.get('merge_none', '-')} | {row.get('onnx', '-')} | {reasons.replace('|', '/')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated family names (default: every one)")
    args = parser.parse_args()
    names = [*FAMILIES, *COMMUNITY]
    chosen = names if not args.families else args.families.split(",")
    torch.set_flush_denormal(True)
    lines = [HEADER, "|" + "---|" * 10]
    print("\n".join(lines), flush=True)
    for name in chosen:
        for frontend in ("fx", "export"):
            lines.append(render(measure(name, frontend)))
            print(lines[-1], flush=True)
    what = "every zoo family" if chosen == names else "zoo families " + ", ".join(chosen)
    text = (f"# Coverage of {what}\n\nRerun: `{rerun_command(__file__)}`\n\n"
            "coverage: what a self-merge reports (`graphmerge.match.coverage`: parameter "
            "elements, tied once, with an axis the merge aligns).\n\n"
            + "\n".join(lines) + "\n")
    write_text_atomic(HERE / "results" / "coverage.md", text)
    print(f"wrote {HERE / 'results' / 'coverage.md'}")


if __name__ == "__main__":
    main()
