"""`merge`: validate the options, build the context, run the pass list, return a MergeResult."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from graphmerge.calibration import Calibration
from graphmerge.config import MergeConfig
from graphmerge.errors import ConfigError, DataError
from graphmerge.graph.capture import check_materialized, eval_mode
from graphmerge.inputs import as_inputs, infer_input_count
from graphmerge.match.align import StageAlignment
from graphmerge.match.plans import SpacePlan
from graphmerge.passes import PIPELINE, MergeContext, run_passes

__all__ = ["merge", "MergeResult", "check_models"]

@dataclass
class MergeResult:
    """The merged module, the match graph, and a per-space summary.

    `spaces`: per merged space, its `widths` (per model), merged `width`, `matcher`,
    `mean_correlation` and `correlations` (per merged unit of two or more, the mean pairwise
    correlation of its members; empty for attention heads, matched as wholes)."""

    module: fx.GraphModule
    match_graph: nx.Graph
    spaces: list[dict[str, Any]]
    head_mode: str
    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    alignments: list[StageAlignment] = field(default_factory=list)
    config: MergeConfig = field(default_factory=MergeConfig)
    plans: dict[int, SpacePlan] = field(default_factory=dict)  # per space: merge matrices

    @property
    def summary(self) -> str:
        rows = [f"merged {self.match_graph.graph['models']} models with {self.method} "
                f"(heads: {self.head_mode}); {sum(p.numel() for p in self.module.parameters()):,} "
                f"parameters; {self.seconds.get('total', 0.0):.1f}s"]
        rows.append(f"{'space':>5}  {'widths':<16} {'merged':>6}  {'matcher':<8} mean corr")
        for s in self.spaces:
            rows.append(f"{s['space']:>5}  {str(s['widths']):<16} {s['width']:>6}  "
                        f"{s['matcher']:<8} {s['mean_correlation']:.3f}")
        for a in self.alignments:
            if len(set(a.depths)) > 1:
                rows.append(f"stage {a.stage} ({a.name}): depths {a.depths}, positions in "
                            f"model {a.reference}: {a.positions}")
        return "\n".join(rows)


#: tracing, shape propagation and the permutation oracle run on at most this many samples
EXAMPLE_SAMPLES = 8


def _example(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The first calibration batch cut to `EXAMPLE_SAMPLES` samples: graphs are captured and
    checked on a few samples, not on a whole batch (an input whose first dimension is not the
    batch's is kept whole)."""
    sizes = {x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0}
    if len(sizes) != 1:
        return inputs
    return tuple(x[:EXAMPLE_SAMPLES] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                 for x in inputs)


def _on_device(models: list[nn.Module], device: Any) -> list[nn.Module]:
    """The models on `device`: copies of those elsewhere (the caller's are never moved)."""
    if device is None:
        return models
    dev = torch.device(device)
    out = []
    for m in models:
        tensors = [*m.parameters(), *m.buffers()]
        here = all(t.device.type == dev.type and (dev.index is None or t.device == dev)
                   for t in tensors)
        out.append(m if here else copy.deepcopy(m).to(dev))
    return out


