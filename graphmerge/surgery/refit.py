"""Refit (merge option refit=True): every linear layer of the merged module is refitted, in
graph order, by closed-form least squares on the calibration data, so that on the inputs the
merged module now gives it, it best reproduces the merged image of what the input models'
layers give: t = Σ_i y_i M_iᵀ (M_i: the merge matrix of model i on the layer's output space;
1/N for a space that is not merged). No gradient steps: one pass of the merged module and the
input models, node by node in step over all calibration batches at once.

The solution is pulled toward the merged weight by a ridge of `RIDGE` times the mean input
power, so a direction the calibration data does not excite keeps its merged value. Each layer
is fitted after every layer above it was, on the inputs they now give: an error upstream is
corrected where it is seen. A self-merge stays exact: there the merged weight already gives
every target, and the ridge pulls toward it.

Points are found in the graph: an affine map of one input by a weight the graph holds, as the
ops of `AFFINE` place them (nn.Linear, F.linear and aten.linear: weight [out, in]; torch and
aten addmm, as transformers' GPT-2 Conv1D: weight [in, out]), with a weight and bias read by
no other node, and an output as wide in every model as its output space's transform says.
Convolutions are not refitted.

The idea of regressing a merged linear layer on calibration inputs is RegMean's (Jin et al.,
"Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023), which merges
each layer from its own models' inputs; here the inputs are the merged module's own, layer
after layer, and the targets are in the merged space of a permutation or zip merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from graphmerge.calibration import all_reduce, distributed
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.kinds import kind, tensor_args
from graphmerge.graph.lockstep import OverBudget, nbytes, run_lockstep
from graphmerge.graph.tensors import canonical_names, get_tensor, set_tensor

__all__ = ["RIDGE", "SAMPLES_PER_INPUT", "AFFINE", "RefitPoint", "Refit", "refit_points", "refit"]

#: the ridge toward the merged weight, as a fraction of the mean input power E[x_j²]
RIDGE = 1e-3
#: fewer calibration samples than this per input of a layer (bias included) are reported
#: (`Refit.few`): on the ViT pair 2.6 per input kept 56% of the ensemble, 53 per input 85%
SAMPLES_PER_INPUT = 4


#: op kind -> (position of its input, position of its weight, position of its bias, the
#: weight's output axis); None: the op kind's own tensor roles (`kinds.tensor_args`)
AFFINE: dict[str, tuple[int, int | None, int | None, int]] = {
    "linear": (0, None, None, 0),
    "addmm": (1, 2, 0, 1),  # addmm(bias, x, W) = bias + x @ W
}


@dataclass(frozen=True)
class RefitPoint:
    """One linear layer to refit: its node, its input node, its weight (and bias), the space
    of its output units, and the weight's output axis (0: [out, in]; 1: [in, out])."""

    node: str
    source: str
    weight: str
    bias: str | None
    space: int | None
    out_axis: int = 0


def _tensors(n: fx.Node) -> tuple[fx.Node | None, dict[str, str], int] | None:
    """An affine node's input, weight and bias names, and the weight's output axis."""
    layout = AFFINE.get(kind(n))
    if layout is None:
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

    def format(self) -> str:
        if self.skipped:
            return f"refit: skipped ({self.skipped})"
        if not self.layers:
            return ("refit: no layer to refit (only linear layers whose weights no other layer "
                    "reads are refitted)")
        return (f"refit: {self.layers} linear layers by least squares on the calibration data; "
                f"mean relative error {self.error_before:.3g} -> {self.error_after:.3g}")


def refit_points(traced: Traced) -> list[RefitPoint]:
    """The linear layers of `traced` that can be refitted, in graph order."""
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
                                axes.get(out_axis), out_axis))
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
    over = torch.tensor([float(held * (n_models + 1) > budget)])
    all_reduce(over)
    if over.item():
        report.skipped = f"the calibration batches exceed max_memory ({budget} bytes)"
        return report
    alone = distributed()[1] == 1

    def visit(n: fx.Node, values: list[Any]) -> bool:
        bar.update(1)
        if n.name in readers:
            seen[n.name] = values[:n_batches]
        p = at.get(n.name)
        if p is None:
            return False
        outs = [values[(i + 1) * n_batches:(i + 2) * n_batches] for i in range(n_models)]
        fitted = _fit(module, p, seen[p.source], outs, out_transform, ridge)
        if fitted is not None:
            report.errors[p.node] = fitted[:2]
            inputs, samples = fitted[2:]
            if samples < SAMPLES_PER_INPUT * inputs:
                report.few.append((p.node, inputs, samples))
        readers[p.source] -= 1
        if not readers[p.source]:
            del seen[p.source]
        return fitted is not None  # the merged module reads the new weights

    runs = [set_eval(module)] * n_batches
    for t in traced:
        runs += [set_eval(t.graph_module)] * n_batches
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


