"""Class-split tasks (e.g. Fashion-MNIST classes 0-4 vs 5-9) and class-balanced subsets.

Merging experiments train one model per task, where each task sees a disjoint subset of the
classes with its labels renumbered 0..k-1, then merge the models. This module builds those tasks
from any labelled tensors, and picks small class-balanced subsets (e.g. calibration sets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from graphmerge.errors import ConfigError, DataError
from graphmerge.lab.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = [
    "Task",
    "split_tasks",
    "fashion_mnist_task_classes",
    "fashion_mnist_tasks",
    "class_balanced_subset",
]

logger = logging.getLogger(__name__)

_TASK_SPLITS = ("halves", "random")


@dataclass(frozen=True, eq=False)
class Task:
    """One task: the examples of a subset of the classes, labels renumbered 0..k-1.

    Attributes:
        name: a human-readable identifier.
        classes: the k original (global) class ids; local label ``i`` means ``classes[i]``.
        train: ``(x, y)`` with x of shape [N_train, ...] and y int64 [N_train] in 0..k-1.
        test: ``(x, y)`` with x of shape [N_test, ...] and y int64 [N_test] in 0..k-1.
        train_y_global: int64 [N_train], the original labels of ``train``.
        test_y_global: int64 [N_test], the original labels of ``test``.
    """

    name: str
    classes: tuple[int, ...]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_y_global: torch.Tensor
    test_y_global: torch.Tensor

    @property
    def num_classes(self) -> int:
        """k, the number of classes in this task."""
        return len(self.classes)

    def train_dataset(self) -> TensorDataset:
        """The train pair as a :class:`~torch.utils.data.TensorDataset` of (x [N, ...], y [N])."""
        return TensorDataset(*self.train)

    def test_dataset(self) -> TensorDataset:
        """The test pair as a :class:`~torch.utils.data.TensorDataset` of (x [N, ...], y [N])."""
        return TensorDataset(*self.test)

    def to_global(self, y_local: torch.Tensor) -> torch.Tensor:
        """Map local labels (int, any shape, values 0..k-1) to global class ids (same shape)."""
        table = torch.tensor(self.classes, dtype=torch.int64, device=y_local.device)
        return table[y_local.long()]


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Raise DataError unless x [N, ...] and y [N] are tensors with y integer and 1-D."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(
            f"{what}: expected torch.Tensor images and labels, got {type(x).__name__} and "
            f"{type(y).__name__}; convert them with torch.as_tensor first."
        )
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(
            f"{what}: labels must be a 1-D integer tensor, got shape {tuple(y.shape)} and dtype "
            f"{y.dtype}; pass class ids as int64 of shape [N]."
        )
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{what}: {tuple(x.shape)} images but {y.shape[0]} labels; the first dimension of the "
            f"images must equal the number of labels."
        )


def validate_classes(
    classes_per_task: Sequence[Sequence[int]], num_classes: int | None = None
) -> list[tuple[int, ...]]:
    """Check the class lists are non-empty, integer (ints or 0-d tensors), in range (0..
    num_classes - 1, or non-negative if num_classes is None), duplicate-free and disjoint.
    Returns them as tuples of ints."""
    valid = "non-negative ints" if num_classes is None else f"ints in 0..{num_classes - 1}"
    if isinstance(classes_per_task, (str, bytes, torch.Tensor)) or len(classes_per_task) == 0:
        raise ConfigError(
            "the task classes must be a non-empty sequence of class-id sequences, one per task, "
            "e.g. [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]."
        )
    seen: dict[int, int] = {}
    result: list[tuple[int, ...]] = []
    for t, classes in enumerate(classes_per_task):
        if isinstance(classes, (str, bytes)) or len(classes) == 0:
            raise ConfigError(f"Task {t} has no classes ({classes!r}); every task needs at least "
                              f"one class id ({valid}).")
        task: list[int] = []
        for c in classes:
            value = c.item() if isinstance(c, torch.Tensor) and c.dim() == 0 else c
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"Task {t}: class id {c!r} is not an integer; use {valid}.")
            value = int(value)
            if value < 0 or (num_classes is not None and value >= num_classes):
                raise ConfigError(f"Task {t}: class id {value} is out of range; use {valid}.")
            if value in seen:
                where = ("twice in the same task" if seen[value] == t
                         else f"in tasks {seen[value]} and {t}")
                raise ConfigError(
                    f"Class {value} appears {where}; the tasks' class lists must be disjoint and "
                    f"duplicate-free."
                )
            seen[value] = t
            task.append(value)
        result.append(tuple(task))
    return result


def _select(
    x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the examples whose label is in ``classes`` (original order).

    Returns:
        x_sel [M, ...], y_local int64 [M] in 0..k-1, y_global int64 [M].
    """
    y_global = y.long()
    lookup = torch.full((num_classes,), -1, dtype=torch.int64, device=y.device)
    lookup[torch.tensor(classes, dtype=torch.int64, device=y.device)] = torch.arange(
        len(classes), dtype=torch.int64, device=y.device
    )
    in_range = (y_global >= 0) & (y_global < num_classes)
    local_all = torch.full_like(y_global, -1)
    local_all[in_range] = lookup[y_global[in_range]]
    keep = local_all >= 0
    return x[keep], local_all[keep], y_global[keep]


