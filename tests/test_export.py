"""Tests of graphmerge.export: checked ONNX export, atomic writes, safetensors folders."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphmerge.errors import ConfigError, GraphmergeError
from graphmerge.io import onnx as onnx_io
from graphmerge.io.folder import load_state, save_module
from graphmerge.io.onnx import ExportReport, export_onnx
from graphmerge.lab import zoo


def _resnet() -> nn.Module:
    return zoo.resnet(depths=(1, 1, 1), num_classes=5).eval()


def _bert_inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (batch, 9), generator=gen)  # int64 [B, T]
    mask = torch.ones(batch, 9, dtype=torch.int64)
    mask[0, 6:] = 0  # one padded sequence
    return ids, mask


# name -> (model factory, example inputs factory, inputs of another batch size)
CASES = {
    "resnet": (_resnet, lambda: torch.randn(2, 1, 28, 28), lambda: torch.randn(5, 1, 28, 28)),
    "mlp": (
        lambda: zoo.mlp(hidden=(32, 16), num_classes=5),
        lambda: torch.randn(1, 1, 28, 28),  # batch 1 must still give a dynamic batch axis
        lambda: torch.randn(4, 1, 28, 28),
    ),
    "vgg": (
        lambda: zoo.vgg(channels=(8, "M", 16), hidden=32, num_classes=5),
        lambda: torch.randn(3, 1, 28, 28),
        lambda: torch.randn(6, 1, 28, 28),
    ),
    "vit": (
        lambda: zoo.vit(dim=32, depth=1, heads=2, mlp_dim=64, num_classes=5),
        lambda: torch.randn(2, 1, 28, 28),
        lambda: torch.randn(5, 1, 28, 28),
    ),
    "bert": (lambda: zoo.tiny_bert_classifier(), lambda: _bert_inputs(3), lambda: _bert_inputs(6)),
    "fx_resnet": (
        lambda: torch.fx.symbolic_trace(_resnet()),
        lambda: torch.randn(2, 1, 28, 28),
        lambda: torch.randn(4, 1, 28, 28),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_torch_and_batch_is_dynamic(name: str, tmp_path: Path) -> None:
    make_model, make_inputs, make_other = CASES[name]
    model = make_model()
    model.train()  # export_onnx must switch to eval and restore the flag
    inputs = make_inputs()
    path = tmp_path / f"{name}.onnx"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(model, inputs, path)

    assert isinstance(report, ExportReport)
    assert model.training
    assert report.path == path and path.is_file()
    assert report.max_abs_diff < 1e-4 and report.max_rel_diff < 1e-4
    assert len(set(report.batch_sizes)) == 2
    assert report.dynamic_batch and not any("export_onnx" in str(w.message) for w in caught)
    assert report.opset >= 18
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # single file, no leftovers
    proto = onnx.load(str(path))
    external = onnx.TensorProto.EXTERNAL
    assert not any(init.data_location == external for init in proto.graph.initializer)
    for graph_input in proto.graph.input:
        assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension

    # Independently run the file on a batch of another size.
    other = make_other()
    other = other if isinstance(other, tuple) else (other,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(report.input_names, other)}
    (got,) = session.run(list(report.output_names), feeds)
    model.eval()
    with torch.no_grad():
        want = model(*other).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4


def test_export_bert_reports_int64_inputs(tmp_path: Path) -> None:
    report = export_onnx(zoo.tiny_bert_classifier(), _bert_inputs(2), tmp_path / "b.onnx")
    assert report.input_names == ("input_ids", "attention_mask")
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)", "tensor(int64)"]


def test_failed_export_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(model, args, f=None, **kwargs):  # writes half a file, then fails
        Path(f).write_bytes(b"partial")
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    path = tmp_path / "model.onnx"
    with pytest.raises(GraphmergeError, match="exporter exploded"):
        export_onnx(_resnet(), torch.randn(2, 1, 28, 28), path)
    assert list(tmp_path.iterdir()) == []

    path.write_bytes(b"previous export")
    with pytest.raises(GraphmergeError):
        export_onnx(_resnet(), torch.randn(2, 1, 28, 28), path)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class _Noisy(nn.Module):
    """x [B, F] -> x + U(0, 1) noise: ONNX and torch draw different numbers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_diff_above_tolerance_raises_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "noisy.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(GraphmergeError, match=r"max abs diff .* relative error .*atol=0\.0001"):
        export_onnx(_Noisy(), torch.randn(3, 4), path)
    assert path.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["noisy.onnx"]


