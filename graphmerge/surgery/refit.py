"""Refit (merge option refit=True): every linear layer and convolution of the merged module is
refitted, in graph order, by closed-form least squares on the calibration data, so that on the
inputs the merged module now gives it, it best reproduces the merged image of what the input
models' layers give: t = Σ_i y_i M_iᵀ (M_i: the merge matrix of model i on the layer's output
space; 1/N for a space that is not merged). No gradient steps: one pass of the merged module
and the input models, node by node in step over all calibration batches at once.

The solution is pulled toward the merged weight by a ridge of `RIDGE` times the mean input
power, so a direction the calibration data does not excite keeps its merged value. Each layer
is fitted after every layer above it was, on the inputs they now give: an error upstream is
corrected where it is seen. A self-merge stays exact: there the merged weight already gives
every target, and the ridge pulls toward it.

Points are found in the graph: an affine map of one input by a weight the graph holds, as the
ops of `AFFINE` place them (nn.Linear, F.linear and aten.linear: weight [out, in]; torch and
aten addmm, as transformers' GPT-2 Conv1D: weight [in, out]; convolutions, not transposed:
weight [out, in / groups, *kernel]), with a weight and bias read by no other node, and an
output as wide in every model as its output space's transform says. A convolution's samples
are its input patches, one per output position, read by running the op itself with an
identity kernel (its stride, padding, dilation and groups as they are); each group of a
grouped convolution is its own regression. Where a layer's only reader is a batch norm in
eval mode over its output units (conv → BN), the target is the merged image of the models'
batch-norm outputs, mapped back through the merged batch norm's affine: the norm's statistics
(REPAIR's) stay as they are and the pair gives the target.

The idea of regressing a merged linear layer on calibration inputs is RegMean's (Jin et al.,
"Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023), which merges
each layer from its own models' inputs; here the inputs are the merged module's own, layer
after layer, and the targets are in the merged space of a permutation or zip merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from graphmerge.calibration import all_reduce, distributed
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.kinds import kind, norm_eps, tensor_args
from graphmerge.graph.lockstep import OverBudget, nbytes, run_lockstep
from graphmerge.graph.tensors import canonical_names, get_tensor, set_tensor

__all__ = ["RIDGE", "SAMPLES_PER_INPUT", "MIN_SAMPLES_PER_INPUT", "AFFINE", "RefitPoint", "Refit",
           "refit_points", "refit"]

#: the ridge toward the merged weight, as a fraction of the mean input power E[x_j²]
RIDGE = 1e-3
#: fewer calibration samples than this per input of a layer (bias included) are reported
#: (`Refit.few`): on the ViT pair 2.6 per input kept 55% of the ensemble, 53 per input 85%
SAMPLES_PER_INPUT = 4
#: fewer samples than inputs: the least squares would interpolate the calibration data, so the
#: layer keeps its merged weight (`Refit.kept`). MiniLM's classifier on 80 pooled articles
#: for 385 inputs, refitted, cost 6 points of joint accuracy (`bbc_minilm.md`)
MIN_SAMPLES_PER_INPUT = 1


class _Fitted(NamedTuple):
    before: float  # relative error on the calibration data
    after: float
    inputs: int  # per regression, the bias's constant included
    samples: int
    kept: bool = False  # too few samples: the merged weight is kept


#: op kind -> (position of its input, position of its weight, position of its bias, the
#: weight's output axis); None: the op kind's own tensor roles (`kinds.tensor_args`)
AFFINE: dict[str, tuple[int, int | None, int | None, int]] = {
    "linear": (0, None, None, 0),
    "addmm": (1, 2, 0, 1),  # addmm(bias, x, W) = bias + x @ W
    "conv": (0, None, None, 0),  # conv(x, W [out, in / groups, *kernel], bias, …)
}

#: a convolution's patches are read in chunks of at most this many bytes (float64)
PATCH_BYTES = 1 << 28


@dataclass(frozen=True)
class RefitPoint:
    """One layer to refit: its node, its input node, its weight (and bias), the space of its
    output units, the weight's output axis (0: [out, in, …]; 1: [in, out]), and the batch norm
    that alone reads it (None: none)."""

    node: str
    source: str
    weight: str
    bias: str | None
    space: int | None
    out_axis: int = 0
    norm: str | None = None


def _transposed(n: fx.Node) -> bool:
    """A transposed convolution (its weight is [in, out / groups, …]: not refitted)."""
    if n.op == "call_module":
        return isinstance(n.graph.owning_module.get_submodule(n.target),
                          torch.nn.modules.conv._ConvTransposeNd)
    return "transpose" in str(n.target) or (len(n.args) > 6 and n.args[6] is True)


def _tensors(n: fx.Node) -> tuple[fx.Node | None, dict[str, str], int] | None:
    """An affine node's input, weight and bias names, and the weight's output axis."""
    layout = AFFINE.get(kind(n))
    if layout is None or kind(n) == "conv" and _transposed(n):
        return None
    x, w, b, out_axis = layout
    if w is None:
        tensors = tensor_args(n)
    else:
        tensors = {role: a.target for role, i in (("weight", w), ("bias", b))
                   if i < len(n.args) and isinstance(a := n.args[i], fx.Node)
                   and a.op == "get_attr"}
    source = n.args[x] if x < len(n.args) and isinstance(n.args[x], fx.Node) else None
    return source, tensors, out_axis


def _sole_batch_norm(n: fx.Node) -> str | None:
    """The eval-mode batch norm that alone reads `n` (over axis 1), if any."""
    if len(n.users) != 1:
        return None
    (u,) = n.users
    if kind(u) == "batch_norm" and u.args and u.args[0] is n and {
            "running_mean", "running_var"} <= tensor_args(u).keys():
        return u.name
    return None


@dataclass
class Refit:
    """What a refit did: the layers refitted, their mean relative error on the calibration
    data before and after (‖xW + b - t‖² / ‖t‖², averaged over the layers; per layer in
    `errors`), the layers fitted on few samples (`few`), and why it was skipped ('' if it
    ran). A layer whose inputs were all zero or not finite keeps its merged weight and is not
    counted."""

    layers: int = 0
    error_before: float = float("nan")
    error_after: float = float("nan")
    skipped: str = ""
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: points fitted on fewer than `SAMPLES_PER_INPUT` samples per input: (node, inputs,
    #: samples); their fits follow the calibration data closely and may not carry over
    few: list[tuple[str, int, int]] = field(default_factory=list)
    #: points with fewer samples than inputs, left at their merged weight: (node, inputs,
    #: samples)
    kept: list[tuple[str, int, int]] = field(default_factory=list)

    def format(self) -> str:
        if self.skipped:
            return f"refit: skipped ({self.skipped})"
        kept = (f"; {len(self.kept)} kept as merged (fewer calibration samples than inputs, "
                f"e.g. `{self.kept[0][0]}`: {self.kept[0][2]} for {self.kept[0][1]})"
                if self.kept else "")
        if not self.layers:
            return ("refit: no layer refitted (only linear layers and convolutions whose "
                    f"weights no other layer reads are){kept}")
        return (f"refit: {self.layers} layers by least squares on the calibration data; "
                f"mean relative error {self.error_before:.3g} -> {self.error_after:.3g}{kept}")


def refit_points(traced: Traced) -> list[RefitPoint]:
    """The layers of `traced` that can be refitted, in graph order."""
    table = traced.space_table
    canonical = canonical_names(traced.graph_module)
    shared = {c for n, c in canonical.items() if n != c}
    reads: dict[str, int] = {}  # how many nodes read each tensor
    for n in traced.graph.nodes:
        if n.op == "get_attr":
            reads[n.target] = reads.get(n.target, 0) + len(n.users)
        elif n.op == "call_module":
            for t in tensor_args(n).values():
                reads[t] = reads.get(t, 0) + 1
    found = []
    for n in traced.graph.nodes:
        affine = _tensors(n)
        if affine is None or affine[0] is None or "weight" not in affine[1]:
            continue
        source, tensors, out_axis = affine
        if any(canonical.get(t, t) in shared or reads.get(t, 0) > 1 for t in tensors.values()):
            continue  # a tied tensor: another layer reads it too
        axes = table.param_axes.get(tensors["weight"], {})
        found.append(RefitPoint(n.name, source.name, tensors["weight"], tensors.get("bias"),
                                axes.get(out_axis), out_axis, _sole_batch_norm(n)))
    return found


def refit(module: fx.GraphModule, traced: Sequence[Traced], points: Sequence[RefitPoint],
          out_transform: Callable[[int, int | None], np.ndarray | None],
          calibration: Iterable[tuple[Any, ...]], *, budget: int, progress: bool = True,
          ridge: float | None = None) -> Refit:
    """Refit `points` of `module` in place (see the module's docstring).

    `out_transform(i, space)` is model i's merge matrix [r, d_i] on a point's output space
    (None: the identity). The merged module and every input model's graph run node by node
    over all calibration batches at once; more than `budget` bytes of live activations skips
    the refit (`Refit.skipped` says so). `ridge`: default `RIDGE`."""
    ridge = RIDGE if ridge is None else ridge
    batches, held = [], 0
    for inputs in calibration:
        batches.append(inputs)
        held += nbytes(inputs)
    n_models, n_batches = len(traced), len(batches)
    at = {p.node: p for p in points}
    readers: dict[str, int] = {}
    for p in points:
        readers[p.source] = readers.get(p.source, 0) + 1
    seen: dict[str, list[torch.Tensor]] = {}  # the merged module's inputs of points to come
    report = Refit()
    # under torch.distributed every rank sums its shard into each point's moments, so all
    # ranks run or skip together and none stops midway on its own budget
    where = next((t.device for t in module.state_dict().values()), torch.device("cpu"))
    over = torch.tensor([float(held * (n_models + 1) > budget)], device=where)  # NCCL: on GPU
    all_reduce(over)
    if over.item():
        report.skipped = f"the calibration batches exceed max_memory ({budget} bytes)"
        return report
    alone = distributed()[1] == 1
    roots = [t.graph_module for t in traced]

    def visit(n: fx.Node, values: list[Any]) -> bool:
        bar.update(1)
        if n.name in readers:
            seen[n.name] = values[:n_batches]
        p = at.get(n.name)
        if p is None:
            return False
        outs = [values[(i + 1) * n_batches:(i + 2) * n_batches] for i in range(n_models)]
        fitted = _fit(module, roots, p, seen[p.source], outs, out_transform, ridge)
        if fitted is not None and fitted.kept:
            report.kept.append((p.node, fitted.inputs, fitted.samples))
            fitted = None
        elif fitted is not None:
            report.errors[p.node] = fitted.before, fitted.after
            if fitted.samples < SAMPLES_PER_INPUT * fitted.inputs:
                report.few.append((p.node, fitted.inputs, fitted.samples))
        readers[p.source] -= 1
        if not readers[p.source]:
            del seen[p.source]
        return fitted is not None  # the merged module reads the new weights

    runs = [set_eval(module)] * n_batches
    for root in roots:
        runs += [set_eval(root)] * n_batches
    nodes = sum(1 for n in module.graph.nodes if n.op != "output")
    try:
        with tqdm(total=nodes, desc="refit (all batches at once)", unit="node",
                  disable=not progress, leave=False) as bar:
            run_lockstep(runs, batches * (n_models + 1), visit,
                         max_bytes=budget if alone else None,
                         what=lambda k: (f"the merged module on calibration batch {k}"
                                         if k < n_batches else
                                         f"model {k // n_batches - 1} on calibration batch "
                                         f"{k % n_batches}"))
    except OverBudget:
        report.skipped = (f"the activations of the merged module and the models over the "
                          f"calibration data exceed max_memory ({budget} bytes)")
        return report
    report.layers = len(report.errors)
    if report.errors:
        report.error_before = float(np.mean([b for b, _ in report.errors.values()]))
        report.error_after = float(np.mean([a for _, a in report.errors.values()]))
    return report


def _rows(weight: torch.Tensor, p: RefitPoint, groups: int) -> torch.Tensor:
    """The weight as [groups, inputs per group, outputs per group] (float64)."""
    w = weight.to(torch.float64)
    if p.out_axis == 1:
        return w[None]  # [in, out]
    out = w.shape[0]
    return w.reshape(groups, out // groups, -1).transpose(1, 2)


def _unrows(rows: torch.Tensor, weight: torch.Tensor, p: RefitPoint) -> torch.Tensor:
    """`_rows`'s inverse: a weight of `weight`'s shape and dtype."""
    if p.out_axis == 1:
        return rows[0].to(weight.dtype).contiguous()
    return rows.transpose(1, 2).reshape(weight.shape).to(weight.dtype).contiguous()


def _patches(module: fx.GraphModule, node: fx.Node, x: torch.Tensor, groups: int,
             kernel: tuple[int, ...]) -> torch.Tensor | None:
    """A convolution's input patches [B, C·K, *positions] (K = the kernel's size), from the op
    itself run on `x` with an identity kernel: patch channel g·(C/g·K) + c·K + k is input
    channel g·C/g + c at kernel offset k. None where the op cannot be run so."""
    c = x.shape[1]
    size = int(np.prod(kernel))
    eye = torch.eye(c // groups * size, dtype=x.dtype, device=x.device)
    ident = eye.reshape(c // groups * size, c // groups, *kernel).repeat(groups, *[1] * (
        len(kernel) + 1))
    if node.op == "call_module":
        conv = module.get_submodule(node.target)
        params = {"weight": ident}
        if getattr(conv, "bias", None) is not None:
            params["bias"] = torch.zeros(len(ident), dtype=x.dtype, device=x.device)
        return torch.func.functional_call(conv, params, (x,))
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None

    def value(a: Any) -> Any:
        if a is node.args[0]:
            return x
        if a is weight:
            return ident
        if a is bias:
            return None
        if isinstance(a, fx.Node):
            raise LookupError(a.name)
        return a

    try:
        args = [value(a) for a in node.args]
        kwargs = {k: value(v) for k, v in node.kwargs.items()}
    except LookupError:
        return None
    return node.target(*args, **kwargs)


def _design(module: fx.GraphModule, p: RefitPoint, x: torch.Tensor, groups: int,
            weight: torch.Tensor) -> Iterable[torch.Tensor]:
    """The point's samples as [n, groups, inputs per group] float64 chunks."""
    if weight.dim() == 2:
        r_in = weight.shape[1 - p.out_axis]
        yield x.reshape(-1, 1, r_in).to(torch.float64)
        return
    node = _node(module, p.node)
    per_sample = x[:1].numel() * int(np.prod(weight.shape[2:])) * 8
    step = max(1, PATCH_BYTES // max(per_sample, 1))
    for start in range(0, len(x), step):
        patches = _patches(module, node, x[start:start + step], groups, tuple(weight.shape[2:]))
        if patches is None:
            raise LookupError(p.node)
        yield patches.movedim(1, -1).reshape(-1, groups, patches.shape[1] // groups).to(
            torch.float64)


def _channels_last(y: torch.Tensor, conv: bool) -> torch.Tensor:
    """Outputs as [n, units]: a convolution's channels are axis 1, a linear's the last."""
    return (y.movedim(1, -1) if conv else y).reshape(-1, y.shape[1 if conv else -1])


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _norm_affine(root: fx.GraphModule, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval batch norm of `root` as y ↦ a·y + c per unit (float64)."""
    n = _node(root, name)
    t = {role: get_tensor(root, v).detach().to(torch.float64)
         for role, v in tensor_args(n).items()}
    var, mean = t["running_var"], t["running_mean"]
    a = torch.rsqrt(var + norm_eps(n, root)) * t.get("weight", torch.ones_like(var))
    return a, t.get("bias", torch.zeros_like(mean)) - a * mean


def _target(outs: Sequence[torch.Tensor], transforms: Sequence[torch.Tensor | None],
            norms: list[tuple[torch.Tensor, torch.Tensor]] | None, conv: bool
            ) -> torch.Tensor | None:
    """One batch's target [n, units]: Σ_i M_i y_i (the mean where no space is merged), of
    the models' batch-norm outputs mapped back through the merged norm when `norms` (per
    model, then the merged module's (a, c)) are given; None where the merged norm has a zero
    scale."""
    t = 0
    for i, (y, m) in enumerate(zip(outs, transforms)):
        y = _channels_last(y, conv).to(torch.float64)
        if norms is not None:  # the model's batch norm output
            y = y * norms[i][0] + norms[i][1]
        t = t + (y if m is None else y @ m.T)
    if all(m is None for m in transforms):
        t = t / len(outs)
    if norms is not None:  # back through the merged batch norm: its input's target
        a, c = norms[-1]
        if not bool((a.abs() > 0).all()):
            return None
        t = (t - c) / a
    return t


def _sums(module: fx.GraphModule, p: RefitPoint, inputs: list[torch.Tensor],
          targets: Iterable[torch.Tensor | None], weight: torch.Tensor, groups: int
          ) -> list[torch.Tensor] | None:
    """Per group the moments of the samples (a constant input appended) with themselves and
    with the targets, ‖t‖² and the sample count, all-reduced; None where a target or a
    convolution's patches cannot be had."""
    work, dev = torch.float64, weight.device
    size = (weight.shape[1 - p.out_axis] if weight.dim() == 2 else
            int(np.prod(weight.shape[1:]))) + 1
    r_out = weight.shape[p.out_axis]
    gram = torch.zeros(groups, size, size, dtype=work, device=dev)
    cross = torch.zeros(groups, size, r_out // groups, dtype=work, device=dev)
    power = torch.zeros((), dtype=work, device=dev)
    count = torch.zeros((), dtype=work, device=dev)
    for x, t in zip(inputs, targets):
        if t is None:
            return None
        t = t.reshape(len(t), groups, -1)
        first = 0
        try:
            for z in _design(module, p, x, groups, weight):
                z = torch.cat([z, torch.ones(*z.shape[:2], 1, dtype=work, device=dev)], 2)
                gram += torch.einsum("ngi,ngj->gij", z, z)
                cross += torch.einsum("ngi,ngo->gio", z, t[first:first + len(z)])
                first += len(z)
        except LookupError:  # a convolution whose arguments are computed: not refitted
            return None
        if first != len(t):
            return None
        power += t.pow(2).sum()
        count += len(t)
    all_reduce(gram, cross, power, count)
    return [gram, cross, power, count]


def _fit(module: fx.GraphModule, roots: Sequence[fx.GraphModule], p: RefitPoint,
         inputs: list[torch.Tensor], outputs: list[list[torch.Tensor]],
         out_transform: Callable[[int, int | None], np.ndarray | None],
         ridge: float) -> _Fitted | None:
    """Solve for the point's weight (and bias) and set them (not with fewer samples than
    `MIN_SAMPLES_PER_INPUT` per input: `kept`); None where the models' outputs do not fit the
    merged one's width, or there is nothing to fit."""
    weight = get_tensor(module, p.weight).detach()
    bias = get_tensor(module, p.bias).detach() if p.bias else None
    conv = weight.dim() > 2
    if not conv and weight.dim() != 2:
        return None
    r_out = weight.shape[p.out_axis]
    groups = inputs[0].shape[1] // weight.shape[1] if conv else 1
    if conv and (inputs[0].dim() != weight.dim() or groups < 1 or r_out % groups
                 or inputs[0].shape[1] != groups * weight.shape[1]):
        return None  # an unbatched input, or channels that do not divide into the groups
    work, dev = torch.float64, weight.device
    transforms = []
    for i, outs in enumerate(outputs):
        m = out_transform(i, p.space)
        width = outs[0].shape[1 if conv else -1]
        if (m is None and width != r_out) or (m is not None and m.shape != (r_out, width)):
            return None
        transforms.append(None if m is None else torch.from_numpy(m).to(device=dev, dtype=work))
    norms = None
    if p.norm is not None and (conv or outputs[0][0].dim() == 2):  # the norm's units: axis 1
        norms = [_norm_affine(r, p.norm) for r in (*roots, module)]
    targets = (_target([outs[b] for outs in outputs], transforms, norms, conv)
               for b in range(len(inputs)))
    sums = _sums(module, p, inputs, targets, weight, groups)
    if sums is None:
        return None
    gram, cross, power, count = sums
    samples = int(count.item())
    if samples < MIN_SAMPLES_PER_INPUT * gram.shape[1]:
        return _Fitted(float("nan"), float("nan"), gram.shape[1], samples, kept=True)
    rows = _rows(weight, p, groups)  # [groups, inputs, outputs] per group
    if bias is None:  # no bias to fit: the constant input is left out
        gram, cross, old = gram[:, :-1, :-1], cross[:, :-1], rows
    else:
        old = torch.cat([rows, bias.to(work).reshape(groups, 1, -1)], 1)
    power_in = gram.diagonal(dim1=1, dim2=2)[:, :rows.shape[1]].mean(1)  # per group
    if not bool((power_in > 0).all()) or not torch.isfinite(gram).all() or not torch.isfinite(
            cross).all():
        return None  # inputs all zero (nothing to fit) or not finite: the merge is kept
    lam = (ridge * power_in)[:, None, None]
    eye = torch.eye(gram.shape[1], dtype=work, device=dev)
    new, info = torch.linalg.solve_ex(gram + lam * eye, cross + lam * old)
    if bool(info.any()) or not torch.isfinite(new).all():
        return None

    def error(w: torch.Tensor) -> float:
        # ‖Zw - t‖² = wᵀGw - 2 wᵀC + ‖t‖², summed over the groups and outputs
        left = (w * (gram @ w)).sum() - 2 * (w * cross).sum() + power
        return max(0.0, float(left / power.clamp_min(torch.finfo(work).tiny)))  # rounding

    before, after = error(old), error(new)
    if not after <= before:  # the ridge makes this impossible but for rounding: keep the merge
        return _Fitted(before, before, gram.shape[1], samples)
    set_tensor(module, p.weight, _unrows(new[:, :rows.shape[1]], weight, p))
    if bias is not None:
        set_tensor(module, p.bias, new[:, -1].reshape(-1).to(bias.dtype).contiguous())
    return _Fitted(before, after, gram.shape[1], samples)
