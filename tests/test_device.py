"""Device and dtype cleanliness (issue 21), pinned without a GPU.

A merge on a GPU failed wherever the engine made a tensor on the CPU and combined it with the
models' (index tensors of the oracle, merge matrices of the parameter rewrite, REPAIR's
corrections, the unmerge matrices of a partial merge). A CPU-only machine has one device, so
these tests emulate a second one: `on_second_device()` runs code under a dispatch mode in which
tensors can live on the `lazy` device (a device type torch can name without its backend; the
values stay on the CPU inside a wrapper), and every op refuses, as CUDA does, to combine a
tensor on that device with a CPU tensor of one or more dimensions (a CPU scalar is allowed,
and so are copies between devices). Factories asked for that device make tensors there,
`.cpu()` gives plain ones back, `.numpy()` of a tensor there fails as it does on a GPU.

What it cannot show: the torch.export front end (it does not capture wrapper tensors), kernels
that differ on a real GPU, and device memory. benchmarks/device_check.py runs the real thing
on a GPU.

bf16 and fp16 models merge on the CPU (the rewrite in float64, statistics in float64, the
merged tensors in the models' dtype).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import graphmerge as gm
from graphmerge.io.folder import load_module, save_module
from graphmerge.lab import zoo
from graphmerge.match import statistics
from graphmerge.surgery.deepen import deepen

torch.set_num_threads(1)

SECOND = torch.device("lazy", 0)
aten = torch.ops.aten
_ACROSS = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
           aten._has_compatible_shallow_copy_type.default}


class DeviceMix(RuntimeError):
    """An op combined tensors of two devices (what CUDA raises as a RuntimeError)."""


class Elsewhere(torch.Tensor):
    """A tensor that says it is on SECOND; its values are `inner`, on the CPU."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "Elsewhere":
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=SECOND,
            requires_grad=inner.requires_grad)
        out.inner = inner
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __tensor_flatten__(self):  # module._apply swaps such tensors whole (dtype casts)
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return Elsewhere(inner_tensors["inner"])

    def __repr__(self) -> str:
        return f"Elsewhere({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _second(device) -> bool:
    return device is not None and torch.device(device).type == SECOND.type