def _large_scale_mlp() -> nn.Module:
    """A random MLP whose weights are scaled by 1e4: outputs of order 1e7-1e8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1e4)
    return model.eval()


def test_large_outputs_pass_the_relative_check(tmp_path: Path) -> None:
    """float32 rounding on outputs of 1e8 is several units in absolute terms but ~1e-7
    relative to their scale: the export is accepted, and the report says both."""
    model, x = _large_scale_mlp(), torch.randn(4, 16)
    assert float(model(x).abs().max()) > 1e6
    report = export_onnx(model, x, tmp_path / "big.onnx")
    assert report.dynamic_batch and report.batch_sizes == (4, 9) and report.notes == ()
    assert report.max_rel_diff < 1e-5
    if report.max_abs_diff > 1e-4:  # what the old absolute check refused
        with pytest.raises(GraphmergeError, match="relative error"):
            export_onnx(model, x, tmp_path / "abs.onnx", rtol=0.0)


@pytest.mark.parametrize("make", [_large_scale_mlp, _resnet], ids=["large", "resnet"])
def test_wrong_export_is_still_refused_naming_the_relative_error(
    make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An onnxruntime result 1% off torch's is refused whatever the outputs' scale."""
    real = onnx_io._run_ort
    monkeypatch.setattr(onnx_io, "_run_ort",
                        lambda *args, **kwargs: [g * 1.01 for g in real(*args, **kwargs)])
    x = torch.randn(4, 16) if make is _large_scale_mlp else torch.randn(2, 1, 28, 28)
    with pytest.raises(GraphmergeError, match=r"relative error of 0\.01 of its scale"):
        export_onnx(make(), x, tmp_path / "wrong.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_rtol_is_refused(tmp_path: Path) -> None:
    for rtol in (-1e-3, "1e-4", True, float("nan")):
        with pytest.raises(ConfigError, match="rtol"):
            export_onnx(_resnet(), torch.randn(2, 1, 28, 28), tmp_path / "x.onnx", rtol=rtol)
    assert list(tmp_path.iterdir()) == []


def _fixed_batch_warnings(caught: list) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and "fixed" in str(w.message)]


def test_dynamic_batch_failure_falls_back_to_a_fixed_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no dynamic export can be written, the example's batch size is fixed in the file,
    checked in onnxruntime, and one warning line says so."""
    real = onnx_io._write_onnx

    def no_dynamic(module, trace_inputs, tmp, names, dynamic_batch, *args, **kwargs):
        if dynamic_batch:
            raise GraphmergeError("torch.onnx.export failed for X: Cannot view a tensor")
        return real(module, trace_inputs, tmp, names, dynamic_batch, *args, **kwargs)

    monkeypatch.setattr(onnx_io, "_write_onnx", no_dynamic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(_resnet(), torch.randn(3, 1, 28, 28), tmp_path / "fixed.onnx")
    (message,) = _fixed_batch_warnings(caught)
    assert "\n" not in message and "Cannot view a tensor" in message and "3" in message
    assert not report.dynamic_batch and report.batch_sizes == (3,)
    assert report.notes[0] in message and report.max_abs_diff < 1e-4
    proto = onnx.load(str(report.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


class _BatchOfThree(nn.Module):
    """x [3, 4] -> x + a [3, 4] buffer: the module itself only runs on a batch of 3."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.rows


