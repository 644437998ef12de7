"""Tests of graphmerge.lab.training (training loop, prediction, cache) and graphmerge.lab.evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from graphmerge.errors import ConfigError, DataError
from graphmerge.lab import zoo
from graphmerge.lab.evaluation import (
    ensemble_logits,
    evaluate_multitask,
    joint_accuracy,
    single_model_logits,
    task_accuracies,
)
from graphmerge.lab.training import (
    augment_batch,
    cached_model,
    config_hash,
    predict_logits,
    train_classifier,
)

# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _blobs(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated 2-D Gaussian blobs: x float [n, 2], y int64 [n] in 0..2."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 2.0], [0.0, -3.0]])
    y = torch.randint(0, 3, (n,), generator=gen)
    x = centers[y] + 0.6 * torch.randn(n, 2, generator=gen)
    return x, y


def _small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(predict_logits(model, x), y))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_reduces_loss_and_fits(optimizer: str) -> None:
    x, y = _blobs()
    model = _small_mlp()
    before = _loss(model, x, y)
    out = train_classifier(
        model, x, y, epochs=8, batch_size=32, optimizer=optimizer, progress=False
    )
    assert out is model and not model.training
    assert _loss(model, x, y) < 0.5 * before
    x_test, y_test = _blobs(300, seed=1)
    accuracy = (predict_logits(model, x_test).argmax(1) == y_test).float().mean()
    assert accuracy > 0.95


def test_training_small_resnet_on_images() -> None:
    """A tiny ResNet learns a synthetic 2-class image task (bright left vs right half)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=gen)
    x = 0.3 * torch.randn(256, 1, 12, 12, generator=gen)
    x[y == 0, :, :, :6] += 1.0
    x[y == 1, :, :, 6:] += 1.0
    model = zoo.resnet(depths=(1, 1, 1), num_classes=2, stem_stride=2)
    train_classifier(model, x, y, epochs=3, batch_size=32, progress=False)
    assert (predict_logits(model, x).argmax(1) == y).float().mean() > 0.95


def test_training_is_deterministic_and_keeps_global_rng() -> None:
    x, y = _blobs(200)
    weights = []
    for _ in range(2):
        torch.manual_seed(5)  # same initial weights
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        state_before = torch.get_rng_state()
        train_classifier(model, x, y, epochs=2, batch_size=16, seed=3, progress=False)
        assert torch.equal(torch.get_rng_state(), state_before)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))

    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    train_classifier(other, x, y, epochs=2, batch_size=16, seed=4, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], other.parameters()))


def _crops(image: torch.Tensor) -> list[torch.Tensor]:
    """All 25 crops x 2 flips of one image [C, H, W] padded by 2 (replicate)."""
    _, h, w = image.shape
    padded = nn.functional.pad(image[None], (2, 2, 2, 2), mode="replicate")[0]
    views = [padded[:, dy : dy + h, dx : dx + w] for dy in range(5) for dx in range(5)]
    return views + [v.flip(-1) for v in views]


def test_augmentation_is_a_crop_and_flip_per_image() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8)  # 3 channels: every channel must get the same crop and flip
    outs = [augment_batch(x, gen) for _ in range(5)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        for b in range(x.shape[0]):
            assert any(torch.equal(out[b], crop) for crop in _crops(x[b]))
    assert any(not torch.equal(out, x) for out in outs)
    with pytest.raises(DataError):
        augment_batch(torch.randn(4, 8), gen)


def test_training_with_augmentation_runs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 10, 10, generator=gen)
    y = torch.randint(0, 2, (64,), generator=gen)
    model = zoo.resnet(depths=(1, 1, 1), num_classes=2, stem_stride=2)
    train_classifier(model, x, y, epochs=1, batch_size=16, augment=True, progress=False)
    assert predict_logits(model, x).shape == (64, 2)
    with pytest.raises(ConfigError, match="augment"):
        train_classifier(_small_mlp(), *_blobs(20), epochs=1, augment=True, progress=False)


def test_training_rejects_bad_inputs() -> None:
    x, y = _blobs(20)
    with pytest.raises(DataError, match="labels"):
        train_classifier(_small_mlp(), x, y.float(), progress=False)
    with pytest.raises(DataError):
        train_classifier(_small_mlp(), x, y[:10], progress=False)
    with pytest.raises(DataError, match="outputs"):
        train_classifier(_small_mlp(), x, y + 5, progress=False)
    with pytest.raises(ConfigError, match="optimizer"):
        train_classifier(_small_mlp(), x, y, optimizer="lbfgs", progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        train_classifier(_small_mlp(), x, y, epochs=0, progress=False)


def test_predict_logits_batches_and_tuples() -> None:
    model = zoo.tiny_bert_classifier(num_classes=3)
    model.train()
    ids = torch.randint(1, 100, (7, 5))
    mask = torch.ones(7, 5, dtype=torch.int64)
    logits = predict_logits(model, (ids, mask), batch_size=3)
    assert logits.shape == (7, 3)
    assert model.training  # flag restored
    model.eval()
    with torch.no_grad():
        assert torch.allclose(logits, model(ids, mask), atol=1e-6)


def test_cached_model_trains_once_then_loads(tmp_path: Path) -> None:
    x, y = _blobs(200)
    calls: list[int] = []

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _small_mlp()

    def train(model: nn.Module) -> nn.Module:
        calls.append(1)
        return train_classifier(model, x, y, epochs=2, batch_size=32, progress=False)

    key = {"model": "mlp16", "seed": 0, "epochs": 2, "classes": (0, 1, 2)}
    first = cached_model(key, build, train, tmp_path / "cache")
    digest = config_hash(key)
    assert (tmp_path / "cache" / f"{digest}.safetensors").is_file()
    sidecar = json.loads((tmp_path / "cache" / f"{digest}.json").read_text())
    assert sidecar["key"] == {"model": "mlp16", "seed": 0, "epochs": 2, "classes": [0, 1, 2]}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        f"{digest}.json",
        f"{digest}.safetensors",
    ]

    reordered = {"classes": [0, 1, 2], "epochs": 2, "seed": 0, "model": "mlp16"}
    second = cached_model(reordered, build, train, tmp_path / "cache")
    assert len(calls) == 1  # loaded, not retrained
    assert not second.training
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)

    cached_model({**key, "seed": 1}, build, train, tmp_path / "cache")
    assert len(calls) == 2  # a different key trains again
    with pytest.raises(ConfigError, match="JSON"):
        cached_model({"x": object()}, build, train, tmp_path / "cache")


