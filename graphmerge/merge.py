"""`merge`: validate the options, build the context, run the pass list, return a MergeResult."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, TypedDict

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from graphmerge.calibration import Calibration
from graphmerge.config import MergeConfig, option_help
from graphmerge.errors import ConfigError, DataError
from graphmerge.graph.capture import check_materialized, eval_mode
from graphmerge.inputs import as_inputs, infer_input_count
from graphmerge.graph.rotatable import Rotatable
from graphmerge.match.align import StageAlignment
from graphmerge.match.coverage import Coverage
from graphmerge.match.plans import SpacePlan
from graphmerge.passes import PIPELINE, MergeContext, run_passes
from graphmerge.surgery.refit import Refit

__all__ = ["merge", "MergeResult", "SpaceSummary", "check_models"]


class SpaceSummary(TypedDict):
    """One merged space in `MergeResult.spaces`."""

    space: int                 # the space id (`graphmerge inspect` lists them)
    widths: list[int]          # per model
    width: int                 # merged
    matcher: str               # the matcher's name, or "concat" for concatenated heads
    mean_correlation: float    # over the merged groups of two or more units (nan: none)
    correlations: list[float]  # per such group, its members' mean pairwise correlation;
                               # empty for attention heads (matched as wholes)


@dataclass
class MergeResult:
    """The merged module, the match graph, a per-space summary (`spaces`, one
    `SpaceSummary` per merged space), `coverage`: how many of model 0's parameters the
    merge aligned, and why the others kept the identity (`graphmerge.match.coverage`), and,
    with rotate=True, `rotations`: per merged space whether it was rotated onto model 0's
    basis, and else why not (`graphmerge.graph.rotatable.Rotatable`), and, with refit=True,
    `refit`: the layers refitted, their calibration errors before and after, and those kept
    as merged (`graphmerge.surgery.refit.Refit`)."""

    module: fx.GraphModule
    match_graph: nx.Graph
    spaces: list[SpaceSummary]
    head_mode: str
    method: str
    seconds: dict[str, float] = field(default_factory=dict)
    alignments: list[StageAlignment] = field(default_factory=list)
    config: MergeConfig = field(default_factory=MergeConfig)
    plans: dict[int, SpacePlan] = field(default_factory=dict)  # per space: merge matrices
    coverage: Coverage | None = None  # parameters aligned (None: not measured)
    rotations: dict[int, Rotatable] = field(default_factory=dict)  # rotate=True: per space
    refit: Refit | None = None  # the layers refitted (refit=True) and their errors

    @property
    def summary(self) -> str:
        rows = [f"merged {self.match_graph.graph['models']} models with {self.method} "
                f"(heads: {self.head_mode}); {sum(p.numel() for p in self.module.parameters()):,} "
                f"parameters; {self.seconds.get('total', 0.0):.1f}s"]
        if self.coverage is not None:
            rows.append(self.coverage.format())
        rows += rotation_rows(self.rotations)
        if self.refit is not None and self.config.refit:
            rows.append(self.refit.format())
        rows.append(f"{'space':>5}  {'widths':<16} {'merged':>6}  {'matcher':<8} mean corr")
        for s in self.spaces:
            rows.append(f"{s['space']:>5}  {str(s['widths']):<16} {s['width']:>6}  "
                        f"{s['matcher']:<8} {s['mean_correlation']:.3f}")
        for a in self.alignments:
            if len(set(a.depths)) > 1:
                rows.append(f"stage {a.stage} ({a.name}): depths {a.depths}, positions in "
                            f"model {a.reference}: {a.positions}")
        return "\n".join(rows)


def rotation_rows(rotations: Mapping[int, Rotatable]) -> list[str]:
    """The summary's lines on rotate=True: the spaces rotated, and why each other was not."""
    if not rotations:
        return []
    done = [f"{s}{' (Q·1 = 1)' if r.ones else ''}" for s, r in sorted(rotations.items()) if r.ok]
    rows = [f"rotated spaces: {', '.join(done) or 'none'}"]
    rows += [f"  space {s} not rotated: {r.reason}" for s, r in sorted(rotations.items())
             if not r.ok]
    return rows


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
{options}

    Returns:
        MergeResult with `.module` (an eval-mode GraphModule), `.match_graph`, `.summary`.

    Raises:
        ConfigError: an unknown option or a bad value (before any work).
        CoverageError: fewer parameters aligned than `min_coverage` (before any parameter is
            merged). With less than half aligned, merge warns (`LowCoverageWarning`).

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
    spaces = [SpaceSummary(space=sid, widths=p.widths, width=p.width, matcher=p.matcher,
                           mean_correlation=float(p.mean_correlation),
                           correlations=p.correlations)
              for sid, p in sorted(ctx.plans.items())]
    ctx.seconds["total"] = time.perf_counter() - t0
    return MergeResult(ctx.module, ctx.match_graph, spaces, ctx.head_mode, cfg.method,
                       ctx.seconds, ctx.alignments, cfg, ctx.plans, ctx.coverage,
                       ctx.rotations or {}, ctx.refit)


merge.__doc__ = merge.__doc__.replace("{options}", option_help(indent=12))
