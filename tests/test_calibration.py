"""Calibration data streamed: limits, one-shot and endless iterables, memory bounds, devices,
and torch.distributed (two processes under torchrun give the one-process merge)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphmerge as gm
from graphmerge.calibration import Calibration
from graphmerge.errors import ConfigError, DataError
from graphmerge.lab.zoo.resnet import resnet

HERE = Path(__file__).resolve().parent


def _models(depths=((1, 1, 1), (1, 1, 1))) -> list[torch.nn.Module]:
    out = []
    for seed, d in enumerate(depths):
        torch.manual_seed(seed)
        out.append(resnet(depths=d, width=1).eval())
    return out


def _batches(n: int = 5, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(size, 1, 12, 12, generator=g) for _ in range(n)]


def _same(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.allclose(sa[k].double(), sb[k].double(), rtol=0, atol=atol) for k in sa)


def test_limits_read_the_same_samples_from_any_iterable():
    models, data = _models(), _batches()
    cut = [*data[:2], data[2][:8]]  # 40 samples
    reference = gm.merge(models, cut, progress=False).module
    generator = (x for x in data)
    by_samples = gm.merge(models, generator, max_samples=40, progress=False).module
    endless = itertools.cycle(cut)
    by_batches = gm.merge(models, endless, max_batches=3, progress=False).module
    assert _same(reference, by_samples) and _same(reference, by_batches)


def test_an_iterable_without_length_needs_a_limit():
    with pytest.raises(ConfigError, match="max_batches= or max_samples="):
        gm.merge(_models(), itertools.repeat(_batches(1)[0]), progress=False)
    with pytest.raises(ConfigError, match="max_samples must be None or an int >= 1"):
        gm.merge(_models(), _batches(), max_samples=0, progress=False)


def test_calibration_counts_samples_and_refuses_empty_data():
    cal = Calibration([(x, 0) for x in _batches(3)], 1, max_samples=40)
    seen = [x.shape[0] for _, (x,) in cal.progress("test", enabled=False)]
    assert seen == [16, 16, 8] and cal.samples == 40
    with pytest.raises(DataError, match="empty"):
        list(Calibration([], 1))


def test_a_memory_bound_measures_spaces_in_several_passes_with_the_same_result():
    models, data = _models(), _batches()
    one = gm.merge(models, data, progress=False)
    # a bound below the sum of all spaces' statistics but above the largest single space
    bound = gm.merge(models, data, max_memory=200_000, progress=False)
    assert _same(one.module, bound.module, atol=1e-6)
    with pytest.raises(ConfigError, match="raise max_memory"):
        gm.merge(models, data, max_memory=100, progress=False)


def test_under_a_memory_bound_a_pass_runs_when_its_spaces_are_read_and_used_ones_are_released(
        monkeypatch):
    from graphmerge.match import statistics

    held, keep = [], statistics.StreamedStats._keep

    def keeping(self, g, stats):
        keep(self, g, stats)
        held.append(sum(statistics.statistics_bytes(sum(s.widths))
                        for s in self._held.values() if s._sxx is not None))
    monkeypatch.setattr(statistics.StreamedStats, "_keep", keeping)
    gm.merge(_models(), _batches(), max_memory=200_000, progress=False)
    assert len(held) > 1  # several passes, each run as the matching reached it
    assert max(held) <= 200_000  # one pass's statistics: those matched were released


def test_devices_are_validated_and_the_callers_models_stay_put():
    models, data = _models(), _batches(2)
    before = [m.state_dict() for m in models]
    on_cpu = gm.merge(models, data, device="cpu", progress=False)
    assert next(on_cpu.module.parameters()).device.type == "cpu"
    assert all(torch.equal(before[i][k], v) for i, m in enumerate(models)
               for k, v in m.state_dict().items())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA device"):
            gm.merge(models, data, device="cuda", progress=False)
    with pytest.raises(ConfigError, match="device"):
        gm.merge(models, data, device="meta", progress=False)
    with pytest.raises(ConfigError, match="device must be"):
        gm.merge(models, data, device="gpu please", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun_give_the_one_process_merge(tmp_path):
    """Each rank reads its shard; moments, CKA, REPAIR, BatchNorm statistics and the refit's
    sums are all-reduced. A depth-heterogeneous pair, so CKA alignment runs too."""
    depths = ((1, 1, 1), (2, 2, 2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(HERE / "distributed_merge.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for norms, refit in (("repair", False), ("reset", False), ("repair", True)):
        result = gm.merge(_models(depths), _batches(6), norms=norms, refit=refit,
                          progress=False)
        assert (result.refit.layers > 1) if refit else not result.refit.layers  # convs, linear
        single = result.module
        shared = torch.load(tmp_path / f"{norms}{'_refit' * refit}.pt", weights_only=True)
        ours = single.state_dict()
        assert shared.keys() == ours.keys()
        worst = max(float(((ours[k].double() - shared[k].double()).abs()
                           / ours[k].double().abs().clamp_min(1)).max()) for k in ours)
        # REPAIR: float64 sums, the same parameters (the refit's solve from sums added in
        # another order: rounding); reset: torch's float32 running averages, summed in another
        # order (an ulp)
        assert worst <= (1e-9 if refit else 1e-12 if norms == "repair" else 1e-6), (norms, worst)


class _Masked(torch.nn.Module):
    """forward(x, mask=None): an optional second input, like a transformers model's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x, mask=None):
        h = torch.relu(self.a(x))
        return self.b(h if mask is None else h * mask)


