"""Merges on a GPU (issue 21): every zoo family and the [hf] transformers models merged on the
device and compared with the same merge on the CPU, then a scale sweep of LLaMA-style pairs.

Part 1, per model (random init, seed 0; calibration 2 batches of 32 inputs):
* self: the model and a `gm.permute` copy, merged with the defaults (zip, REPAIR);
* hetero: the model and a `gm.widen(extra=0.5)` copy (elastic zip across widths; `n/a`
  where widen refuses the model);
* refit: the self merge with refit=True (linear layers refitted by least squares).
Both run on the CPU and on `--device` (models, calibration and `device=` there); "vs CPU" is
the relative difference of the two merged modules' outputs (pass: ≤ 1e-4), "vs model" the
self-merge's difference from the model (an exact merge: ~1e-6).

Part 2: LlamaForCausalLM pairs (transformers LlamaConfig, random init, seeds 0 and 1, vocab
32000, heads of 64 dims, 4 key/value groups) from hidden 256 / 4 layers up to the 1.2B pair
(hidden 2048, FFN 8192, 16 layers), on 64 sequences of 128 tokens: merge seconds, the forward
floor (both models over the calibration data, no grad) and torch.cuda.max_memory_allocated.
A pair whose projected time (the previous one's × its parameter ratio) does not fit in what is
left of `--budget` is listed as skipped.

Needs no pydantic (graphmerge imports it only in project.py); the [hf] rows need transformers.
Rerun:  PYTHONPATH=. python benchmarks/device_check.py                (one GPU, ≤ 8 min)
        PYTHONPATH=. python benchmarks/device_check.py --device cpu --quick   (a CPU smoke, ~1 min)
Writes: $OUT/device_check.md when OUT is set, else benchmarks/results/device_check.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import graphmerge as gm  # noqa: E402
from graphmerge.lab import zoo  # noqa: E402

QUICK_FAMILIES = ("mlp", "resnet", "vit", "gpt")
QUICK_HF = ("llama", "bert")
SWEEP = [(256, 1024, 4), (512, 2048, 4), (1024, 4096, 8), (2048, 8192, 16)]
QUICK_SWEEP = [(128, 512, 2), (256, 1024, 2)]
HEADER = ("| case | merge | status | vs CPU | vs model | params | merge s | floor s | "
          "peak GiB | note |\n|---|---|---|---|---|---|---|---|---|---|")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" \
        else "–"


def _to(x: Any, device: torch.device) -> Any:
    return tuple(_to(t, device) for t in x) if isinstance(x, tuple) else (
        x.to(device) if isinstance(x, torch.Tensor) else x)


def forward_floor(models: list[nn.Module], batches: list[Any], device: torch.device) -> float:
    """Seconds for every model to run over every batch (no grad): what a merge is compared
    with."""
    _sync(device)
    t0 = time.perf_counter()
    for m in models:
        for b in batches:
            _forward(m, b)
    _sync(device)
    return time.perf_counter() - t0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _hf_builders() -> dict[str, Callable[..., Any]]:
    """tests/hf_models.py's builders (empty without transformers)."""
    if importlib.util.find_spec("transformers") is None:
        return {}
    spec = importlib.util.spec_from_file_location("hf_models", HERE.parent / "tests" /
                                                  "hf_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HF_MODELS


def _like(example: tuple[torch.Tensor, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """n random inputs shaped like the example's (token ids below the example's maximum,
    masks of ones, floats from a normal)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        shape = (n, *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=t.dtype))
        elif int(t.max()) <= 1:
            out.append(torch.ones(shape, dtype=t.dtype))
        else:
            out.append(torch.randint(1, int(t.max()) + 1, shape, generator=g, dtype=t.dtype))
    return tuple(out)


def _models() -> dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]]:
    out: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {}
    for name in [*zoo.FAMILIES, *zoo.COMMUNITY]:
        def make(name: str = name) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
            torch.manual_seed(0)
            model, x = zoo.builtin(name, batch=2)
            return model, (x,)
        out[name] = make
    for name, build in _hf_builders().items():
        out[f"hf/{name}"] = lambda build=build: build(seed=0)
    return out


def _merge_both(models: list[nn.Module], calib: list[tuple], probe: tuple, device: torch.device,
                **options: Any) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The merge (with `options`) on the CPU and on `device`: (CPU output, device output,
    device merge s, device floor s)."""
    cpu = gm.merge(models, calib, calib[0], progress=False, **options).module
    on = [m.to(device) for m in _copies(models)]
    data = [_to(b, device) for b in calib]
    floor = forward_floor(on, data, device)
    t0 = time.perf_counter()
    merged = gm.merge(on, data, data[0], progress=False, device=device, **options).module
    _sync(device)
    seconds = time.perf_counter() - t0
    wrong = sorted({str(t.device) for t in merged.state_dict().values()} - {str(device)})
    if wrong and device.type != "cpu":
        raise RuntimeError(f"merged tensors on {wrong}, not only {device}")
    return _forward(cpu, probe), _forward(merged, _to(probe, device)).cpu(), seconds, floor


def _copies(models: list[nn.Module]) -> list[nn.Module]:
    import copy
    return [copy.deepcopy(m) for m in models]


def family_rows(names: list[str], device: torch.device) -> list[str]:
    rows = []
    makers = _models()
    for name in names:
        model, example = makers[name]()
        calib = [_like(example, 32, 1), _like(example, 32, 2)]
        probe = _like(example, 16, 3)
        params = sum(p.numel() for p in model.parameters())
        for kind in ("self", "hetero", "refit"):
            t_start = time.perf_counter()
            try:
                other = (gm.permute(model, example, seed=3) if kind != "hetero" else
                         gm.permute(gm.widen(model, example, extra=0.5, seed=2), example, seed=3))
            except gm.GraphmergeError as e:
                rows.append(f"| {name} | {kind} | n/a | | | {params:,} | | | | "
                            f"{type(e).__name__}: {str(e)[:60]} |")
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                y_cpu, y_dev, seconds, floor = _merge_both([model, other], calib, probe, device,
                                                           refit=kind == "refit")
                vs_cpu = _rel(y_cpu, y_dev)
                exact = kind != "hetero"  # a permuted copy: the merge gives the model back
                vs_model = _rel(_forward(model, probe), y_dev) if exact else float("nan")
                status = "ok" if vs_cpu <= 1e-4 else "DIFFERS"
                rows.append(f"| {name} | {kind} | {status} | {vs_cpu:.1e} | "
                            f"{'' if not exact else f'{vs_model:.1e}'} | {params:,} | "
                            f"{seconds:.2f} | {floor:.3f} | {_peak(device)} | |")
            except Exception as e:  # a row per failure, the sweep goes on
                traceback.print_exc()
                rows.append(f"| {name} | {kind} | FAIL | | | {params:,} | | | | "
                            f"{type(e).__name__}: {str(e)[:80]} |")
            print(rows[-1], f"({time.perf_counter() - t_start:.1f} s)", flush=True)
    return rows


def llama_pair(hidden: int, ffn: int, layers: int, device: torch.device,
               vocab: int = 32000) -> list[nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = _hf_builders()["llama"].__globals__["HFWrapper"]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 256),
                             max_position_embeddings=256, tie_word_embeddings=False,
                             use_cache=False, attn_implementation="sdpa")
        with torch.device(device):
            models.append(hf(LlamaForCausalLM(config), "logits", ("input_ids",)).eval())
    return models


def sweep_rows(shapes: list[tuple[int, int, int]], device: torch.device, tokens: tuple[int, int],
               budget: float, started: float) -> list[str]:
    rows, last = [], None
    n, seq = tokens
    for hidden, ffn, layers in shapes:
        case = f"llama h{hidden} f{ffn} L{layers}"
        left = budget - (time.perf_counter() - started)
        if last is not None and last[0] * last[1] > left:
            rows.append(f"| {case} | pair | skipped | | | | | | | projected "
                        f"{last[0] * last[1]:.0f} s > {left:.0f} s left |")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            models = llama_pair(hidden, ffn, layers, device)
            params = sum(p.numel() for p in models[0].parameters())
            g = torch.Generator().manual_seed(5)
            ids = torch.randint(1, 32000, (n, seq), generator=g).to(device)
            calib = [(ids[i:i + 16],) for i in range(0, n, 16)]
            floor = forward_floor(models, calib, device)
            t0 = time.perf_counter()
            result = gm.merge(models, calib, progress=False, device=device)
            _sync(device)
            seconds = time.perf_counter() - t0
            finite = all(torch.isfinite(t).all() for t in result.module.state_dict().values()
                         if t.is_floating_point())
            rows.append(f"| {case} | pair | {'ok' if finite else 'NaN'} | | | {params:,} | "
                        f"{seconds:.1f} | {floor:.2f} | {_peak(device)} | |")
            nxt = shapes[shapes.index((hidden, ffn, layers)) + 1:] or [(hidden, ffn, layers)]
            h2, f2, l2 = nxt[0]
            last = (seconds, (l2 * (h2 * h2 + h2 * f2)) / (layers * (hidden ** 2 + hidden * ffn)))
            del models, result
        except Exception as e:
            traceback.print_exc()
            rows.append(f"| {case} | pair | FAIL | | | | | | | {type(e).__name__}: "
                        f"{str(e)[:80]} |")
            last = (float("inf"), 1.0)
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a few families, a tiny sweep")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--families", help="comma-separated names (zoo names, hf/NAME)")
    parser.add_argument("--shapes", help="sweep pairs as HIDDEN:FFN:LAYERS,… (hidden a "
                                         "multiple of 64)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))
    if args.families:
        names = args.families.split(",")
    elif args.quick:
        names = [*QUICK_FAMILIES, *(f"hf/{n}" for n in QUICK_HF if _hf_builders())]
    else:
        names = list(_models())
    rows = family_rows(names, device)
    if not args.skip_sweep and _hf_builders():
        shapes, tokens = (QUICK_SWEEP, (16, 32)) if args.quick else (SWEEP, (64, 128))
        if args.shapes:
            shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
        rows += sweep_rows(shapes, device, tokens, args.budget, started)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = "\n".join([f"# device_check on {device} ({gpu}), torch {torch.__version__}", "",
                       HEADER, *rows, "",
                       f"total {time.perf_counter() - started:.0f} s", ""])
    print(table)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.md").write_text(table)


if __name__ == "__main__":
    main()
