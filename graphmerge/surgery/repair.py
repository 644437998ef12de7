"""REPAIR (Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023), read from the graph: where a merged unit enters a nonlinearity or a norm,
its mean and standard deviation on the calibration data are set to the merge-weighted mean of
its members' in the input models.

The points are found in the graph, never from names:

* a batch norm whose channel axis is a merged space: its running statistics are set so that
  its output has the target statistics (no new nodes);
* a linear or convolution whose every user (through dropout and identities) is an activation,
  a layer norm or an RMS norm, with its weight's rows in the merged space and its tensors not
  tied to another layer's: the affine correction is folded into its rows and bias (without a
  bias, only the scale).

A point's correction changes what later points see, so each point is measured after every
point above it was corrected: in graph order over all calibration batches at once (one forward
pass, `graphmerge.surgery.norms.repair_in_order`), or level by level (a point's level: the
longest chain of points above it), one pass over the data per level. When the merged module equals an input model (a self-merge), every correction
is the identity: REPAIR keeps it exact on any data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx as fx

from graphmerge.graph.capture import Traced
from graphmerge.graph.kinds import (
    family,
    has_statistics,
    is_activation,
    is_norm,
    is_pass,
    kind,
    norm_eps,
    tensor_args,
)
from graphmerge.graph.tensors import canonical_names, get_tensor, set_tensor
from graphmerge.match.plans import SpacePlan
from graphmerge.match.statistics import moments  # re-exported: streamed sums live in match

__all__ = ["RepairPoint", "repair_points", "by_level", "targets", "repair", "moments"]

_TINY = 1e-12


@dataclass(frozen=True)
class RepairPoint:
    """One place where merged units are renormalised."""

    node: str          # its statistics: this node's output, in the input models
    measure: str       # what is measured in the merged module (a batch norm's input)
    dim: int           # the unit axis
    space: int
    kind: str          # "batch_norm" or "fold"
    tensors: dict      # role -> tensor name (weight, bias, running_mean, running_var)
    eps: float = 0.0   # a batch norm's epsilon
    level: int = 0


def _users(n: fx.Node) -> list[fx.Node]:
    """Users of `n`, looking through dropout and identities."""
    out = []
    for u in n.users:
        out.extend(_users(u) if is_pass(u) else [u])
    return out


def repair_points(traced: Traced, spaces: set[int]) -> list[RepairPoint]:
    """The points of `traced` where units of `spaces` enter a nonlinearity or a norm."""
    table = traced.space_table
    canonical = canonical_names(traced.graph_module)
    shared = {c for n, c in canonical.items() if n != c}  # tied tensors: read elsewhere too
    found: list[RepairPoint] = []
    for n in traced.graph.nodes:
        k = kind(n)
        dims = table.node_axes.get(n.name, {})
        tensors = tensor_args(n)
        if k == "batch_norm" and {"running_mean", "running_var"} <= tensors.keys():
            dim = 1
            point = RepairPoint(n.name, n.args[0].name, dim, dims.get(dim, -1), "batch_norm",
                                tensors, norm_eps(n))
        elif family(k) == "linear" and "weight" in tensors:
            users = _users(n)
            # a fold point feeds only nonlinearities and norms without running statistics
            # (a batch norm is a point itself: its statistics are corrected in place)
            if not users or not all(is_activation(u) or is_norm(u) and not has_statistics(u)
                                    for u in users):
                continue
            shape = traced.shapes.get(n.name)
            if not shape or not isinstance(shape[0], int):
                continue
            dim = 1 if k == "conv" else len(shape) - 1
            point = RepairPoint(n.name, n.name, dim, dims.get(dim, -1), "fold", tensors)
            if table.param_axes.get(tensors["weight"], {}).get(0) != point.space or any(
                    canonical.get(t, t) in shared for t in tensors.values()):
                continue
        else:
            continue
        if point.space in spaces:
            found.append(point)
    return _levels(traced.graph, found)


def _levels(graph: fx.Graph, points: list[RepairPoint]) -> list[RepairPoint]:
    """Each point with its level: 1 + the highest level of the points above it."""
    at = {p.node: p for p in points}
    level: dict[str, int] = {}  # per node: the highest level of a point at or above it
    out = []
    for n in graph.nodes:
        above = max((level[a.name] for a in n.all_input_nodes if a.name in level), default=-1)
        if n.name in at:
            p = at[n.name]
            out.append(replace(p, level=above + 1))
            above += 1
        level[n.name] = above
    return out


def targets(plan: SpacePlan,
            moments: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The merged units' target mean and std: Σ_i M_i · (mean_i, std_i)."""
    return (plan.averaged([mu for mu, _ in moments]),
            plan.averaged([sd for _, sd in moments]))