def check_models(models: Any) -> list[nn.Module]:
    """The models as a list: at least two nn.Modules with values (not on the meta device), all
    finite.

    Raises:
        ConfigError: not a list of models, fewer than two, or one that is not an nn.Module.
        DataError: a tensor on the meta device, or NaN/inf values (naming model and tensor).
    """
    if isinstance(models, nn.Module) or not isinstance(models, Iterable):
        raise ConfigError(f"models must be a list of nn.Modules, got "
                          f"{type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise ConfigError(f"merge needs at least 2 models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ConfigError(f"model {i} is a {type(m).__name__}, not an nn.Module")
        check_materialized(m, f"model {i}")
        for name, p in m.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise DataError(f"model {i} has NaN/inf values in `{name}`; it cannot be merged")
    return models


def merge(
    models: Sequence[nn.Module],
    calibration: Iterable[Any],
    example_inputs: Any = None,
    config: MergeConfig | Mapping[str, Any] | None = None,
    **options: Any,
) -> MergeResult:
    """Merge N ≥ 2 trained models of one family into one GraphModule, without training.

    Args:
        models: the models (not modified).
        calibration: batches of inputs (a DataLoader; a batch is a tensor or a tuple whose first
            items are the model inputs, labels may follow). Used for statistics and norms.
        example_inputs: inputs for tracing; default: the first calibration batch.
        config: a `MergeConfig` (or a mapping of its fields); `**options` override it.
        **options: the fields of `MergeConfig`, validated before any work:
            method: "zip" (ZipIt, default), "permute" (Hungarian activation matching) or
                "average".
            alpha, beta: zip's correlation decay (default 0.5) and within-model merge budget
                (default 1.0); only for method="zip".
            width: merged width per space: None (the widest model's), a float ratio of it (0.5
                compresses the merged model), or {space id: units or ratio} per space (ids from
                `graphmerge inspect`); zip only, the other methods need equal widths.
            heads: "average" (default: the merged model keeps model 0's inputs and output
                shapes; the models' outputs must have one width) or "concat" (disjoint tasks:
                every model keeps its head, the logits are concatenated in model order).
            align: depth alignment when the models' stages differ in depth: "lma" (default),
                "sma" or "uniform"; shallower models are expanded with identity units.
            norms: "repair" (default: REPAIR — where a merged unit enters a nonlinearity or
                a norm, its mean and std on the calibration data are set to the merge-weighted
                mean of its members', through BatchNorm statistics or folded into the
                producing layer; a self-merge stays exact), "reset" (BatchNorm statistics
                recomputed on the calibration data, as ZipIt! does) or "none".
            check: run the permutation oracle on model 0 first (refuses models whose spaces
                break); default True.
            frontend: how models are captured: "auto" (default: torch.fx, falling back to
                torch.export), "fx" or "export"; a GraphModule is taken as given.
            leaf_modules: module classes or qualified names to keep opaque when tracing.
            progress: progress bars on the calibration passes (samples seen); default True.
            max_batches, max_samples: read at most this many calibration batches / samples
                (default: one pass over a finite iterable; an iterable without len(), such
                as a generator or an endless stream, needs one of them).
            device: run the merge there (e.g. "cuda"); default: where the models are. The
                caller's models are copied, never moved.
            max_memory: a bound in bytes on the feature statistics (8·d² per space of d
                units summed over the models); spaces that do not fit together are measured
                in several passes over the calibration data, with the same result. It also
                bounds the activations REPAIR holds for its single pass (default 2 GiB; past
                it, one pass per level).
            partial: None (default: merge everything) or a cut — a node name, a space id
                (after the last node carrying it) or a fraction of depth (of the weighted
                layers): the graph up to the cut is merged, after it every model keeps its
                own layers, fed through its unmerge matrices; outputs averaged or, with
                heads="concat", concatenated. More parameters, higher accuracy (ZipIt!'s
                partial zipping).
            attention: "heads" (default: attention heads are matched as wholes, each merged
                head's dims by its own transform) or "frozen" (heads and head dims keep the
                identity: head h of every model is merged with head h, dim by dim; the rest
                is merged as usual; a baseline that ignores the heads).

    Returns:
        MergeResult with `.module` (an eval-mode GraphModule), `.match_graph`, `.summary`.

    Raises:
        ConfigError: an unknown option or a bad value (before any work).

    Example:
        >>> import torch, graphmerge as gm
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> x = torch.randn(64, 4)
        >>> b = gm.permute(a, x, seed=1)
        >>> res = gm.merge([a, b], [x], method="zip", heads="average", progress=False)
        >>> torch.allclose(res.module(x), a(x), atol=1e-5)
        True
    """
    cfg = MergeConfig.of(config, **options)
    models = check_models(models)
    t0 = time.perf_counter()
    n_inputs = (len(as_inputs(example_inputs)) if example_inputs is not None
                else lambda batch: infer_input_count(models[0], batch))
    data = Calibration(calibration, n_inputs, max_batches=cfg.max_batches,
                       max_samples=cfg.max_samples, device=cfg.device)
    if example_inputs is None:
        example_inputs = _example(data.first())
    elif cfg.device is not None:
        example_inputs = tuple(x.to(cfg.device) if isinstance(x, torch.Tensor) else x
                               for x in as_inputs(example_inputs))
    models = _on_device(models, cfg.device)
    ctx = MergeContext(models, data, as_inputs(example_inputs), cfg)
    with ExitStack() as stack:  # every module's own train/eval flag is restored afterwards
        for m in models:
            stack.enter_context(eval_mode(m))
        run_passes(ctx, PIPELINE)
    spaces = [{"space": sid, "widths": p.widths, "width": p.width, "matcher": p.matcher,
               "mean_correlation": float(p.mean_correlation), "correlations": p.correlations}
              for sid, p in sorted(ctx.plans.items())]
    ctx.seconds["total"] = time.perf_counter() - t0
    return MergeResult(ctx.module, ctx.match_graph, spaces, ctx.head_mode, cfg.method,
                       ctx.seconds, ctx.alignments, cfg, ctx.plans)