def _run(func, args, kwargs):
    """`func` on the CPU values, refusing a device mix; results on SECOND when an input was
    there or a factory asked for it."""
    flat = tree_flatten((args, kwargs))[0]
    there = [t for t in flat if isinstance(t, Elsewhere)]
    cpu = [t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, Elsewhere)
           and t.dim() > 0]
    if there and cpu and func not in _ACROSS:
        raise DeviceMix(f"{func}: a tensor on {SECOND} combined with CPU tensors of shapes "
                        f"{[tuple(t.shape) for t in cpu]}")
    wrap, kwargs = bool(there), dict(kwargs)
    if "device" in kwargs:
        wrap = _second(kwargs["device"])
        kwargs["device"] = torch.device("cpu") if wrap else kwargs["device"]
    same = {id(t.inner): t for t in there}  # in-place ops return their input itself
    plain_args, plain_kwargs = tree_map(lambda t: t.inner if isinstance(t, Elsewhere) else t,
                                        (args, kwargs))
    out = func(*plain_args, **plain_kwargs)
    if not wrap:
        return out

    def back(t):
        if not isinstance(t, torch.Tensor) or isinstance(t, Elsewhere):
            return t
        return same[id(t)] if id(t) in same else Elsewhere(t)
    return tree_map(back, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Constructors(TorchFunctionMode):
    """torch.tensor(..., device=SECOND) builds its value without the dispatcher seeing the
    device: built on the CPU here and wrapped. torch.unravel_index calls torch.tensor with its
    input's device from inside torch: run on the CPU values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        if "device" in kwargs and _second(kwargs["device"]) and not any(
                isinstance(t, Elsewhere) for t in flat):
            out = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return tree_map(lambda t: Elsewhere(t) if type(t) is torch.Tensor else t, out)
        if func is torch.unravel_index:
            plain = tree_map(lambda t: t.inner if isinstance(t, Elsewhere) else t, (args, kwargs))
            return tree_map(lambda t: Elsewhere(t) if type(t) is torch.Tensor else t,
                            func(*plain[0], **plain[1]))
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_second_device():
    with _Constructors(), _Dispatch():
        yield


def moved(module: nn.Module) -> nn.Module:
    """A copy of `module` on SECOND."""
    with on_second_device():
        return copy.deepcopy(module).to(SECOND)


def devices(module: nn.Module) -> set[str]:
    return {str(t.device) for t in module.state_dict().values()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / a.norm())


X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
CALIB = [X[:32], X[32:]]
ONE = [X[:48]]  # one batch: ops on the emulated device cost a Python call each


# -- the emulation itself ------------------------------------------------------------------


def test_the_second_device_refuses_what_cuda_refuses():
    with on_second_device():
        x = torch.randn(6, 4).to(SECOND)
        with pytest.raises(DeviceMix, match="index_select"):  # the oracle's failure on a GPU
            x.index_select(0, torch.arange(3))
        with pytest.raises(DeviceMix, match="mm"):  # the parameter rewrite's
            torch.from_numpy(torch.eye(6).numpy()) @ x
        assert isinstance(x.index_select(0, torch.arange(3, device=x.device)), Elsewhere)
        assert isinstance(x * torch.tensor(2.0), Elsewhere)  # a CPU scalar mixes, as on CUDA
        y = torch.zeros(6, 4, device=x.device)
        y.copy_(torch.ones(6, 4))  # copies between devices are allowed
        assert isinstance(y, Elsewhere) and y.device == SECOND and float(y.sum()) == 24.0
        assert type(x.cpu()) is torch.Tensor
        with pytest.raises(RuntimeError):  # TypeError on a GPU; RuntimeError here
            x.numpy()


# -- merges on the second device -------------------------------------------------------------


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 24),
                         nn.ReLU(), nn.Linear(24, 10)).eval()


def _resnet():
    return zoo.resnet(depths=(1, 1, 1), width=1, stem_stride=2).eval()


def _vit():
    return zoo.vit(dim=32, depth=2, heads=4, mlp_dim=48).eval()


CASES = {
    "mlp/checked": (_mlp, dict(method="zip")),
    "mlp/unchecked": (_mlp, dict(method="permute", check=False)),
    "resnet/repair": (_resnet, dict(method="zip")),
    "resnet/reset/partial": (_resnet, dict(norms="reset", partial=0.5)),
    "resnet/width": (_resnet, dict(width=2.0, norms="none")),
    "vit/heads": (_vit, dict(method="zip")),
    "vit/concat/partial": (_vit, dict(heads="concat", partial=0.5)),
    "vit/refit": (_vit, dict(method="zip", refit=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_merge_on_another_device_stays_there_and_matches_the_cpu_merge(case):
    build, options = CASES[case]
    torch.manual_seed(0)
    model = build()
    twin = gm.permute(model, X[:4], seed=3)
    on_cpu = gm.merge([model, twin], ONE, progress=False, **options)
    with on_second_device():
        result = gm.merge([moved(model), moved(twin)], [x.to(SECOND) for x in ONE],
                          progress=False, **options)
        with torch.no_grad():
            y = result.module(X[:16].to(SECOND)).cpu()
    assert devices(result.module) == {str(SECOND)}
    with torch.no_grad():
        assert _rel(on_cpu.module(X[:16]), y) < 1e-5


def test_merging_across_depths_on_another_device():
    shallow = zoo.resnet(depths=(1, 1, 1), stem_stride=2).eval()
    deep = zoo.resnet(depths=(2, 2, 2), stem_stride=2).eval()
    on_cpu = gm.merge([shallow, deep], ONE, heads="average", check=False, progress=False)
    with on_second_device():
        result = gm.merge([moved(shallow), moved(deep)], [x.to(SECOND) for x in ONE],
                          heads="average", check=False, progress=False)
        assert any(len(set(a.depths)) > 1 for a in result.alignments)
        with torch.no_grad():
            y = result.module(X[:8].to(SECOND)).cpu()
    assert devices(result.module) == {str(SECOND)}
    with torch.no_grad():
        assert _rel(on_cpu.module(X[:8]), y) < 1e-5


def test_the_oracle_and_surgery_on_another_device():
    shallow = zoo.resnet(depths=(1, 1, 1), stem_stride=2).eval()
    deep = zoo.resnet(depths=(2, 2, 2), stem_stride=2).eval()
    vit = _vit()
    with on_second_device():
        x = X[:4].to(SECOND)
        assert gm.check_spaces(moved(vit), x, trials=1).max_output_error < 1e-10
        for model in (moved(shallow), moved(vit)):
            for made in (gm.permute(model, x, seed=1), gm.widen(model, x, extra=0.5, seed=2)):
                assert devices(made) == {str(SECOND)}
        grown = deepen(moved(shallow), x, moved(deep))
        assert devices(grown) == {str(SECOND)}
        with torch.no_grad():
            y = grown(x).cpu()
    with torch.no_grad():
        assert _rel(shallow(X[:4]), y) < 1e-6


def test_a_bf16_merge_on_another_device_keeps_dtype_and_accumulates_in_float64(monkeypatch):
    seen = []
    add = statistics.SpaceStats.add

    def recording(self, rows):
        add(self, rows)
        seen.append((rows[0].dtype, self._sx.dtype, self._sxx.dtype, self._sx.device))
    monkeypatch.setattr(statistics.SpaceStats, "add", recording)
    model = _resnet().to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    twin = gm.permute(model, x[:4], seed=3, rtol=5e-2)
    with on_second_device():
        result = gm.merge([moved(model), moved(twin)], [x[:48].to(SECOND)], progress=False)
        with torch.no_grad():
            y = result.module(x[:16].to(SECOND)).cpu()
    state = result.module.state_dict()
    assert devices(result.module) == {str(SECOND)}
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    assert seen and all(s[0] == torch.bfloat16 and s[1:3] == (torch.float64,) * 2
                        and s[3] == SECOND for s in seen)
    with torch.no_grad():
        assert _rel(model(x[:16]), y) < 2e-2  # bf16 keeps ~3 significant digits


# -- low precision on the CPU ----------------------------------------------------------------

LOW = {
    "mlp/bf16": (_mlp, torch.bfloat16, {}),
    "mlp/fp16": (_mlp, torch.float16, {}),
    "mlp/fp16/partial": (_mlp, torch.float16, dict(partial=0.5)),
    "resnet/bf16": (_resnet, torch.bfloat16, {}),
    "resnet/bf16/partial": (_resnet, torch.bfloat16, dict(partial=0.5)),
    "vit/bf16": (_vit, torch.bfloat16, dict(check=False)),
}


@pytest.mark.parametrize("case", sorted(LOW))
def test_low_precision_models_merge_in_their_dtype(case):
    build, dtype, options = LOW[case]
    torch.manual_seed(0)
    model = build().to(dtype)
    x = X.to(dtype)
    twin = gm.permute(model, x[:4], seed=3, rtol=5e-2)
    result = gm.merge([model, twin], [x[:32], x[32:]], progress=False, **options)
    assert {t.dtype for t in result.module.state_dict().values()
            if t.is_floating_point()} == {dtype}
    with torch.no_grad():
        y, z = model(x[:16]), result.module(x[:16])
    assert z.dtype == dtype and _rel(y, z) < 2e-2


def test_a_bf16_llama_merges_with_its_permuted_copy():
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    import hf_models  # tests/hf_models.py
    model, inputs = hf_models.llama(seed=0)
    model = model.to(torch.bfloat16)
    twin = gm.permute(model, inputs, seed=3, rtol=5e-2)
    result = gm.merge([model, twin], [inputs, inputs], progress=False)
    assert {t.dtype for t in result.module.state_dict().values()
            if t.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        assert _rel(model(*inputs), result.module(*inputs)) < 2e-2


# -- outputs of a module on another device -----------------------------------------------------


def test_export_and_save_take_a_module_on_another_device(tmp_path):
    merged = gm.merge([_mlp(), _mlp()], CALIB, progress=False).module
    elsewhere = moved(merged)
    with on_second_device():
        x = X[:2].to(SECOND)
    before = {k: v.cpu().clone() for k, v in elsewhere.state_dict().items()}
    report = gm.export_onnx(elsewhere, x, tmp_path / "m.onnx")
    assert report.max_abs_diff < 1e-4
    save_module(elsewhere, tmp_path / "saved")
    loaded = load_module(tmp_path / "saved")
    assert devices(loaded) == {"cpu"}
    with torch.no_grad():
        assert _rel(merged(X[:8]), loaded(X[:8])) < 1e-6
    after = elsewhere.state_dict()  # the caller's module is where and what it was
    assert devices(elsewhere) == {str(SECOND)}
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
