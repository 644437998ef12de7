"""The community zoo families (styles the engine was not designed around): shapes, finiteness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo import COMMUNITY, FAMILIES, build, builtin, example_input

OUTPUT_SHAPES = {
    "mobilenet": lambda b: (b, 10),
    "densenet": lambda b: (b, 10),
    "unet": lambda b: (b, 3, 28, 28),
    "gpt": lambda b: (b, 12, 50),
    "mha": lambda b: (b, 10),
    "convnext": lambda b: (b, 10),
    "senet": lambda b: (b, 10),
    "functional": lambda b: (b, 10),
}


def test_community_names() -> None:
    assert set(COMMUNITY) == set(OUTPUT_SHAPES)
    assert not set(COMMUNITY) & set(FAMILIES)


@pytest.mark.parametrize("name", sorted(OUTPUT_SHAPES))
@pytest.mark.parametrize("batch", [1, 2])
def test_forward_shape_and_finite(name: str, batch: int) -> None:
    model = build(name).eval()
    assert sum(p.numel() for p in model.parameters()) <= 100_000
    x = example_input(name, batch=batch)
    with torch.no_grad():
        out = model(x)
    assert out.shape == OUTPUT_SHAPES[name](batch)
    assert torch.isfinite(out).all()


def test_gpt_input_and_tied_head() -> None:
    model, x = builtin("gpt", batch=2)
    assert x.dtype == torch.long and x.shape == (2, 12) and int(x.max()) < 50
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names  # one shared Parameter


def test_gpt_is_causal() -> None:
    model = build("gpt").eval()
    x = example_input("gpt", batch=1)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def test_functional_has_no_layer_modules() -> None:
    model = build("functional")
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    assert [tuple(p.shape) for p in model.parameters()][2] == (7, 8, 3, 3)  # 7 channels on 7x7


@pytest.mark.parametrize("name, kwargs", [
    ("mobilenet", {"depths": (1, 2)}), ("mobilenet", {"expand": 0}),
    ("densenet", {"growth": 0}), ("densenet", {"block_layers": ()}),
    ("unet", {"base": -1}), ("gpt", {"n_head": 3}), ("gpt", {"vocab_size": 1.5}),
    ("mha", {"heads": 3}), ("mha", {"patch_size": 5}), ("convnext", {"depths": (1,)}),
    ("convnext", {"layer_scale": "x"}), ("senet", {"reduction": 0}),
    ("functional", {"image_size": 30}), ("functional", {"c2": True}),
])
def test_invalid_arguments(name: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=name):
        build(name, **kwargs)


def test_unknown_name_lists_community() -> None:
    with pytest.raises(ConfigError, match="convnext"):
        build("nope")
