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


def _folds_bias(node: fx.Node) -> bool:
    """Whether the norm's bias goes into its readers' biases (all have one); else it stays on
    the norm, divided by the scale folded out of it."""
    return all("bias" in tensor_args(u) for u in fold_readers(node)[0])


def fold_problem(gm: fx.GraphModule, norms: list[str]) -> str:
    """'' when every norm in `norms` (node names) can be folded into its readers (all linears,
    graph.rotatable checked that); else why not: a reader whose weight something else also
    uses (a tied or reused layer) where the affine is not the identity, or a bias that must
    stay on the norm (a reader has none) past a zero scale."""
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
            shared = [r for r in roles.values() if uses.get(canonical.get(r, r), 0) > 1
                      or sum(c == canonical.get(r, r) for c in canonical.values()) > 1]
            if (shifts or scales) and shared:
                return (f"the affine of norm `{name}` cannot be folded into `{user.name}`: "
                        f"its `{shared[0]}` is also used elsewhere (tied or reused)")
        g = gamma.detach().abs() if gamma is not None else None
        if shifts and g is not None and not _folds_bias(node) and bool(
                (g <= 1e-6 * g.max()).any()):
            return (f"the bias of norm `{name}` stays on it (a reader has no bias) and its "
                    f"scale has zeros")
    return ""


@torch.no_grad()
def fold_norms(gm: fx.GraphModule, norms: list[str]) -> list[str]:
    """Fold every norm in `norms` (node names) into its readers, in place (on a copy the caller
    owns: the tensors are written, not replaced): its scale always, its bias when every reader
    has a bias (else the bias stays, divided by the scale, and rotates with the space). Check
    `fold_problem` first. Returns the names of the tensors now the identity (1 or 0)."""
    identity = []
    for name in norms:
        node = _node(gm, name)
        gamma, beta = _affine(gm, node)
        roles, into = tensor_args(node), _folds_bias(node)
        for user in fold_readers(node)[0]:
            w = get_tensor(gm, tensor_args(user)["weight"])
            if beta is not None and into:
                b = get_tensor(gm, tensor_args(user)["bias"])
                b.copy_((b.double() + w.double() @ beta.double()).to(b.dtype))
            if gamma is not None:
                w.copy_((w.double() * gamma.double()).to(w.dtype))
        if beta is not None and not into and gamma is not None:
            beta.copy_((beta.double() / gamma.double()).to(beta.dtype))
        if gamma is not None:
            gamma.fill_(1.0)
            identity.append(roles["weight"])
        if beta is not None and into:
            beta.zero_()
            identity.append(roles["bias"])
    return identity
