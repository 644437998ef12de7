"""Fold a norm's affine into the linears that read it: LN(x)·γ + β read by W, b becomes LN(x)
read by W·diag(γ), b + Wβ, and the norm's weight and bias become 1 and 0. Exact. An
orthogonal transform of the normalised axis (`graph.rotatable`) needs it: a per-unit scale does
not commute with a rotation, a linear does.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphmerge.graph.kinds import tensor_args
from graphmerge.graph.rotatable import fold_readers
from graphmerge.graph.tensors import canonical_names, get_tensor

__all__ = ["fold_problem", "fold_norms"]


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _affine(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    roles = tensor_args(node)
    return tuple(get_tensor(gm, roles[r]) if r in roles else None for r in ("weight", "bias"))


def fold_problem(gm: fx.GraphModule, norms: list[str]) -> str:
    """'' when every norm in `norms` (node names) can be folded into its readers (all linears,
    graph.rotatable checked that); else why not: a reader without a bias where the norm's bias
    is not zero, or a reader whose weight something else also uses (a tied or reused layer)
    where the affine is not the identity."""
    canonical = canonical_names(gm)
    uses: dict[str, int] = {}
    for n in gm.graph.nodes:
        for name in tensor_args(n).values():
            uses[canonical.get(name, name)] = uses.get(canonical.get(name, name), 0) + 1
    for name in norms:
        node = _node(gm, name)
        gamma, beta = _affine(gm, node)
        shifts = beta is not None and bool(beta.detach().any())
        scales = gamma is not None and not bool((gamma.detach() == 1).all())
        for user in fold_readers(node)[0]:
            roles = tensor_args(user)
            if shifts and "bias" not in roles:
                return (f"the bias of norm `{name}` cannot be folded into `{user.name}`: that "
                        f"linear has no bias")
            shared = [r for r in roles.values() if uses.get(canonical.get(r, r), 0) > 1
                      or sum(c == canonical.get(r, r) for c in canonical.values()) > 1]
            if (shifts or scales) and shared:
                return (f"the affine of norm `{name}` cannot be folded into `{user.name}`: "
                        f"its `{shared[0]}` is also used elsewhere (tied or reused)")
    return ""


@torch.no_grad()
def fold_norms(gm: fx.GraphModule, norms: list[str]) -> None:
    """Fold every norm in `norms` (node names) into its readers, in place (on a copy the caller
    owns: the tensors are written, not replaced). Check `fold_problem` first."""
    for name in norms:
        node = _node(gm, name)
        gamma, beta = _affine(gm, node)
        for user in fold_readers(node)[0]:
            roles = tensor_args(user)
            w = get_tensor(gm, roles["weight"])
            if beta is not None and "bias" in roles:
                b = get_tensor(gm, roles["bias"])
                b.copy_((b.double() + w.double() @ beta.double()).to(b.dtype))
            if gamma is not None:
                w.copy_((w.double() * gamma.double()).to(w.dtype))
        if gamma is not None:
            gamma.fill_(1.0)
        if beta is not None:
            beta.zero_()