def test_cached_model_rejects_weights_of_another_architecture(tmp_path: Path) -> None:
    key = {"model": "a"}
    cached_model(key, _small_mlp, lambda m: m, tmp_path)
    with pytest.raises(ConfigError, match="do not fit"):
        cached_model(key, lambda: nn.Linear(2, 3), lambda m: m, tmp_path)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------

# Two tasks: task 0 owns global classes (3, 1), task 1 owns (0, 2, 4); so column j means
# global class [3, 1, 0, 2, 4][j].
TASKS = [(3, 1), (0, 2, 4)]
LOGITS = torch.tensor(
    [
        [5.0, 0.0, 1.0, 0.0, 0.0],  # argmax col 0 -> class 3; task-0 slice argmax -> 3
        [0.0, 1.0, 0.0, 0.0, 9.0],  # argmax col 4 -> class 4; task-0 slice argmax -> 1
        [0.0, 0.0, 2.0, 3.0, 0.0],  # argmax col 3 -> class 2; task-1 slice argmax -> 2
        [7.0, 0.0, 0.0, 0.0, 1.0],  # argmax col 0 -> class 3; task-1 slice argmax -> 4
    ]
)
Y = torch.tensor([3, 1, 0, 4])  # tasks 0, 0, 1, 1


def test_joint_accuracy_exact() -> None:
    # predictions 3, 4, 2, 3 vs labels 3, 1, 0, 4: only the first is right
    assert joint_accuracy(LOGITS, Y, TASKS) == 0.25


def test_task_accuracies_exact() -> None:
    # task 0: samples 0, 1 -> predict 3 (right), 1 (right)
    # task 1: samples 2, 3 -> predict 2 (wrong), 4 (right)
    assert task_accuracies(LOGITS, Y, TASKS) == [1.0, 0.5]


def test_evaluate_multitask_exact() -> None:
    result = evaluate_multitask(LOGITS, Y, TASKS)
    assert result == {"joint": 0.25, "per_task": [1.0, 0.5], "task_mean": 0.75}


def test_task_without_samples_is_nan() -> None:
    result = evaluate_multitask(LOGITS[:2], Y[:2], TASKS)
    assert result["per_task"][0] == 1.0 and math.isnan(result["per_task"][1])
    assert result["task_mean"] == 1.0


def test_evaluation_rejects_bad_inputs() -> None:
    with pytest.raises(DataError, match="shape"):
        joint_accuracy(LOGITS[:, :4], Y, TASKS)
    with pytest.raises(DataError, match="no task"):
        joint_accuracy(LOGITS, torch.tensor([3, 1, 0, 7]), TASKS)
    with pytest.raises(ConfigError, match="disjoint"):
        joint_accuracy(LOGITS, Y, [(3, 1), (1, 2, 4)])
    with pytest.raises(DataError, match="labels"):
        joint_accuracy(LOGITS, Y[:3], TASKS)


def test_single_model_logits_layout() -> None:
    task1 = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.0, 0.0]])  # model of task 1, 3 classes
    embedded = single_model_logits(task1, 1, TASKS)
    inf = math.inf
    assert torch.equal(
        embedded,
        torch.tensor([[-inf, -inf, 0.5, 2.0, -1.0], [-inf, -inf, 3.0, 0.0, 0.0]]),
    )
    # Scored jointly, the model can only predict its own classes: 2 (right) and 0 (right).
    assert joint_accuracy(embedded, torch.tensor([2, 0]), TASKS) == 1.0
    assert joint_accuracy(embedded, torch.tensor([2, 3]), TASKS) == 0.5
    with pytest.raises(DataError):
        single_model_logits(task1, 0, TASKS)  # task 0 has 2 classes, not 3
    with pytest.raises(ConfigError):
        single_model_logits(task1, 2, TASKS)


def test_ensemble_logits_layout() -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 1.0], [10.0, 0.0, 0.0]])
    out = ensemble_logits([a, b])
    assert out.shape == (2, 5)
    assert torch.allclose(out[:, :2], torch.log_softmax(a, dim=1))
    assert torch.allclose(out[:, 2:], torch.log_softmax(b, dim=1))
    # Row 0: model a is confident (p=0.88) and b is uniform (p=1/3): class of column 0 wins.
    # Row 1: a is uniform (p=0.5), b is confident in its first class (p~1): column 2 wins.
    assert out.argmax(1).tolist() == [0, 2]
    # Within-model rankings are unchanged, so task accuracies equal the individual models'.
    y = torch.tensor([3, 0])
    assert task_accuracies(out, y, TASKS) == [1.0, 1.0]
    assert joint_accuracy(out, y, TASKS) == 1.0
    with pytest.raises(DataError, match="rows"):
        ensemble_logits([a, b[:1]])