def test_extra_batch_items_of_a_model_with_optional_inputs_are_not_guessed():
    """(x, mask) batches for forward(x, mask=None): the mask must not be taken for a label
    (the merged model would silently drop it), nor a label for a mask."""
    torch.manual_seed(0)
    model = _Masked()
    batches = [(torch.randn(16, 6), (torch.rand(16, 8) > 0.5).float()) for _ in range(2)]
    twin = gm.permute(model, batches[0], seed=1)
    with pytest.raises(ConfigError, match=r"requires 1 positional input\(s\) and takes up to 2, "
                                          r"and the calibration batches have 2 items.*"
                                          r"example_inputs="):
        gm.merge([model, twin], batches, progress=False)
    result = gm.merge([model, twin], batches, batches[0], progress=False)
    placeholders = [n for n in result.module.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2
    with torch.no_grad():
        assert torch.allclose(result.module(*batches[1]), model(*batches[1]), atol=1e-5)
    # a model without optional inputs: the items after its inputs are labels, as before
    plain = _models()
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in _batches(2)]
    gm.merge(plain, labelled, progress=False)


class _Drawn(torch.utils.data.Dataset):
    """A dataset that draws a new random sample on every read (random augmentation, taken to
    the limit)."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randn(3, 32, 32), 0


def test_data_drawn_anew_on_each_read_is_read_once_and_the_self_merge_stays_exact():
    # The VGG whose classifier is a 7×7 conv on a 1×1 map: its units have one sample per image,
    # so REPAIR measured on other samples than its targets moved the output by 8-53%.
    from graphmerge.lab.zoo.vgg_convhead import vgg_convhead

    torch.manual_seed(0)
    model = vgg_convhead().eval()
    x = torch.randn(8, 3, 32, 32)
    other = gm.permute(model, x, seed=1, frontend="export")
    loader = torch.utils.data.DataLoader(_Drawn(), batch_size=16)
    merged = gm.merge([model, other], loader, x, frontend="export", progress=False).module
    with torch.no_grad():
        y = model(x)
        assert (merged(x) - y).abs().max().item() <= 1e-5 * y.abs().max().item()


def test_data_too_large_to_keep_is_checked_on_every_read(monkeypatch):
    import graphmerge.calibration as calibration

    monkeypatch.setattr(calibration, "KEEP_BYTES", 0)
    loader = torch.utils.data.DataLoader(_Drawn(), batch_size=16)
    with pytest.raises(DataError, match="calibration batch 0 differs between two reads"):
        list(Calibration(loader, 1))  # the first read was fingerprinted, this one differs
    data = _batches()
    assert _same(gm.merge(_models(), data, progress=False).module,
                 gm.merge(_models(), iter(data), max_batches=9, progress=False).module)


def test_fewer_samples_than_units_warns_that_the_matching_is_underdetermined():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    other = gm.permute(model, torch.randn(2, 4), seed=1)
    with pytest.warns(gm.FewSamplesWarning, match="64 units seen in 6 samples"):
        gm.merge([model, other], [torch.randn(3, 4)], progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", gm.FewSamplesWarning)
        merged = gm.merge([model, other], [torch.randn(64, 4)], progress=False).module
    x = torch.randn(9, 4)
    assert torch.allclose(merged(x), model(x), atol=1e-5)
