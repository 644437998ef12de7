"""Model inputs, normalised once: example inputs, calibration batches and their model inputs.

- `as_inputs(x)`: one input or a tuple of positional inputs → a tuple (anything goes).
- `tensor_inputs(x, what)`: a tensor or tensors sharing a batch dimension → a tuple, checked.
- `split_batch(batch, n)`: the first `n` items of a calibration batch (labels may follow).
- `infer_input_count(model, batch)`: how many items of a batch are `model.forward`'s inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from graphmerge.errors import ConfigError, DataError

__all__ = ["as_inputs", "tensor_inputs", "split_batch", "infer_input_count"]


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """A tuple of positional arguments: a tuple is kept, a list of tensors becomes a tuple,
    anything else is one argument."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list) and all(isinstance(x, Tensor) for x in example_inputs):
        return tuple(example_inputs)
    return (example_inputs,)


def tensor_inputs(x: Tensor | Sequence[Tensor], what: str = "inputs") -> tuple[Tensor, ...]:
    """One tensor or a non-empty sequence of tensors sharing their first (batch) dimension.

    Raises:
        ConfigError: not a tensor or a sequence of tensors.
        DataError: a scalar tensor, batch sizes that differ, or a batch of size 0.
    """
    xs: tuple[Any, ...] = (x,) if isinstance(x, Tensor) else (
        tuple(x) if isinstance(x, (tuple, list)) else ())
    if not xs:
        raise ConfigError(f"{what} must be a tensor or a non-empty tuple of tensors, got "
                          f"{type(x).__name__}.")
    for i, t in enumerate(xs):
        if not isinstance(t, Tensor):
            raise ConfigError(f"{what}[{i}] is a {type(t).__name__}; every input must be a "
                              f"torch.Tensor with the batch as its first dimension.")
        if t.dim() == 0:
            raise DataError(f"{what}[{i}] is a scalar tensor; every input needs a batch "
                            f"dimension first, e.g. x.unsqueeze(0).")
    sizes = {int(t.shape[0]) for t in xs}
    if len(sizes) != 1:
        raise DataError(f"{what} have different batch sizes (shapes "
                        f"{[tuple(t.shape) for t in xs]}); all inputs must share their first "
                        f"dimension.")
    if 0 in sizes:
        raise DataError(f"{what} have batch size 0; pass at least one example.")
    return xs


def split_batch(batch: Any, n_inputs: int) -> tuple[Any, ...]:
    """The model inputs of one calibration batch: a tensor, or the first `n_inputs` items of a
    tuple/list (extra items such as labels are ignored)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and len(batch) >= n_inputs:
        return tuple(batch[:n_inputs])
    raise DataError(
        f"a calibration batch must be a tensor or a tuple whose first {n_inputs} item(s) are the "
        f"model inputs (labels may follow); got {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}")


def infer_input_count(model: nn.Module, batch: Any = None) -> int:
    """How many leading items of a calibration `batch` are inputs of `model.forward`: the
    positional arguments it requires, when that is all it takes or the batch has no more items.

    Raises:
        ConfigError: the signature cannot be read, or the batch has more items than forward
            requires and forward takes optional inputs too, so whether an extra item is an
            input (an attention mask) or a label cannot be told.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError) as e:
        raise ConfigError("cannot read the model's forward signature; pass example_inputs"
                          ) from e
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = max(sum(1 for p in positional if p.default is inspect.Parameter.empty), 1)
    most = (None if any(p.kind is p.VAR_POSITIONAL for p in params)
            else max(len(positional), required))
    items = len(batch) if isinstance(batch, (tuple, list)) else 1
    if items > required and (most is None or most > required):
        takes = "any number of" if most is None else f"up to {most}"
        raise ConfigError(
            f"{type(model).__name__}.forward requires {required} positional input(s) and takes "
            f"{takes}, and the calibration batches have {items} items: whether items after "
            f"the first {required} are inputs (e.g. an attention mask) or labels cannot be "
            f"told. Say how many are inputs: pass example_inputs= to merge (its length counts "
            f"them), or set `inputs:` under calibration in a config file")
    return required