def split_tasks(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    classes_per_task: Sequence[Sequence[int]],
    *,
    num_classes: int | None = None,
    names: Sequence[str] | None = None,
) -> list[Task]:
    """Split labelled data into tasks over disjoint class subsets, relabelled 0..k-1 per task.

    Args:
        x_train: [N_train, ...] inputs; y_train: int [N_train] global labels.
        x_test: [N_test, ...] inputs; y_test: int [N_test] global labels.
        classes_per_task: one sequence of global class ids per task; local label ``i`` of a
            task means its ``classes[i]`` (the order given is kept).
        num_classes: number of global classes (valid ids are 0..num_classes-1); defaults to
            one more than the largest label in y_train and y_test.
        names: one name per task; defaults to ``"task0"``, ``"task1"``, ...

    Returns:
        One :class:`Task` per entry of ``classes_per_task``, examples in their original order.

    Raises:
        ConfigError: class lists empty, overlapping, out of range or not integers; bad names.
        DataError: tensors of mismatched length or non-integer labels; a requested class has no
            training example.
    """
    _check_pair(x_train, y_train, "split_tasks train data")
    _check_pair(x_test, y_test, "split_tasks test data")
    if num_classes is None:
        largest = max(
            int(y_train.max()) if y_train.numel() else -1,
            int(y_test.max()) if y_test.numel() else -1,
        )
        num_classes = largest + 1
    if num_classes <= 0:
        raise DataError("split_tasks got no labels at all; pass non-empty y_train / y_test.")
    tasks_classes = validate_classes(classes_per_task, num_classes)
    if names is None:
        names = [f"task{i}" for i in range(len(tasks_classes))]
    elif isinstance(names, str) or len(names) != len(tasks_classes):
        raise ConfigError(
            f"names must be a sequence of {len(tasks_classes)} strings (one per task), got "
            f"{names!r}."
        )

    y_long = y_train.long()
    in_range = y_long[(y_long >= 0) & (y_long < num_classes)]
    train_counts = torch.bincount(in_range, minlength=num_classes)
    tasks: list[Task] = []
    for name, classes in zip(names, tasks_classes):
        missing = [c for c in classes if int(train_counts[c]) == 0]
        if missing:
            raise DataError(
                f"Task {name!r}: classes {missing} have no training example; check the labels or "
                f"drop those classes from classes_per_task."
            )
        xtr, ytr, ytr_g = _select(x_train, y_train, classes, num_classes)
        xte, yte, yte_g = _select(x_test, y_test, classes, num_classes)
        logger.debug(
            "Task %s: classes %s, %d train / %d test examples", name, classes, len(ytr), len(yte)
        )
        tasks.append(
            Task(
                name=str(name),
                classes=classes,
                train=(xtr, ytr),
                test=(xte, yte),
                train_y_global=ytr_g,
                test_y_global=yte_g,
            )
        )
    return tasks