def _fit(module: fx.GraphModule, p: RefitPoint, inputs: list[torch.Tensor],
         outputs: list[list[torch.Tensor]],
         out_transform: Callable[[int, int | None], np.ndarray | None],
         ridge: float) -> tuple[float, float, int, int] | None:
    """Solve for the point's weight (and bias) and set them; its relative error before and
    after, its number of inputs (with the bias's constant) and of samples; None where the
    models' outputs do not fit the merged one's width."""
    weight = get_tensor(module, p.weight).detach()
    bias = get_tensor(module, p.bias).detach() if p.bias else None
    if weight.dim() != 2:
        return None
    r_out, r_in = weight.shape if p.out_axis == 0 else weight.shape[::-1]
    work = torch.float64
    dev = weight.device
    gram = torch.zeros(r_in + 1, r_in + 1, dtype=work, device=dev)
    cross = torch.zeros(r_in + 1, r_out, dtype=work, device=dev)
    power = torch.zeros((), dtype=work, device=dev)
    count = torch.zeros((), dtype=work, device=dev)
    transforms = []
    for i, outs in enumerate(outputs):
        m = out_transform(i, p.space)
        width = outs[0].shape[-1]
        if (m is None and width != r_out) or (m is not None and m.shape != (r_out, width)):
            return None
        transforms.append(None if m is None else torch.from_numpy(m).to(device=dev,
                                                                         dtype=work))
    for b, x in enumerate(inputs):
        if x.shape[-1] != r_in:
            return None
        z = torch.cat([x.reshape(-1, r_in).to(work),
                       torch.ones(x[..., :1].numel(), 1, dtype=work, device=dev)], 1)
        t = 0
        for outs, m in zip(outputs, transforms):
            y = outs[b].reshape(-1, outs[b].shape[-1]).to(work)
            t = t + (y if m is None else y @ m.T)
        t = t / len(outputs) if all(m is None for m in transforms) else t
        gram += z.T @ z
        cross += z.T @ t
        power += t.pow(2).sum()
        count += len(z)
    all_reduce(gram, cross, power, count)
    samples = int(count.item())
    rows = (weight.T if p.out_axis == 0 else weight).to(work)  # [in, out]
    if bias is None:  # no bias to fit: the constant input is left out
        gram, cross, old = gram[:-1, :-1], cross[:-1], rows
    else:
        old = torch.cat([rows, bias.to(work)[None]])
    power_in = gram.diagonal()[:r_in].mean()
    if not power_in > 0 or not torch.isfinite(gram).all() or not torch.isfinite(cross).all():
        return None  # inputs all zero (nothing to fit) or not finite: the merge is kept
    eye = torch.eye(len(gram), dtype=work, device=dev)
    new, info = torch.linalg.solve_ex(gram + ridge * power_in * eye, cross + ridge * power_in
                                      * old)
    if info.item() or not torch.isfinite(new).all():
        return None

    def error(w: torch.Tensor) -> float:
        # ‖Zw - t‖² = wᵀGw - 2 wᵀC + ‖t‖², summed over the outputs
        left = (w * (gram @ w)).sum() - 2 * (w * cross).sum() + power
        return max(0.0, float(left / power.clamp_min(torch.finfo(work).tiny)))  # rounding

    before, after = error(old), error(new)
    if not after <= before:  # the ridge makes this impossible but for rounding: keep the merge
        return before, before, len(gram), samples
    fitted = new[:r_in].T if p.out_axis == 0 else new[:r_in]
    set_tensor(module, p.weight, fitted.to(weight.dtype).contiguous())
    if bias is not None:
        set_tensor(module, p.bias, new[r_in].to(bias.dtype).contiguous())
    return before, after, len(gram), samples