def test_batch_fixed_by_the_module_is_reported(tmp_path: Path) -> None:
    """torch.onnx silently makes a batch axis that the module's code fixes a constant: the
    report and one warning say so, and the file is checked at that batch only."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(_BatchOfThree(), torch.randn(3, 4), tmp_path / "three.onnx")
    (message,) = _fixed_batch_warnings(caught)
    assert "batch size 3 fixed" in message
    assert not report.dynamic_batch and report.batch_sizes == (3,) and len(report.notes) == 1


def test_export_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        export_onnx(_resnet(), [1, 2], tmp_path / "x.onnx")
    with pytest.raises(GraphmergeError, match="batch"):
        export_onnx(
            zoo.tiny_bert_classifier(),
            (torch.ones(2, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64)),
            tmp_path / "x.onnx",
        )
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx(_resnet(), torch.randn(2, 1, 28, 28), tmp_path / "missing" / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def _import_folder(folder: Path, name: str):
    """Import a folder written by GraphModule.to_folder as a package."""
    spec = importlib.util.spec_from_file_location(
        name, str(folder / "__init__.py"), submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(f"{name}.module", None)
    return package


def test_save_module_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    original = _resnet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    graph_module = torch.fx.symbolic_trace(original)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = graph_module(x)

    folder = save_module(graph_module, tmp_path / "merged")
    assert folder == tmp_path / "merged"
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "module.py", "__init__.py"} <= files
    assert "state_dict.pt" not in files
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # temp dir renamed away

    state = load_state(folder / "model.safetensors")
    assert set(state) == set(graph_module.state_dict())
    fresh = _resnet()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), want)

    # The generated code does not depend on the temporary build directory.
    package = _import_folder(folder, "graphmerge_saved_resnet")
    rebuilt = package.FxModule().eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), want)


def _double(x: torch.Tensor) -> torch.Tensor:
    """x -> 2 x (kept as one call_function node by torch.fx.wrap)."""
    return x * 2


torch.fx.wrap("_double")


class _UsesWrapped(nn.Module):
    """x [B, 3] -> 2 * Linear(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _double(self.lin(x))


def test_saved_code_imports_wrapped_functions(tmp_path: Path) -> None:
    graph_module = torch.fx.symbolic_trace(_UsesWrapped())
    folder = save_module(graph_module, tmp_path / "wrapped")
    rebuilt = _import_folder(folder, "graphmerge_saved_wrapped").FxModule()
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), graph_module(x))


class _Tied(nn.Module):
    """Two Linear layers sharing one weight matrix; x [B, 4] -> [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_save_module_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    model = _Tied()
    model.register_buffer("transposed", torch.randn(3, 5).t())  # non-contiguous
    folder = save_module(model, tmp_path / "tied")
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    state = load_state(folder)
    assert torch.equal(state["a.weight"], state["b.weight"])
    assert torch.equal(state["transposed"], model.transposed)
    fresh = _Tied()
    fresh.register_buffer("transposed", torch.zeros(5, 3))
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x), model(x))


def test_save_module_refuses_to_overwrite(tmp_path: Path) -> None:
    first, second = _resnet(), _resnet()
    with torch.no_grad():
        second.head.bias.fill_(7.0)
    folder = save_module(first, tmp_path / "out")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="overwrite=True"):
        save_module(second, folder)
    assert (folder / "model.safetensors").read_bytes() == before

    save_module(second, folder, overwrite=True)
    assert torch.equal(load_state(folder)["head.bias"], torch.full((5,), 7.0))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    (tmp_path / "empty").mkdir()
    save_module(first, tmp_path / "empty")  # an empty folder is not "existing content"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        save_module(first, tmp_path / "file", overwrite=True)


class _Payload:
    """An arbitrary class: unpickling it would run attacker-chosen code paths."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_load_state_reads_pt_and_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0)}, good)
    assert torch.equal(load_state(good)["w"], torch.arange(3.0))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": _Payload()}, evil)
    with pytest.raises(ConfigError, match="safetensors"):
        load_state(evil)

    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(ConfigError, match="safetensors"):
        load_state(raw)

    nested = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, nested)
    with pytest.raises(ConfigError, match="state dict"):
        load_state(nested)

    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown weights file"):
        load_state(tmp_path / "w.npz")
