"""Tests of the model zoo: shapes, fx tracing fidelity, config validation, registry, sizes,
and gm.permute moving every free tensor of every family."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import graphmerge as gm
from graphmerge.errors import ConfigError
from graphmerge.graph.oracle import draw_permutations, output_error
from graphmerge.graph.tensors import canonical_names, named_tensors
from graphmerge.lab.zoo.mlp import MLP, mlp
from graphmerge.lab.zoo.registry import COMMUNITY, FAMILIES, build, builtin, example_input
from graphmerge.lab.zoo.resnet import BasicBlock, ResNet, resnet
from graphmerge.lab.zoo.vgg import VGG, vgg
from graphmerge.lab.zoo.vit import ViT, vit


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_bn(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial running stats and affine params so eval mode is a real test."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _check_trace(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """Eager output has shape [B, num_classes]; the fx-traced module reproduces it in eval mode."""
    _randomize_bn(model)
    model.eval()
    with torch.no_grad():
        eager = model(x)
    assert eager.shape == (x.shape[0], num_classes)
    assert torch.isfinite(eager).all()
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    call_ops = [n for n in traced.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert len(call_ops) > 0
    traced.eval()
    with torch.no_grad():
        out = traced(x)
    torch.testing.assert_close(out, eager)


# ----------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("hidden", [(32,), (64, 32, 16)])
def test_mlp_shape_and_trace(hidden: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = mlp(hidden=hidden, num_classes=7)
    assert isinstance(model, MLP)
    linears = [m for m in model.layers if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [*hidden, 7]
    assert linears[0].in_features == 784
    _check_trace(model, torch.randn(3, 1, 28, 28), 7)


def test_mlp_custom_in_features() -> None:
    model = mlp(hidden=(8,), num_classes=2, in_features=12)
    assert model(torch.randn(5, 12)).shape == (5, 2)


@pytest.mark.parametrize(
    "kwargs",
    [{"hidden": (0,)}, {"hidden": (16, -2)}, {"hidden": 16}, {"num_classes": 0}, {"in_features": 1.5}],
)
def test_mlp_invalid(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        mlp(**kwargs)


# ----------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    ("depths", "width", "stem_stride"),
    [((1, 1, 1), 1, 1), ((2, 2, 2), 1, 2), ((1, 3, 2), 2, 2), ((2, 2, 2), 2, 1), ((1, 3, 2), 1, 1)],
)
def test_resnet_shape_and_trace(depths: tuple[int, int, int], width: int, stem_stride: int) -> None:
    torch.manual_seed(0)
    model = resnet(depths=depths, width=width, num_classes=10, stem_stride=stem_stride)
    assert isinstance(model, ResNet)
    assert [len(stage) for stage in model.stages] == list(depths)
    assert model.head.in_features == 64 * width
    assert model.stem[0].stride == (stem_stride, stem_stride)
    _check_trace(model, torch.randn(2, 1, 28, 28), 10)


def test_resnet_structure() -> None:
    model = resnet(depths=(2, 1, 1), width=2)
    assert isinstance(model.stages, nn.ModuleList)
    assert all(isinstance(stage, nn.Sequential) for stage in model.stages)
    blocks = [b for stage in model.stages for b in stage]
    assert all(isinstance(b, BasicBlock) for b in blocks)
    # stage 0 block 0: 32 -> 32, stride 1: identity shortcut; the others of stage 0 too.
    assert isinstance(model.stages[0][0].shortcut, nn.Identity)
    assert isinstance(model.stages[0][1].shortcut, nn.Identity)
    # first block of stages 1 and 2 changes channels and strides: conv+bn shortcut.
    for s, c_out in ((1, 64), (2, 128)):
        sc = model.stages[s][0].shortcut
        assert isinstance(sc, nn.Sequential)
        assert isinstance(sc[0], nn.Conv2d) and isinstance(sc[1], nn.BatchNorm2d)
        assert sc[0].kernel_size == (1, 1) and sc[0].stride == (2, 2)
        assert sc[0].out_channels == c_out
        assert model.stages[s][0].conv1.stride == (2, 2)
    for b in blocks:
        for name in ("conv1", "bn1", "conv2", "bn2", "shortcut"):
            assert hasattr(b, name)


def test_resnet_in_channels_and_width() -> None:
    # The stem maps in_channels to 16*width, so stage 0 keeps identity shortcuts.
    model = resnet(depths=(1, 1, 1), width=3, in_channels=3)
    assert model.stem[0].in_channels == 3 and model.stem[0].out_channels == 48
    assert isinstance(model.stages[0][0].shortcut, nn.Identity)
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 10)


def test_resnet20_param_count() -> None:
    model = resnet(depths=(3, 3, 3), width=1)
    n = _num_params(model)
    assert n == 272_186
    assert 0.26e6 < n < 0.28e6


def test_resnet_param_counts_by_width() -> None:
    assert _num_params(resnet((2, 2, 2), width=1)) == 174_970
    assert _num_params(resnet((2, 2, 2), width=2)) == 696_042
    assert _num_params(resnet((2, 2, 2), width=4)) == 2_776_522


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depths": (2, 2)},
        {"depths": (2, 2, 2, 2)},
        {"depths": (2, 0, 2)},
        {"depths": (2, -1, 2)},
        {"depths": (2, 2.0, 2)},
        {"depths": 3},
        {"width": 0},
        {"width": 1.5},
        {"width": True},
        {"stem_stride": 0},
        {"num_classes": -1},
        {"in_channels": 0},
    ],
)
def test_resnet_invalid(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="resnet"):
        resnet(**kwargs)


# ----------------------------------------------------------------------------- VGG


@pytest.mark.parametrize(
    ("channels", "flat"),
    [((32, "M", 64, "M", 128), 128 * 7 * 7), ((16, 32), 32 * 28 * 28), (("M", 8, "M", "M", 16), 16 * 3 * 3)],
)
def test_vgg_shape_and_trace(channels: tuple, flat: int) -> None:
    torch.manual_seed(0)
    model = vgg(channels=channels, hidden=32, num_classes=10)
    assert isinstance(model, VGG)
    assert model.classifier[0].in_features == flat
    n_pools = sum(isinstance(m, nn.MaxPool2d) for m in model.features)
    assert n_pools == channels.count("M")
    _check_trace(model, torch.randn(2, 1, 28, 28), 10)


def test_vgg_traced_graph_has_flatten_and_no_pooling_to_1x1() -> None:
    model = vgg()
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert torch.flatten in targets
    assert not any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in model.modules())


def test_vgg_default_param_count() -> None:
    assert _num_params(vgg()) == 1_701_354


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (32, "X")},
        {"channels": (0,)},
        {"channels": (16, -4)},
        {"channels": "M"},
        {"channels": ("M",) * 5},  # 28 -> 14 -> 7 -> 3 -> 1 -> cannot pool again
        {"hidden": 0},
        {"num_classes": 0},
        {"in_channels": -3},
    ],
)
def test_vgg_invalid(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="vgg"):
        vgg(**kwargs)


# ----------------------------------------------------------------------------- ViT


@pytest.mark.parametrize(("depth", "patch_size", "heads"), [(1, 7, 4), (2, 7, 2), (2, 4, 8)])
def test_vit_shape_and_trace(depth: int, patch_size: int, heads: int) -> None:
    torch.manual_seed(0)
    model = vit(patch_size=patch_size, dim=32, depth=depth, heads=heads, mlp_dim=48, num_classes=5)
    assert isinstance(model, ViT)
    assert len(model.blocks) == depth
    assert model.pos_embed.shape == (1, (28 // patch_size) ** 2 + 1, 32)
    assert model.cls_token.shape == (1, 1, 32)
    _check_trace(model, torch.randn(3, 1, 28, 28), 5)


def test_vit_attention_is_hand_written() -> None:
    model = vit(depth=1)
    attn = model.blocks[0].attn
    for name in ("q", "k", "v", "proj"):
        assert isinstance(getattr(attn, name), nn.Linear)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert torch.nn.functional.scaled_dot_product_attention not in targets
    assert torch.cat in targets


def test_vit_cls_and_pos_not_zero() -> None:
    torch.manual_seed(0)
    model = vit()
    assert model.cls_token.abs().sum() > 0
    assert model.pos_embed.abs().sum() > 0
    assert model.pos_embed.std() < 0.1


def test_vit_batch_independent() -> None:
    """Each image's logits depend only on that image (cls expand / view use the batch size correctly)."""
    torch.manual_seed(0)
    model = vit(depth=1).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 30, "heads": 4},
        {"image_size": 28, "patch_size": 5},
        {"depth": 0},
        {"heads": 0},
        {"mlp_dim": -1},
        {"patch_size": 0},
    ],
)
def test_vit_invalid(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="vit"):
        vit(**kwargs)