def fashion_mnist_task_classes(
    split: str = "halves", seed: int = 0, num_tasks: int = 2
) -> list[tuple[int, ...]]:
    """The class lists :func:`fashion_mnist_tasks` uses, without loading any data.

    ``"halves"`` cuts 0..9 into ``num_tasks`` contiguous blocks (with the default 2: classes
    0-4 and 5-9). ``"random"`` cuts a permutation of 0..9 drawn with
    ``numpy.random.default_rng(seed)`` into ``num_tasks`` blocks, each sorted. Blocks are as
    equal as possible; when 10 is not a multiple of ``num_tasks`` the first blocks get one more.

    Raises:
        ConfigError: unknown ``split`` or ``num_tasks`` outside 1..10.
    """
    if split not in _TASK_SPLITS:
        raise ConfigError(
            f"Unknown task split {split!r}; valid values are {', '.join(map(repr, _TASK_SPLITS))}."
        )
    n = len(FASHION_MNIST_CLASSES)
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= n:
        raise ConfigError(f"num_tasks must be an integer in 1..{n}, got {num_tasks!r}.")
    if split == "halves":
        order = np.arange(n)
    else:
        order = np.random.default_rng(seed).permutation(n)
    blocks = np.array_split(order, num_tasks)
    if split == "random":
        return [tuple(sorted(int(c) for c in block)) for block in blocks]
    return [tuple(int(c) for c in block) for block in blocks]


def fashion_mnist_tasks(
    split: str = "halves",
    seed: int = 0,
    num_tasks: int = 2,
    *,
    root: str | Path | None = None,
    normalize: bool = True,
) -> list[Task]:
    """Fashion-MNIST cut into tasks over disjoint class subsets.

    The class lists are those of :func:`fashion_mnist_task_classes`.

    Args:
        split: ``"halves"`` (classes 0-4 and 5-9) or ``"random"`` (seeded random 5 + 5).
        seed: seed of the random permutation (ignored for ``"halves"``).
        num_tasks: number of tasks (default 2).
        root, normalize: passed to :func:`~graphmerge.data.load_fashion_mnist`.

    Returns:
        ``num_tasks`` tasks; x float32 [N, 1, 28, 28], local labels int64 [N]. With two tasks,
        each has 30,000 train and 5,000 test examples.
    """
    classes = fashion_mnist_task_classes(split, seed, num_tasks)
    x_train, y_train = load_fashion_mnist("train", root=root, normalize=normalize)
    x_test, y_test = load_fashion_mnist("test", root=root, normalize=normalize)
    prefix = "fashion_mnist-halves" if split == "halves" else f"fashion_mnist-random{seed}"
    names = [f"{prefix}-{'_'.join(map(str, c))}" for c in classes]
    return split_tasks(
        x_train,
        y_train,
        x_test,
        y_test,
        classes,
        num_classes=len(FASHION_MNIST_CLASSES),
        names=names,
    )


def class_balanced_subset(
    x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``per_class`` examples of every class present in ``y``, without replacement.

    Deterministic for a given ``seed`` (a dedicated :class:`torch.Generator`, classes visited in
    ascending order). The chosen examples keep their original relative order.

    Args:
        x: [N, ...] inputs. y: int [N] labels.
        per_class: examples to keep per class (>= 1).
        seed: random seed.

    Returns:
        x_sub [C * per_class, ...] and y_sub [C * per_class] (same dtype as y), where C is the
        number of distinct labels in ``y``.

    Raises:
        ConfigError: ``per_class`` < 1.
        DataError: mismatched tensors, empty data, or a class with fewer than ``per_class``
            examples.
    """
    _check_pair(x, y, "class_balanced_subset")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class must be an integer >= 1, got {per_class!r}.")
    if y.numel() == 0:
        raise DataError("class_balanced_subset got no examples; pass non-empty x and y.")
    generator = torch.Generator().manual_seed(seed)
    y_cpu = y.detach().cpu()
    classes, counts = torch.unique(y_cpu, sorted=True, return_counts=True)
    too_small = [(int(c), int(n)) for c, n in zip(classes, counts) if n < per_class]
    if too_small:
        raise DataError(
            f"class_balanced_subset: classes (label, count) {too_small} have fewer than "
            f"per_class={per_class} examples; lower per_class to at most {int(counts.min())}."
        )
    chosen: list[torch.Tensor] = []
    for c in classes:
        idx = torch.nonzero(y_cpu == c, as_tuple=True)[0]
        pick = torch.randperm(idx.numel(), generator=generator)[:per_class]
        chosen.append(idx[pick])
    index = torch.sort(torch.cat(chosen)).values.to(y.device)
    return x[index.to(x.device)], y[index]
