"""`MergeConfig`: every merge option in one place, validated before any work is done.

Unknown keys and out-of-range values raise `ConfigError` naming the key and what is allowed,
before a model is traced or a batch is read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from graphmerge.errors import ConfigError
from graphmerge.graph.capture import FRONTENDS
from graphmerge.match.align import ALIGN_METHODS
from graphmerge.match.matchers import MATCHERS
from graphmerge.surgery.norms import CORRECTIONS

__all__ = ["MergeConfig", "HEAD_MODES", "NORM_MODES", "ATTENTION_MODES"]

#: heads="average" (default): the merged model keeps model 0's interface, outputs averaged;
#: "concat": every model keeps its head and the logits are concatenated (disjoint tasks).
HEAD_MODES = ("average", "concat")
#: norms="repair" (default): REPAIR, each merged unit's mean and std where it enters a
#: nonlinearity or a norm set to its members' (merge-weighted) on the calibration data;
#: "reset": recompute BatchNorm statistics on the calibration data; "none": keep the merged
#: statistics. The registered corrections, in order (`graphmerge.surgery.norms.CORRECTIONS`).
NORM_MODES = tuple(CORRECTIONS)
#: attention="heads" (default): attention heads are matched as wholes and each merged head's
#: dims by its own transform (`graphmerge.match.heads`); "frozen": the heads and head dims keep
#: the identity (head h of every model merged with head h, dim by dim), the rest is merged as
#: usual — the baseline that ignores where the heads are.
ATTENTION_MODES = ("heads", "frozen")


@dataclass(frozen=True)
class MergeConfig:
    """The options of one merge (see `graphmerge.merge` for their meaning).

    `alpha` and `beta` are options of the "zip" matcher; None means the matcher's default, and
    giving them to a matcher that does not take them is an error.

    Example:
        >>> MergeConfig(method="zip", alpha=0.3).matcher_options()
        {'alpha': 0.3, 'beta': 1.0}
        >>> MergeConfig.from_dict({"metod": "zip"})
        Traceback (most recent call last):
        ...
        graphmerge.errors.ConfigError: unknown merge option 'metod'; valid options: method, alpha, beta, width, heads, align, norms, check, frontend, leaf_modules, progress, partial, max_batches, max_samples, device, max_memory, attention
    """

    method: str = "zip"
    alpha: float | None = None
    beta: float | None = None
    width: Any = None
    heads: str = "average"
    align: str = "lma"
    norms: str = "repair"
    check: bool = True
    frontend: str = "auto"
    leaf_modules: Sequence[Any] = field(default_factory=tuple)
    progress: bool = True
    partial: Any = None
    max_batches: int | None = None
    max_samples: int | None = None
    device: Any = None
    max_memory: Any = None
    attention: str = "heads"

    def __post_init__(self) -> None:
        _one_of("method", self.method, sorted(MATCHERS))
        _one_of("heads", self.heads, HEAD_MODES)
        _one_of("align", self.align, ALIGN_METHODS)
        _one_of("norms", self.norms, NORM_MODES)
        _one_of("attention", self.attention, ATTENTION_MODES)
        _one_of("frontend", self.frontend, FRONTENDS)
        for key in ("check", "progress"):
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