# ----------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(FAMILIES) == {"mlp", "resnet", "vgg", "vit"}


@pytest.mark.parametrize("name", ["mlp", "resnet", "vgg", "vit"])
def test_build_and_example_input(name: str) -> None:
    torch.manual_seed(0)
    model = build(name)
    x = example_input(name, batch=3)
    assert x.shape == (3, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (3, 10)


def test_build_passes_kwargs() -> None:
    model = build("resnet", depths=(1, 1, 1), width=2, num_classes=4)
    assert isinstance(model, ResNet)
    assert model.head.out_features == 4 and model.head.in_features == 128


def test_example_input_follows_kwargs() -> None:
    assert example_input("vit", batch=1, in_channels=3, image_size=32).shape == (1, 3, 32, 32)
    assert example_input("mlp", batch=2, in_features=20).shape == (2, 20)


def test_build_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        build("nope")
    msg = str(info.value)
    assert "nope" in msg
    for name in ("mlp", "resnet", "vgg", "vit"):
        assert name in msg


def test_example_input_unknown_name_and_bad_batch() -> None:
    with pytest.raises(ConfigError, match="valid names"):
        example_input("nope")
    with pytest.raises(ConfigError):
        example_input("mlp", batch=0)


# ----------------------------------------------------------------------------- permutation oracle

# families torch.fx cannot trace (control flow on a Proxy); torch.export captures them
_FX_UNTRACEABLE = {"gpt", "vgg_convhead"}
_TINY = {"resnet": {"depths": (1, 1, 1), "stem_stride": 2}}


def _off_defaults(model: nn.Module) -> nn.Module:
    """Every float parameter and buffer nudged by seeded noise: a norm's weight of ones, a
    bias or running mean of zeros, is the same after any permutation and would hide a miss."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.1 * torch.rand(t.shape, generator=g))  # > 0: running_var stays positive
    return model.eval()


def _permuted_tiny(name: str, frontend: str
                   ) -> tuple[nn.Module, nn.Module, tuple, set[str], set[str]]:
    """(model, gm.permute'd copy, inputs, canonical names of the tensors that moved, those that
    must move: an axis in a space whose drawn permutation is not the identity)."""
    torch.manual_seed(0)
    model, x = builtin(name, batch=2, **_TINY.get(name, {}))
    model, x = _off_defaults(model), (x,)
    table = gm.trace(model, x, frontend=frontend).space_table
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    perms = draw_permutations(table, torch.Generator().manual_seed(1))  # what permute drew

    def moves(sid: int) -> bool:
        perm = perms[sid]
        return not torch.equal(perm, torch.arange(perm.shape[-1]).expand_as(perm))

    canonical = canonical_names(model)
    before, after = named_tensors(model), named_tensors(twin)
    moved = {canonical[n] for n, t in before.items() if not torch.equal(t, after[n])}
    expected = {n for n, dims in table.param_axes.items()
                if n in before and any(moves(sid) for sid in dims.values())}
    return model, twin, x, moved, expected


def _every_family() -> list:
    cases = []
    for name in sorted([*FAMILIES, *COMMUNITY]):
        cases.append(pytest.param(name, "export", id=f"{name}-export"))
        if name not in _FX_UNTRACEABLE:
            cases.append(pytest.param(name, "fx", id=f"{name}-fx"))
    return cases


@pytest.mark.parametrize("name, frontend", _every_family())
def test_permute_moves_every_tensor_of_a_free_space(name: str, frontend: str) -> None:
    """Issue 20's acceptance, on every registered family: gm.permute moves weights, every
    parameter or buffer with an axis in a permuted space moves, nothing else does, and the
    outputs stay the same."""
    model, twin, x, moved, expected = _permuted_tiny(name, frontend)
    params = {n for n, p in model.named_parameters() if p.is_floating_point()}
    assert moved & params, "gm.permute changed no parameter"
    assert moved == expected, (f"not moved: {sorted(expected - moved)[:5]}; moved outside "
                               f"the spaces: {sorted(moved - expected)[:5]}")
    assert output_error(model, twin, x) < 1e-4


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", ["gncnn", "wsconv"])
def test_permute_moves_group_norm_affine(name: str, frontend: str) -> None:
    """GroupNorm's weight and bias move with their channels (its groups keep their order)."""
    model, twin, x, moved, _ = _permuted_tiny(name, frontend)
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert norms
    for n, m in norms:
        assert {f"{n}.weight", f"{n}.bias"} <= moved, n
    assert output_error(model, twin, x) < 1e-4
