"""Scoring models trained on disjoint tasks (ZipIt-style multi-task evaluation).

Task ``t`` owns the global class ids ``task_classes[t]`` (k_t of them, in a fixed order). A
*multi-task* logit matrix has ``K = sum_t k_t`` columns: the task heads' logits concatenated in
task order, so column ``j`` stands for global class ``concat(task_classes)[j]``.

- :func:`joint_accuracy`: argmax over all K columns, mapped to its global class, compared with
  the global label ("which of all classes is it?", the hard, task-agnostic score).
- :func:`task_accuracies`: for the samples of task ``t``, argmax inside task ``t``'s own
  columns compared with the local label ("task-aware": the task is given).
- :func:`evaluate_multitask`: both, plus the mean of the per-task accuracies.
- :func:`single_model_logits`: one model's k_t logits embedded in the K layout (-inf
  elsewhere), so a single task model can be scored jointly.
- :func:`ensemble_logits`: the per-model log-softmax outputs side by side, the usual
  "ensemble of the task models" upper reference.

Ties in an argmax go to the first (lowest) column, as :func:`torch.argmax` does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from graphmerge.errors import ConfigError, DataError
from graphmerge.lab.data.tasks import validate_classes

__all__ = [
    "joint_accuracy",
    "task_accuracies",
    "evaluate_multitask",
    "single_model_logits",
    "ensemble_logits",
    "task_offsets",
]

logger = logging.getLogger(__name__)


def task_offsets(task_classes: Sequence[Sequence[int]]) -> list[int]:
    """Column offsets of the tasks in the multi-task layout: ``[0, k_0, k_0 + k_1, ..., K]``."""
    classes = validate_classes(task_classes)
    offsets = [0]
    for c in classes:
        offsets.append(offsets[-1] + len(c))
    return offsets


def _check_inputs(
    logits: Tensor, y_global: Tensor, task_classes: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
    """Validate shapes and labels; return CPU logits [N, K], labels int64 [N] and the classes."""
    classes = validate_classes(task_classes)
    if not isinstance(logits, Tensor) or not isinstance(y_global, Tensor):
        raise DataError(
            f"logits and y_global must be tensors, got {type(logits).__name__} and "
            f"{type(y_global).__name__}."
        )
    total = sum(len(c) for c in classes)
    if logits.dim() != 2 or logits.shape[1] != total:
        raise DataError(
            f"logits must have shape [N, {total}] (the sum of the task class counts "
            f"{[len(c) for c in classes]}), got {tuple(logits.shape)}."
        )
    if y_global.dim() != 1 or y_global.dtype.is_floating_point or y_global.dtype == torch.bool:
        raise DataError(
            f"y_global must be a 1-D integer tensor of global class ids, got shape "
            f"{tuple(y_global.shape)} and dtype {y_global.dtype}."
        )
    if y_global.shape[0] != logits.shape[0]:
        raise DataError(
            f"{logits.shape[0]} logit rows but {y_global.shape[0]} labels; they must match."
        )
    if logits.shape[0] == 0:
        raise DataError("no samples to evaluate (N = 0).")
    if torch.isnan(logits).any():
        raise DataError("logits contain NaN; the model's outputs are not usable.")
    y = y_global.detach().cpu().long()
    known = torch.tensor([c for cs in classes for c in cs], dtype=torch.int64)
    unknown = y[~torch.isin(y, known)]
    if unknown.numel():
        raise DataError(
            f"labels {sorted(set(unknown.tolist()))[:10]} belong to no task; task_classes cover "
            f"{sorted(known.tolist())}."
        )
    return logits.detach().cpu(), y, classes


def joint_accuracy(
    logits: Tensor, y_global: Tensor, task_classes: Sequence[Sequence[int]]
) -> float:
    """Task-agnostic accuracy: argmax over all K columns, as a global class, equals the label.

    Args:
        logits: [N, K] multi-task logits, K = sum of the task class counts.
        y_global: int [N] global class ids, each in one of the tasks.
        task_classes: the global class ids of each task, in column order.

    Returns:
        the fraction of correct samples, in [0, 1].
    """
    logits, y, classes = _check_inputs(logits, y_global, task_classes)
    column_class = torch.tensor([c for cs in classes for c in cs], dtype=torch.int64)  # [K]
    predicted = column_class[logits.argmax(dim=1)]  # [N]
    return float((predicted == y).double().mean())


def _per_task(
    logits: Tensor, y: Tensor, classes: list[tuple[int, ...]]
) -> list[float]:
    """Per-task accuracies on validated inputs (NaN for a task without samples)."""
    result: list[float] = []
    offset = 0
    for t, cs in enumerate(classes):
        k = len(cs)
        table = torch.tensor(cs, dtype=torch.int64)  # [k] local -> global
        mask = torch.isin(y, table)  # [N]
        if not mask.any():
            logger.warning("task %d (classes %s) has no samples; its accuracy is NaN", t, cs)
            result.append(math.nan)
        else:
            local_pred = logits[mask, offset : offset + k].argmax(dim=1)  # [n_t]
            result.append(float((table[local_pred] == y[mask]).double().mean()))
        offset += k
    return result


def task_accuracies(
    logits: Tensor, y_global: Tensor, task_classes: Sequence[Sequence[int]]
) -> list[float]:
    """Task-aware accuracies: for each task, argmax within its own columns on its own samples.

    Args:
        logits: [N, K] multi-task logits.
        y_global: int [N] global class ids.
        task_classes: the global class ids of each task, in column order.

    Returns:
        one accuracy in [0, 1] per task; NaN (with a warning) for a task with no sample in
        ``y_global``.
    """
    logits, y, classes = _check_inputs(logits, y_global, task_classes)
    return _per_task(logits, y, classes)


def evaluate_multitask(
    logits: Tensor, y_global: Tensor, task_classes: Sequence[Sequence[int]]
) -> dict[str, float | list[float]]:
    """Joint and per-task accuracies of multi-task logits.

    Args:
        logits: [N, K] multi-task logits.
        y_global: int [N] global class ids.
        task_classes: the global class ids of each task, in column order.

    Returns:
        ``{"joint": float, "per_task": [float, ...], "task_mean": float}`` where ``task_mean``
        is the mean of the per-task accuracies (tasks without samples, NaN, are left out).
    """
    joint = joint_accuracy(logits, y_global, task_classes)
    logits_c, y, classes = _check_inputs(logits, y_global, task_classes)
    per_task = _per_task(logits_c, y, classes)
    present = [a for a in per_task if not math.isnan(a)]
    task_mean = sum(present) / len(present) if present else math.nan
    return {"joint": joint, "per_task": per_task, "task_mean": task_mean}


def single_model_logits(
    logits_i: Tensor, task_index: int, task_classes: Sequence[Sequence[int]]
) -> Tensor:
    """Embed one task model's logits in the multi-task layout, ``-inf`` in the other columns.

    Scored with :func:`joint_accuracy`, this is "model ``task_index`` alone": it can only ever
    predict its own classes, so its joint accuracy is at most the fraction of its task's
    samples.

    Args:
        logits_i: [N, k_i] logits of the model of task ``task_index``.
        task_index: which task (0-based).
        task_classes: the global class ids of each task, in column order.

    Returns:
        [N, K] float tensor (dtype and device of ``logits_i``).
    """
    offsets = task_offsets(task_classes)
    num_tasks = len(offsets) - 1
    if isinstance(task_index, bool) or not isinstance(task_index, int) or not (
        0 <= task_index < num_tasks
    ):
        raise ConfigError(f"task_index must be an int in 0..{num_tasks - 1}, got {task_index!r}.")
    lo, hi = offsets[task_index], offsets[task_index + 1]
    if not isinstance(logits_i, Tensor) or logits_i.dim() != 2 or logits_i.shape[1] != hi - lo:
        shape = tuple(logits_i.shape) if isinstance(logits_i, Tensor) else type(logits_i).__name__
        raise DataError(
            f"logits of task {task_index} must have shape [N, {hi - lo}], got {shape}."
        )
    dtype = logits_i.dtype if logits_i.dtype.is_floating_point else torch.float32
    out = torch.full(
        (logits_i.shape[0], offsets[-1]), -math.inf, dtype=dtype, device=logits_i.device
    )
    out[:, lo:hi] = logits_i.detach().to(dtype)
    return out


def ensemble_logits(list_of_logits: Sequence[Tensor]) -> Tensor:
    """The task models side by side: each model's ``log_softmax``, concatenated in task order.

    Each model's raw logits have an arbitrary offset and scale (a model trained alone never
    had to compare its logits with another's), so the raw values are not comparable across
    models. ``log_softmax`` within each model turns them into log-probabilities over that
    model's classes; the joint argmax then picks the class that its own model is most
    confident about. Within a model's columns the ranking is unchanged, so the per-task
    accuracies equal the individual models'.

    Args:
        list_of_logits: one [N, k_t] tensor per task model, in task order.

    Returns:
        [N, K] float tensor, K = sum of the k_t.
    """
    if isinstance(list_of_logits, Tensor) or len(list_of_logits) == 0:
        raise ConfigError("ensemble_logits needs a non-empty list of [N, k_t] logit tensors.")
    rows = set()
    for t, logits in enumerate(list_of_logits):
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] == 0:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise DataError(f"logits of model {t} must have shape [N, k] with k >= 1, got {shape}.")
        rows.add(int(logits.shape[0]))
    if len(rows) != 1:
        raise DataError(
            f"the models' logits have different numbers of rows {sorted(rows)}; score the same "
            f"samples with every model."
        )
    parts = [
        torch.log_softmax(
            logits.detach().to(logits.dtype if logits.dtype.is_floating_point else torch.float32),
            dim=1,
        )
        for logits in list_of_logits
    ]
    return torch.cat(parts, dim=1)
