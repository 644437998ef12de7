"""`MergeConfig`: every merge option in one place, validated before any work is done.

Unknown keys and out-of-range values raise `ConfigError` naming the key and what is allowed,
before a model is traced or a batch is read.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphmerge.errors import ConfigError
from graphmerge.graph.capture import FRONTENDS
from graphmerge.match.align import ALIGN_METHODS
from graphmerge.match.matchers import MATCHERS
from graphmerge.surgery.norms import CORRECTIONS

__all__ = ["MergeConfig", "option_help", "HEAD_MODES", "NORM_MODES", "ATTENTION_MODES"]

# the valid values of some options (their meaning: the fields' help, `option_help`)
HEAD_MODES = ("average", "concat")
NORM_MODES = tuple(CORRECTIONS)  # the registered corrections (`surgery/norms.py`), in order
ATTENTION_MODES = ("heads", "frozen")


def _option(default: Any, help: str) -> Any:
    """A field of `MergeConfig` with its help text: written once, shown by `merge`'s docstring,
    `graphmerge merge --help` and `option_help`."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MergeConfig:
    """The options of one merge; each field's help is in `option_help()`.

    `alpha` and `beta` are options of the "zip" matcher; None means the matcher's default, and
    giving them to a matcher that does not take them is an error.

    Example:
        >>> MergeConfig(method="zip", alpha=0.3).matcher_options()
        {'alpha': 0.3, 'beta': 1.0}
        >>> MergeConfig.from_dict({"metod": "zip"})
        Traceback (most recent call last):
        ...
        graphmerge.errors.ConfigError: unknown merge option 'metod'; valid options: method, alpha, beta, width, heads, align, norms, check, frontend, leaf_modules, progress, partial, max_batches, max_samples, device, max_memory, attention, min_coverage, rotate, refit
    """

    method: str = _option(
        "zip", '"zip" (ZipIt made elastic, default), "permute" (Hungarian activation '
        'matching) or "average".')
    alpha: float | None = _option(
        None, "zip's correlation decay (default 0.5); only for method='zip'.")
    beta: float | None = _option(
        None, "zip's within-model merge budget (default 1.0); only for method='zip'.")
    width: Any = _option(
        None, "merged width per space: None (the widest model's), a float ratio of it (0.5 "
        "compresses the merged model), or {space id: units or ratio} per space (ids from "
        "`graphmerge inspect`); zip only, the other methods need equal widths.")
    heads: str = _option(
        "average", '"average" (default: the merged model keeps model 0\'s inputs and output '
        'shapes; the models\' outputs must have one width) or "concat" (disjoint tasks: every '
        'model keeps its head, the logits are concatenated in model order).')
    align: str = _option(
        "lma", 'depth alignment when the models\' stages differ in depth: "lma" (default), '
        '"sma" or "uniform"; shallower models are expanded with identity units.')
    norms: str = _option(
        "repair", '"repair" (default: REPAIR — where a merged unit enters a nonlinearity or a '
        "norm, its mean and std on the calibration data are set to the merge-weighted mean of "
        "its members', through BatchNorm statistics or folded into the producing layer; a "
        'self-merge stays exact), "reset" (BatchNorm statistics recomputed on the calibration '
        'data, as ZipIt! does) or "none".')
    check: bool = _option(
        True, "run the permutation oracle on model 0 first (refuses models whose spaces "
        "break); default True.")
    frontend: str = _option(
        "auto", 'how models are captured: "auto" (default: torch.fx, falling back to '
        'torch.export), "fx" or "export"; a GraphModule is taken as given.')
    leaf_modules: Sequence[Any] = _option(
        (), "module classes or qualified names to keep opaque when tracing.")
    progress: bool = _option(
        True, "progress bars on the calibration passes (samples seen); default True.")
    partial: Any = _option(
        None, "None (default: merge everything) or a cut — a node name, a space id (after the "
        "last node carrying it) or a fraction of depth (of the weighted layers): the graph up "
        "to the cut is merged, after it every model keeps its own layers, fed through its "
        "unmerge matrices; outputs averaged or, with heads='concat', concatenated. More "
        "parameters, higher accuracy (ZipIt!'s partial zipping).")
    max_batches: int | None = _option(
        None, "read at most this many calibration batches (default: one pass over a finite "
        "iterable; an iterable without len(), such as a generator or an endless stream, needs "
        "max_batches or max_samples).")
    max_samples: int | None = _option(
        None, "read at most this many calibration samples (see max_batches).")
    device: Any = _option(
        None, 'run the merge there (e.g. "cuda"); default: where the models are. The '
        "caller's models are copied, never moved.")
    max_memory: Any = _option(
        None, "a bound in bytes on the feature statistics (8·d² per space of d units summed "
        "over the models, 4·d² from 4096 units); spaces that do not fit together are "
        "measured in several passes over the calibration data, with the same result, each "
        "when the matching reaches its spaces (one pass's statistics are held at a time). It "
        "also bounds the activations REPAIR holds for its single pass (default 2 GiB; past "
        "it, one pass per level).")
    attention: str = _option(
        "heads", '"heads" (default: attention heads are matched as wholes, each merged head\'s '
        'dims by its own transform) or "frozen" (heads and head dims keep the identity: head h '
        "of every model is merged with head h, dim by dim; the rest is merged as usual; a "
        "baseline that ignores the heads).")
    min_coverage: float | None = _option(
        None, "None (default) or a fraction in [0, 1]: refuse the merge (CoverageError) when "
        "it aligns a smaller fraction of the parameters than this; the rest would keep the "
        "identity and only be averaged (MergeResult.coverage says which spaces froze them). "
        "Below one half, the merge warns either way.")
    rotate: bool = _option(
        False, "True: before matching, rotate every model's residual-stream-like spaces onto "
        "model 0's by orthogonal Procrustes on their features — an exact reparametrisation, "
        "found from the graph where every op on the space commutes with an orthogonal map "
        "(linears, sums, LayerNorm/RMSNorm with their affine folded into the linears reading "
        "them; LayerNorm keeps the all-ones direction); the matcher then runs as usual. "
        "MergeResult.summary lists the spaces rotated and why the others were not. Default "
        "False.")
    refit: bool = _option(
        False, "True: after the norm correction, refit every linear layer and convolution of "
        "the merged module, in graph order, by closed-form least squares on the calibration "
        "data (no gradient steps): on the inputs the merged module gives it, it best "
        "reproduces the merged image of the models' outputs of that layer (of their batch-norm "
        "outputs where a batch norm alone reads it), pulled toward the merged weight by a "
        "small ridge. Exact for a self-merge; tied weights are left alone. It holds "
        "the activations of the merged module and every model over all calibration batches "
        "at once (bounded by max_memory; past it the refit is skipped and "
        "MergeResult.refit says so). Default False.")

    def __post_init__(self) -> None:
        _one_of("method", self.method, sorted(MATCHERS))
        _one_of("heads", self.heads, HEAD_MODES)
        _one_of("align", self.align, ALIGN_METHODS)
        _one_of("norms", self.norms, NORM_MODES)
        _one_of("attention", self.attention, ATTENTION_MODES)
        _one_of("frontend", self.frontend, FRONTENDS)
        for key in ("check", "progress", "rotate", "refit"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be True or False, got {getattr(self, key)!r}")
        options = {k: v for k, v in (("alpha", self.alpha), ("beta", self.beta))
                   if v is not None}
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                    value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
        MATCHERS[self.method].check_options(options)
        _check_width(self.width, self.method)
        _check_partial(self.partial)
        for key in ("max_batches", "max_samples", "max_memory"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{key} must be None or an int >= 1, got {value!r}")
        _check_device(self.device)
        _check_min_coverage(self.min_coverage)
        if isinstance(self.leaf_modules, (str, type)) or not all(
                isinstance(m, (str, type)) for m in self.leaf_modules):
            raise ConfigError("leaf_modules must be a list of module classes or qualified "
                              f"module names, got {self.leaf_modules!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "MergeConfig":
        """A config from a mapping; an unknown key raises ConfigError naming the valid keys."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ConfigError(f"unknown merge option {key!r}; valid options: "
                                  f"{', '.join(valid)}")
        return cls(**options)

    @classmethod
    def of(cls, config: "MergeConfig | Mapping[str, Any] | None" = None,
           **options: Any) -> "MergeConfig":
        """A config from a MergeConfig or a mapping of its fields (or None), with `options`
        overriding it: how `merge` and `plan_merge` read their arguments."""
        if isinstance(config, MergeConfig):
            config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        elif config is not None and not isinstance(config, Mapping):
            raise ConfigError(f"config must be a MergeConfig or a mapping of its options, got "
                              f"{type(config).__name__}")
        return cls.from_dict({**(config or {}), **options})

    def matcher_options(self) -> dict[str, Any]:
        """The options passed to the matcher: its defaults, overridden by the ones given."""
        given = {"alpha": self.alpha, "beta": self.beta}
        return {k: given[k] if given.get(k) is not None else default
                for k, default in MATCHERS[self.method].options.items()}


def option_help(indent: int = 0, width: int = 92) -> str:
    """Every merge option with its help, one wrapped paragraph each (for docstrings and the
    command line's help).

    Example:
        >>> print(option_help(width=60).splitlines()[0])
        method: "zip" (ZipIt made elastic, default), "permute"
    """
    lines = []
    for f in dataclasses.fields(MergeConfig):
        lines += textwrap.wrap(f"{f.name}: {f.metadata['help']}", width,
                               initial_indent=" " * indent, subsequent_indent=" " * (indent + 4),
                               break_on_hyphens=False)
    return "\n".join(lines)


def _one_of(key: str, value: Any, valid: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in valid:
        raise ConfigError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")


def _check_width(width: Any, method: str) -> None:
    """None, a positive ratio (float), or {space id (int): units (int) or ratio (float)}."""
    if width is None:
        return
    if not MATCHERS[method].elastic:
        raise ConfigError(f"width={width!r} needs an elastic matcher (method='zip'); "
                          f"method={method!r} keeps the models' common width")
    if isinstance(width, Mapping):
        for key, value in width.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise ConfigError(f"width= keys must be space ids (ints, see graphmerge "
                                  f"inspect), got {key!r}")
            _check_width_value(value, f"width[{key}]")
        return
    if isinstance(width, int) and not isinstance(width, bool):
        raise ConfigError(f"width={width}: a single width must be a ratio of the widest model "
                          f"(e.g. 0.5 or 1.5); give units per space as {{space id: units}}")
    _check_width_value(width, "width")


def _check_width_value(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive int (units) or float (ratio of the widest "
                          f"model's width), got {value!r}")


def _check_device(device: Any) -> None:
    """None (where the models are), or a torch device that exists on this machine."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be None or a torch device such as 'cpu' or 'cuda:0', "
                          f"got {device!r}") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (
            dev.index is not None and dev.index >= torch.cuda.device_count())):
        raise ConfigError(f"device={device!r}: no such CUDA device on this machine "
                          f"({torch.cuda.device_count()} found); use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"device={device!r}: merges run on 'cpu' or a GPU ('cuda', 'mps', "
                          f"'xpu'), not on {dev.type!r}")
    if dev.type in ("mps", "xpu") and not getattr(torch, dev.type).is_available():
        raise ConfigError(f"device={device!r} is not available on this machine; use "
                          f"device='cpu'")


def _check_min_coverage(value: Any) -> None:
    """min_coverage=: None or a number in [0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0 <= value <= 1):
        raise ConfigError(f"min_coverage must be None or a fraction of the parameters in "
                          f"[0, 1] (e.g. 0.9), got {value!r}")


def _check_partial(cut: Any) -> None:
    """partial=: None, a node name, a space id (int >= 0) or a fraction of depth in (0, 1)."""
    if cut is None or isinstance(cut, str) and cut:
        return
    if isinstance(cut, int) and not isinstance(cut, bool) and cut >= 0:
        return
    if isinstance(cut, float) and math.isfinite(cut) and 0 < cut < 1:
        return
    raise ConfigError(f"partial must be None (merge everything), a node name, a space id "
                      f"(int >= 0) or a fraction of depth in (0, 1), got {cut!r}")
