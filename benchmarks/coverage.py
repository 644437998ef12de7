"""How much of every zoo family graphmerge merges: capture, spaces, coverage, self-merge, ONNX.

For each family of FAMILIES and COMMUNITY (random init, norms randomised as in the tests), on
torch.fx and torch.export, and for each transformers model of the `[hf]` extra (tests/hf_models.py,
tiny configs, random init; torch.export only, as benchmarks/capture.py builds them; rows `hf:NAME`):
whether it captures, the permutation oracle (`gm.check_spaces`) output error, #spaces / #free
spaces, the coverage a self-merge reports (`graphmerge.match.coverage`: the fraction of parameter
elements, tied tensors once, with an axis the merge aligns) and the largest reason for the rest,
the relative output error of `gm.merge([m, gm.permute(m, x, seed=1)], [x])` under default options
and under norms="none", whether the merged module exports to ONNX (its relative error against
torch), and the frozen reasons with counts.

Rerun:  .venv/bin/python benchmarks/coverage.py [--families a,b,hf:bert]   (about 7 min for all;
        `--families hf` runs every transformers model, `--families zoo` every zoo family)
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
          "| largest not aligned | self-merge error (default) | self-merge error (norms=none) "
          "| ONNX (relative error) | frozen reasons |")
COLUMNS = HEADER.count("|") - 1
KWARGS = {"resnet": {"depths": [1, 1, 1], "stem_stride": 2}}
HF = "hf:"  # prefix of the transformers models' names


def _hf_models() -> dict:
    """tests/hf_models.py's builders (as benchmarks/capture.py reads them); {} without the
    `[hf]` extra (transformers not installed)."""
    try:
        import hf_models
    except ImportError:
        return {}
    return hf_models.HF_MODELS


def _build(name: str) -> tuple[nn.Module, tuple]:
    """A family's tiny model (seeded random init, norms randomised) and its inputs as a tuple."""
    torch.manual_seed(0)
    if name.startswith(HF):
        model, x = _hf_models()[name[len(HF):]]()
    else:
        model, x = builtin(name, batch=4, **KWARGS.get(name, {}))
        x = (x,)
    return _randomise_norms(model), x


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:70]}".replace("|", "/")


def _merge_error(model: nn.Module, twin: nn.Module, x: tuple, frontend: str, **options
                 ) -> tuple[str, object]:
    try:
        # example_inputs: every item of x is an input (an attention mask too, not a label)
        result = gm.merge([model, twin], [x], x, frontend=frontend, progress=False,
                          **options)
        return f"{output_error(model, result.module, x):.1e}", result
    except gm.GraphmergeError as e:
        return f"refused ({_short(e)})", None


def _onnx(result, x: tuple) -> str:
    if result is None:
        return "-"
    try:
        with tempfile.TemporaryDirectory() as d:
            exported = gm.export_onnx(result.module, x, Path(d) / "m.onnx")
            return f"ok ({exported.max_rel_diff:.0e})"
    except gm.GraphmergeError as e:
        return f"fails ({_short(e)})"


def measure(name: str, frontend: str) -> dict:
    """Every column of one family on one front end (errors recorded, never raised)."""
    model, x = _build(name)
    row: dict = {"family": name, "frontend": frontend}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = gm.trace(model, x, frontend=frontend)
        except gm.GraphmergeError as e:
            return {**row, "captures": f"no ({_short(e)})"}
        table = traced.space_table
        cov = coverage(table, traced.graph_module)
        row.update(captures="yes", spaces=len(table), free=len(table.free),
                   coverage=cov.fraction, not_aligned=cov.top(1) or "-",
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
        empty = " |" * (COLUMNS - 3)
        return f"| {row['family']} | {row['frontend']} | {row['captures']} |{empty}"
    reasons = "; ".join(f"{why} ×{n}" for why, n in row["reasons"].most_common()) or "-"
    return (f"| {row['family']} | {row['frontend']} | yes | {row.get('oracle', '-')} | "
            f"{row['spaces']} / {row['free']} | {row['coverage']:.0%} | "
            f"{_cell(row['not_aligned'])} | {row.get('merge', '-')} | "
            f"{row.get('merge_none', '-')} | {row.get('onnx', '-')} | {_cell(reasons)} |")


def _cell(text: str) -> str:
    """Text safe in a markdown table cell."""
    return text.replace("|", "/").replace("\n", " ")


def _choose(families: str | None, zoo: list[str], hf: list[str],
            parser: argparse.ArgumentParser) -> list[str]:
    """The names `--families` asks for, in its order: a zoo family, `hf:NAME`, or the groups
    `zoo` and `hf`; every one without it."""
    if not families:
        return [*zoo, *hf]
    groups = {"zoo": zoo, **({"hf": hf} if hf else {})}  # without transformers "hf" is unknown
    chosen = [n for name in families.split(",")
              for n in groups.get(name.strip(), [name.strip()])]
    unknown = [n for n in chosen if n not in zoo and n not in hf]
    if unknown:
        extra = "" if hf else f" ({HF}NAME needs the [hf] extra: transformers)"
        parser.error(f"unknown families {', '.join(unknown)}{extra}; valid: zoo, hf, "
                     f"{', '.join([*zoo, *hf])}")
    return list(dict.fromkeys(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help=f"comma-separated names: zoo families, {HF}NAME for "
                        "a transformers model, or the groups zoo and hf (default: every one)")
    args = parser.parse_args()
    zoo, hf = [*FAMILIES, *COMMUNITY], [HF + n for n in _hf_models()]
    chosen = _choose(args.families, zoo, hf, parser)
    torch.set_flush_denormal(True)
    lines = [HEADER, "|" + "---|" * COLUMNS]
    print("\n".join(lines), flush=True)
    for name in chosen:
        for frontend in ("export",) if name.startswith(HF) else ("fx", "export"):
            lines.append(render(measure(name, frontend)))
            print(lines[-1], flush=True)
    if chosen == [*zoo, *hf]:
        what = "every zoo family and transformers model" if hf else "every zoo family"
    else:
        what = ", ".join(chosen)
    note = "" if hf else ("\n\ntransformers is not installed: no `hf:` rows (the `[hf]` "
                          "extra adds them).")
    text = (f"# Coverage of {what}\n\nRerun: `{rerun_command(__file__)}`\n\n"
            "coverage: what a self-merge reports (`graphmerge.match.coverage`: parameter "
            "elements, tied once, with an axis the merge aligns); largest not aligned: the "
            "reason that keeps the most of the other parameters at the identity, with its share "
            "of all parameters. `hf:` rows: the transformers models of tests/hf_models.py "
            f"(tiny configs, random init), torch.export only.{note}\n\n"
            + "\n".join(lines) + "\n")
    write_text_atomic(HERE / "results" / "coverage.md", text)
    print(f"wrote {HERE / 'results' / 'coverage.md'}")


if __name__ == "__main__":
    main()
