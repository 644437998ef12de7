"""The outputs of one merge, for a person and for a program: the merged module folder, ONNX,
the match graph, pictures, `report.md` (readable on GitHub) and `result.json`.

- :func:`write_outputs` writes everything into a folder and checks what it wrote (the saved
  module reloads and computes the same outputs; ONNX agrees with torch in onnxruntime).
- :func:`write_report` writes `report.md`, its pictures and `result.json` alone.

`graphmerge merge` writes into a temporary folder that becomes OUT/ when every file is there
(:func:`graphmerge.io.atomic.atomic_folder`); `graphmerge demo` writes the same files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphmerge.io.atomic import write_text_atomic
from graphmerge.io.folder import WEIGHTS_FILE, load_module, save_module
from graphmerge.io.match_graph import write_match_graph
from graphmerge.io.onnx import export_onnx
from graphmerge.io.plots import plot_alignment, plot_match_graph, plot_spaces
from graphmerge.match.coverage import share
from graphmerge.merge import MergeResult

__all__ = ["write_outputs", "Outputs", "write_report", "versions"]

log = logging.getLogger(__name__)

LOAD_CALL = 'graphmerge.load_module("merged")'


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a merge depends on."""
    out = {"python": platform.python_version()}
    for name in ("graphmerge", "torch", "numpy", "onnx", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_outputs(folder: str | os.PathLike[str], result: MergeResult, example_inputs: Any,
                  *, title: str, onnx: bool = True, report: bool = True,
                  config: Mapping[str, Any] | None = None,
                  models: Sequence[Mapping[str, Any]] = (),
                  scores: Sequence[Mapping[str, Any]] = (),
                  checks: Mapping[str, Any] | None = None,
                  timings: Mapping[str, float] | None = None) -> "Outputs":
    """Write the merged module and everything about it into the existing `folder`.

    Files: `merged/` (GraphModule code + `model.safetensors`; `graphmerge.load_module`
    rebuilds it), `merged.onnx` (with `onnx`; checked in onnxruntime), `match_graph.json` and
    `.graphml`, and with `report`: `report.md`, its PNGs and `result.json` (see
    :func:`write_report`; `result.json` is written either way).

    Args:
        folder: an existing folder (a temporary one, for an atomic OUT/).
        result: what `graphmerge.merge` returned.
        example_inputs: a tensor or tuple of tensors for the checks and the ONNX export.
        title, config, models, scores, checks, timings: passed on to :func:`write_report`.

    Returns:
        the paths written and the checks (name -> value), as an `Outputs`.
    """
    folder = Path(folder)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    checks = dict(checks or {})
    timings = dict(timings or {})
    t0 = time.perf_counter()
    written = [save_module(result.module, folder / "merged", overwrite=True)]
    with torch.no_grad():
        expected = result.module(*inputs)
        reloaded = load_module(folder / "merged")(  # saved from the CPU, loaded there
            *(x.cpu() if isinstance(x, torch.Tensor) else x for x in inputs))
    checks["merged/ reloads with the same outputs"] = _max_diff(expected, reloaded)
    timings["save merged/"] = time.perf_counter() - t0
    if onnx:
        t0 = time.perf_counter()
        exported = export_onnx(result.module, inputs, folder / "merged.onnx")
        written.append(exported.path)
        checks["ONNX (onnxruntime) agrees with torch"] = exported.max_abs_diff
        timings["ONNX export"] = time.perf_counter() - t0
    for name in ("match_graph.json", "match_graph.graphml"):
        written.append(write_match_graph(result.match_graph, folder / name))
    written += write_report(folder, result, title=title, config=config, models=models,
                            scores=scores, checks=checks, timings=timings, markdown=report)
    return Outputs(written, checks)


@dataclass
class Outputs:
    """What `write_outputs` wrote, and the checks it ran on it."""

    paths: list[Path]
    checks: dict[str, Any]


def _max_diff(a: Any, b: Any) -> float:
    xs = a if isinstance(a, (tuple, list)) else (a,)
    ys = b if isinstance(b, (tuple, list)) else (b,)
    return max(float((x.cpu() - y.cpu()).abs().max()) for x, y in zip(xs, ys))


def write_report(folder: str | os.PathLike[str], result: MergeResult, *, title: str,
                 config: Mapping[str, Any] | None = None,
                 models: Sequence[Mapping[str, Any]] = (),
                 scores: Sequence[Mapping[str, Any]] = (),
                 checks: Mapping[str, Any] | None = None,
                 timings: Mapping[str, float] | None = None,
                 markdown: bool = True) -> list[Path]:
    """`report.md` with its pictures, and `result.json`, in `folder`.

    Pictures: `alignment.png` (CKA heat-maps of every stage whose depths differ, with the chosen
    placement; omitted when depths are equal), `spaces.png` (per merged space: correlations of
    the merged units, each model's width and the merged width), `match_graph.png`.

    Args:
        folder: where to write (must exist).
        result: the merge.
        title: the report's heading.
        config: what produced the merge (stored in `result.json`).
        models: one row per input model (e.g. name, source, parameters), in model order.
        scores: rows of an accuracy table: the first value names the row, the other values are
            fractions in [0, 1] (shown as percentages) or None.
        checks: name -> value (a float is a max abs difference; True/False passed/failed).
        timings: extra name -> seconds, listed after the merge's own passes.
        markdown: write `report.md` and its pictures (else `result.json` alone).
    """
    folder = Path(folder)
    timings = {**{f"merge: {k}": v for k, v in result.seconds.items()}, **(timings or {})}
    staged = [(a, i) for a in result.alignments for i, c in enumerate(a.cka) if c is not None]
    written = []
    if markdown:
        if staged:
            written.append(plot_alignment(
                [(a.cka[i], a.positions[i]) for a, i in staged], folder / "alignment.png",
                [f"{a.name}\nmodel {i} in model {a.reference}" for a, i in staged]))
        if result.spaces:
            written.append(plot_spaces(result.spaces, folder / "spaces.png"))
        written.append(plot_match_graph(result.match_graph, folder / "match_graph.png"))
        text = _markdown(folder, result, title, models, scores, checks or {}, timings, staged)
        written.append(write_text_atomic(folder / "report.md", text))
    data = {"title": title, "config": config or {}, "versions": versions(),
            "models": list(models), "method": result.method, "heads": result.head_mode,
            "parameters": sum(p.numel() for p in result.module.parameters()),
            "spaces": result.spaces,
            "coverage": None if result.coverage is None else result.coverage.as_dict(),
            "alignment": [{"stage": a.stage, "name": a.name, "depths": a.depths,
                           "reference": a.reference, "positions": a.positions,
                           "cka": [None if c is None else np.asarray(c).tolist()
                                   for c in a.cka],
                           "fit_errors": a.fit_errors} for a in result.alignments],
            "scores": list(scores), "checks": dict(checks or {}), "timings": timings}
    written.append(write_text_atomic(folder / "result.json",
                                     json.dumps(_finite(data), indent=1, default=str)))
    return written


def _finite(x: Any) -> Any:
    """NaN and inf become None (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def _percent(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.1%}" if isinstance(v, float) else str(v)


def _check(v: Any) -> str:
    if isinstance(v, bool):
        return "passed" if v else "FAILED"
    if isinstance(v, float):
        return f"max abs difference {v:.1e}"
    return str(v)


def _coverage(result: MergeResult) -> list[str]:
    """The coverage paragraph: what share of model 0's parameters the merge aligned, and a
    table of the reasons the others kept the identity (nothing when it was not measured)."""
    cov = result.coverage
    if cov is None:
        return []
    out = [f"Coverage: {cov.format()}.", ""]
    if cov.reasons:
        out += _table(["kept at the identity", "parameters", "share", "tensors"],
                      [[r.text.replace("|", "\\|"), f"{r.elements:,}",
                        share(r.elements / cov.total), len(r.tensors)] for r in cov.reasons])
        out.append("")
    return out


def _markdown(folder: Path, result: MergeResult, title: str,
              models: Sequence[Mapping[str, Any]], scores: Sequence[Mapping[str, Any]],
              checks: Mapping[str, Any], timings: Mapping[str, float],
              staged: list) -> str:
    n = result.match_graph.graph.get("models", len(models))
    params = sum(p.numel() for p in result.module.parameters())
    out = [f"# {title}", "",
           f"{n} models merged with **{result.method}** (heads: {result.head_mode}) into one "
           f"GraphModule of {params:,} parameters in {result.seconds.get('total', 0.0):.1f} s.",
           "", *_coverage(result)]
    if models:
        keys = list(models[0])
        out += _table(["model", *keys], [[i, *(f"{m[k]:,}" if isinstance(m[k], int) else m[k]
                                               for k in keys)] for i, m in enumerate(models)])
        out.append("")
    if scores:
        keys = list(scores[0])
        out += ["## Accuracy", ""]
        out += _table(keys, [[_percent(r.get(k)) for k in keys] for r in scores])
        out.append("")
    out += ["## Depth alignment", ""]
    if staged:
        out += ["![CKA between the units of each stage; circles: the chosen places, red boxes: "
                "the segments each shallow unit stands for](alignment.png)", ""]
    for a in result.alignments:
        if len(set(a.depths)) > 1:
            places = "; ".join(f"model {i} at {p}" for i, p in enumerate(a.positions)
                               if i != a.reference and a.depths[i])
            out.append(f"- {a.name}: depths {a.depths}; units placed in model "
                       f"{a.reference}'s: {places}")
        else:
            out.append(f"- {a.name}: depths {a.depths}, paired one to one")
    if not result.alignments:
        out.append("No units of depth: the models were paired node by node.")
    out += ["", "## Spaces", ""]
    if result.spaces:
        out += ["![Per merged space: correlations of the units merged into one, and the "
                "widths](spaces.png)", ""]
        out += _table(["space", "widths", "merged width", "matcher", "mean correlation"],
                      [[s["space"], s["widths"], s["width"], s["matcher"],
                        f"{s['mean_correlation']:.3f}"] for s in result.spaces])
    else:
        out.append("No free space: every weight was averaged.")
    out += ["", "## Match graph", "",
            "![Spaces of every model side by side; matched spaces linked, frozen ones "
            "hatched](match_graph.png)", "",
            "`match_graph.json` / `match_graph.graphml` hold every node and space of every "
            "model and the pairs merged (`graphmerge inspect --match-graph match_graph.json`).",
            ""]
    if checks:
        out += ["## Checks", ""]
        out += [f"- {k}: {_check(v)}" for k, v in checks.items()]
        out.append("")
    out += ["## Timings", ""]
    out += _table(["step", "seconds"], [[k, f"{v:.2f}"] for k, v in timings.items()])
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                   if not p.name.startswith("."))
    out += ["", "## Files", "",
            f"`merged/` is the merged module (code + `{WEIGHTS_FILE}`): `{LOAD_CALL}` rebuilds "
            f"it. Everything here is in `result.json` too.", "",
            *(f"- `{f}`" for f in sorted({*files, "report.md", "result.json"})), ""]
    return "\n".join(out)