def repair(module: fx.GraphModule, point: RepairPoint, measured: tuple[np.ndarray, np.ndarray],
           target: tuple[np.ndarray, np.ndarray]) -> None:
    """Correct `module` in place at `point` so the merged units' statistics (measured: the
    mean and std of `point.measure`) become `target`."""
    (mu_m, sd_m), (mu_t, sd_t) = measured, target
    get = {role: get_tensor(module, name).detach() for role, name in point.tensors.items()}
    ref = get["weight"] if "weight" in get else get["running_mean"]
    if point.kind == "batch_norm":
        gamma = _numpy(get["weight"]) if "weight" in get else np.ones_like(mu_m)
        beta = _numpy(get["bias"]) if "bias" in get else np.zeros_like(mu_m)
        # output = gamma (x - running_mean) / sqrt(running_var + eps) + beta; a unit that does
        # not vary keeps its scale (only its mean is moved): setting its variance from a
        # zero spread would divide its rounding noise by sqrt(eps)
        live = _varies(mu_m, sd_m) & _varies(mu_t, sd_t) & (np.abs(gamma) > _TINY)
        now = _numpy(get["running_var"])
        sigma = np.where(live, np.abs(gamma) * sd_m / np.where(live, sd_t, 1.0),
                         np.sqrt(now + point.eps))
        moves = np.abs(gamma) > _TINY
        mean = np.where(moves, mu_m - (mu_t - beta) * sigma / np.where(moves, gamma, 1.0), mu_m)
        var = np.clip(sigma ** 2 - point.eps, 0.0, None)
        set_tensor(module, point.tensors["running_mean"], _like(mean, ref))
        set_tensor(module, point.tensors["running_var"], _like(var, ref))
        return
    scale = np.where(_varies(mu_m, sd_m) & _varies(mu_t, sd_t), sd_t / np.maximum(sd_m, _TINY),
                     1.0)
    weight = get["weight"]
    rows = scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    set_tensor(module, point.tensors["weight"], _like(_numpy(weight) * rows, weight))
    if "bias" in get:
        shift = scale * (_numpy(get["bias"]) - mu_m) + mu_t
        set_tensor(module, point.tensors["bias"], _like(shift, get["bias"]))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A module tensor as float64 numpy (copied to the CPU from wherever it is)."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _like(values: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    """`values` as a tensor on `ref`'s device, in its dtype (the corrected module stays where
    and in the precision it was)."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(device=ref.device, dtype=ref.dtype)


def _varies(mean: np.ndarray, std: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Per unit: whether it varies on the data, by the rule of the correlations
    (`correlation_from_moments`): a variance above `eps` times the larger of its E[x²] and
    the point's mean unit variance. A constant unit's measured spread is rounding noise (a
    std ~1e-9 around a mean ~0.1), and a ratio of two such spreads is noise too."""
    var = std ** 2
    return var > eps * np.maximum(mean ** 2 + var, var.mean() if var.size else 0.0)


def by_level(points: Sequence[RepairPoint]) -> list[list[RepairPoint]]:
    levels: dict[int, list[RepairPoint]] = {}
    for p in points:
        levels.setdefault(p.level, []).append(p)
    return [levels[k] for k in sorted(levels)]

