"""`merge`: the public entry point that runs the passes in order and returns a MergeResult."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .align import ALIGN_METHODS
from .compile import compile_merged
from .depth import StageAlignment, align_depths
from .errors import ConfigError, DataError, GraphmergeError
from .match import build_match_graph, pair_models
from .matchers import MATCHERS
from .oracle import check_spaces
from .passes import (
    MergeContext, attach_heads, collect_statistics, match_spaces, merge_parameters, select_spaces,
)
from .passes import reset_norms as reset_norm_statistics
from .stats import split_batch
from .trace import Traced, as_inputs, trace

__all__ = ["merge", "MergeResult"]

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """The merged module, the match graph, and a per-space summary."""

    module: fx.GraphModule
    match_graph: nx.Graph
    spaces: list[dict[str, Any]]
    head_mode: str
    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    alignments: list[StageAlignment] = field(default_factory=list)

    @property
    def summary(self) -> str:
        rows = [f"merged {self.match_graph.graph['models']} models with {self.method} "
                f"(heads: {self.head_mode}); {sum(p.numel() for p in self.module.parameters()):,} "
                f"parameters; " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())]
        rows.append(f"{'space':>5}  {'widths':<16} {'merged':>6}  {'matcher':<8} mean corr")
        for s in self.spaces:
            rows.append(f"{s['space']:>5}  {str(s['widths']):<16} {s['width']:>6}  "
                        f"{s['matcher']:<8} {s['mean_correlation']:.3f}")
        for a in self.alignments:
            if len(set(a.depths)) > 1:
                rows.append(f"stage {a.stage} ({a.container}): depths {a.depths}, positions in "
                            f"model {a.reference}: {a.positions}")
        return "\n".join(rows)


def _batches(calibration: Any) -> list[Any]:
    if calibration is None:
        raise DataError("no calibration data: pass a DataLoader or a list of batches")
    if isinstance(calibration, torch.Tensor):
        raise DataError("calibration must be an iterable of batches (e.g. a DataLoader or "
                        "[x[:128], x[128:256]]), not one tensor")
    if isinstance(calibration, Iterator):
        calibration = list(calibration)  # iterated twice: statistics and norm reset
    return calibration


def _check_models(models: Sequence[nn.Module]) -> None:
    if len(models) < 2:
        raise ConfigError(f"merge needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ConfigError(f"model {i} is a {type(m).__name__}, not an nn.Module")
        for name, p in m.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise DataError(f"model {i} has NaN/inf values in `{name}`; it cannot be merged")


def merge(
    models: Sequence[nn.Module],
    calibration: Iterable[Any],
    example_inputs: Any = None,
    *,
    method: str = "zip",
    alpha: float = 0.5,
    beta: float = 1.0,
    heads: str = "auto",
    width: Any = None,
    align: str = "lma",
    reset_norms: bool = True,
    check: bool = True,
    leaf_modules: Sequence[Any] = (),
    progress: bool = True,
) -> MergeResult:
    """Merge N ≥ 2 trained models of one family into one GraphModule, without training.

    Args:
        models: the models (not modified).
        calibration: batches of inputs (a DataLoader; a batch is a tensor or a tuple whose first
            items are the model inputs, labels may follow). Used for statistics and norm reset.
        example_inputs: inputs for tracing; default: the first calibration batch.
        method: "zip" (ZipIt, default), "permute" (Hungarian activation matching) or "average".
        alpha, beta: zip's correlation decay and within-model merge budget.
        width: merged width per space: None (the widest model's), a float ratio of it (0.5
            compresses the merged model), or {space id: units or ratio} per space (ids from
            `graphmerge inspect`); zip only, the other methods need equal widths.
        heads: "average" (same label space), "concat" (disjoint tasks: every model keeps its
            head, the logits are concatenated in model order) or "auto" (decided from how often
            the models' predictions agree on the calibration data).
        align: depth alignment when the models' stages differ in depth: "lma" (default),
            "sma" or "uniform"; shallower models are expanded with identity units.
        reset_norms: recompute BatchNorm statistics on the calibration data.
        check: run the permutation oracle on model 0 first (refuses models whose spaces break).

    Returns:
        MergeResult with `.module` (an eval-mode GraphModule), `.match_graph`, `.summary`.

    Example:
        >>> import torch, graphmerge as gm
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> x = torch.randn(64, 4)
        >>> b = gm.permute(a, x, seed=1)
        >>> res = gm.merge([a, b], [x], method="zip", heads="average", progress=False)
        >>> torch.allclose(res.module(x), a(x), atol=1e-5)
        True
    """
    if method not in MATCHERS:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(sorted(MATCHERS))}")
    if align not in ALIGN_METHODS:
        raise ConfigError(f"unknown align {align!r}; valid: {', '.join(ALIGN_METHODS)}")
    models = list(models)
    _check_models(models)
    batches = _batches(calibration)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if example_inputs is None:
        first = next(iter(batches), None)
        if first is None:
            raise DataError("the calibration data is empty: pass at least one batch")
        example_inputs = (first if isinstance(first, torch.Tensor)
                          else _infer_inputs(models[0], first))
    inputs = as_inputs(example_inputs)
    was_training = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        traced: list[Traced] = [trace(m, inputs, leaf_modules=leaf_modules) for m in models]
        expanded, alignments = align_depths(models, traced, batches, len(inputs), inputs,
                                            method=align, progress=progress)
        traced = [t if e is m else trace(e, inputs, leaf_modules=leaf_modules)
                  for t, e, m in zip(traced, expanded, models)]
        for t in traced:
            _ = t.space_table
        if check:
            check_spaces(expanded[0], inputs, trials=1, leaf_modules=leaf_modules)
        pair_models(traced)
        seconds["trace"] = time.perf_counter() - t0
        ctx = MergeContext(expanded, traced, batches, len(inputs), method=method, alpha=alpha,
                           beta=beta, heads=heads, width=width, progress=progress)
        t1 = time.perf_counter()
        select_spaces(ctx)
        collect_statistics(ctx)
        seconds["statistics"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        match_spaces(ctx)
        attach_heads(ctx)
        seconds["match"] = time.perf_counter() - t2
        merge_parameters(ctx)
        compile_merged(ctx, inputs)
        if reset_norms:
            t3 = time.perf_counter()
            reset_norm_statistics(ctx.module, batches, len(inputs), progress=progress)
            seconds["reset norms"] = time.perf_counter() - t3
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    graph = build_match_graph(traced, ctx.plans, method)
    spaces = [{"space": sid, "widths": p.widths, "width": p.width, "matcher": p.matcher,
               "mean_correlation": float(p.mean_correlation)} for sid, p in sorted(ctx.plans.items())]
    seconds["total"] = time.perf_counter() - t0
    return MergeResult(ctx.module, graph, spaces, ctx.head_mode, method, seconds, alignments)


def _infer_inputs(model: nn.Module, batch: Any) -> tuple[Any, ...]:
    """The model inputs at the front of a tuple batch: as many as forward's required arguments."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError) as e:
        raise GraphmergeError("cannot read the model's forward signature; pass example_inputs"
                              ) from e
    n = sum(1 for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return split_batch(batch, max(n, 1))
