"""How a merge scales with model size (issue 21): LLaMA-style pairs from transformers configs
(`device_check.llama_pair`: random init, seeds 0 and 1, vocab 32000 or `--vocab`, untied, heads
of 64 dims), from hidden 256 / 4 layers upwards, merged with the defaults (zip, REPAIR, the
oracle check).

Per pair: parameters per model, the forward floor (both models over the calibration data, no
grad; the second of two runs, warm), the merge's wall time and its ratio to the floor, the
seconds of each pass (`MergeResult.seconds`), and the peak memory: each pair runs in its own
process, so its peak RSS (`ru_maxrss`) is that pair's alone (on CUDA:
`torch.cuda.max_memory_allocated`). The growth is the slope of log(merge seconds) against
log(parameters), fitted over the rows.

Rerun:  .venv/bin/python benchmarks/scale.py                   (CPU, about 10 min)
        .venv/bin/python benchmarks/scale.py --sizes 256x1024x4,512x2048x4 --tokens 16x64
        .venv/bin/python benchmarks/scale.py --sizes 1024x4096x4x8192   (the ~78M pair)
        PYTHONPATH=. python benchmarks/scale.py --device cuda --big   (adds the 1.2B pair)
        .venv/bin/python benchmarks/scale.py --sizes 2048x8192x16 --tokens 4x128 --batch 1 \
            --max-memory 4294967296 --out benchmarks/results/scale_1b2_cpu   (1.2B on CPU)
Writes: benchmarks/results/scale.md and scale.png (or --out DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SIZES = [(256, 1024, 4, None), (512, 2048, 4, None), (1024, 4096, 4, None), (1024, 4096, 8, None)]
BIG = [(2048, 8192, 16, None)]
PASSES = ("trace_models", "check_spaces", "collect_statistics", "match_spaces",
          "merge_parameters", "correct_norms")


def one(hidden: int, ffn: int, layers: int, device: str, tokens: tuple[int, int],
        max_memory: int | None, vocab: int = 32000, batch: int = 16) -> dict:
    """Merge one pair in this process and measure it."""
    import graphmerge as gm
    from device_check import _sync, forward_floor, llama_pair

    torch.set_flush_denormal(True)
    dev = torch.device(device)
    models = llama_pair(hidden, ffn, layers, dev, vocab)
    params = sum(p.numel() for p in models[0].parameters())
    n, seq = tokens
    ids = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(5))
    calib = [(ids[i:i + batch].to(dev),) for i in range(0, n, batch)]
    forward_floor(models, calib, dev)  # a first run: lazy initialisation, fresh memory
    floor = forward_floor(models, calib, dev)  # the floor: a warm run
    options = {"max_memory": max_memory} if max_memory else {}
    t0 = time.perf_counter()
    result = gm.merge(models, calib, progress=False, device=dev, **options)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"hidden": hidden, "ffn": ffn, "layers": layers, "vocab": vocab, "params": params,
            "model_gib": params * 4 / 2**30, "floor": floor, "merge": seconds,
            "passes": {k: v for k, v in result.seconds.items() if k != "total"},
            "peak_gib": peak / 2**30, "coverage": result.coverage.fraction}


def _run_child(size: tuple[int, int, int, int | None], args: argparse.Namespace) -> dict:
    h, f, layers, vocab = size
    vocab = vocab or args.vocab
    cmd = [sys.executable, __file__, "--one", f"{h}x{f}x{layers}", "--device", args.device,
           "--tokens", args.tokens, "--vocab", str(vocab), "--batch", str(args.batch)] + (
        ["--max-memory", str(args.max_memory)] if args.max_memory else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"hidden": h, "ffn": f, "layers": layers, "vocab": vocab, "error": tail[:160]}
    return json.loads(lines[-1])


def _growth(rows: list[dict]) -> float | None:
    ok = [r for r in rows if "merge" in r]
    if len(ok) < 2:
        return None
    xs = [math.log(r["params"]) for r in ok]
    ys = [math.log(r["merge"]) for r in ok]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def render(rows: list[dict], args: argparse.Namespace, wall: float) -> str:
    head = ("| hidden / FFN / layers / vocab | params per model | floor s | merge s | "
            "merge / floor | "
            + " | ".join(f"{p} s" for p in PASSES) + " | peak GiB | models GiB | coverage |")
    lines = [head, "|" + "---|" * (8 + len(PASSES))]
    for r in rows:
        name = f"{r['hidden']} / {r['ffn']} / {r['layers']} / {r.get('vocab', 32000)}"
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (7 + len(PASSES)))
            continue
        passes = " | ".join(f"{r['passes'].get(p, 0.0):.1f}" for p in PASSES)
        lines.append(f"| {name} | {r['params']:,} | {r['floor']:.2f} | {r['merge']:.1f} | "
                     f"{r['merge'] / r['floor']:.0f}× | {passes} | {r['peak_gib']:.2f} | "
                     f"{2 * r['model_gib']:.2f} | {r['coverage']:.0%} |")
    slope = _growth(rows)
    growth = (f"merge seconds grow as parameters^{slope:.2f} over these rows" if slope
              else "too few rows to fit a growth")
    peak = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else \
        "peak RSS of the pair's own process (ru_maxrss)"
    return (f"# Merge time and memory against model size\n\n"
            f"LLaMA-style pairs (transformers LlamaConfig, random init, untied, heads of 64 "
            f"dims, a key/value head per 256 dims), merged with the defaults on "
            f"`{args.device}`; calibration {args.tokens} "
            f"(sequences × tokens) in batches of {args.batch}"
            f"{f', max_memory {args.max_memory / 2**30:g} GiB' if args.max_memory else ''}. "
            f"Floor: both models' forward over the same batches, the second of two runs "
            f"(warm). Peak: {peak}; models GiB: both models' float32 parameters. {growth}.\n\n"
            f"Command: `{' '.join(['python', 'benchmarks/scale.py', *sys.argv[1:]])}`  \n"
            f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} "
            f"threads, wall time {wall / 60:.1f} min\n\n" + "\n".join(lines) + "\n")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "merge" in r]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog([r["params"] for r in ok], [r["merge"] for r in ok], "o-", label="merge")
    ax.loglog([r["params"] for r in ok], [r["floor"] for r in ok], "s--", label="forward floor")
    ax.set_xlabel("parameters per model")
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _size(text: str) -> tuple[int, int, int, int | None]:
    """HIDDENxFFNxLAYERS, or HIDDENxFFNxLAYERSxVOCAB (else --vocab)."""
    h, f, layers, *vocab = (int(v) for v in text.lower().split("x"))
    return h, f, layers, (vocab[0] if vocab else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", help="comma-separated HIDDENxFFNxLAYERS[xVOCAB] (default: the "
                   "sweep)")
    p.add_argument("--big", action="store_true", help="add the 1.2B pair (2048x8192x16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", default="32x64", help="SEQUENCESxTOKENS of calibration")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (8192: ~84M at 1024)")
    p.add_argument("--batch", type=int, default=16, help="sequences per calibration batch")
    p.add_argument("--max-memory", type=int, default=None, help="merge's max_memory (bytes)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per pair")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    tokens = tuple(int(v) for v in args.tokens.split("x"))
    if args.one:
        print(json.dumps(one(*_size(args.one)[:3], args.device, tokens, args.max_memory,
                             args.vocab, args.batch)))
        return
    sizes = [_size(s) for s in args.sizes.split(",")] if args.sizes else SIZES + (
        BIG if args.big else [])
    t0 = time.perf_counter()
    rows = []
    for size in sizes:
        rows.append(_run_child(size, args))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from graphmerge.io.atomic import write_text_atomic

    write_text_atomic(out / "scale.md", render(rows, args, time.perf_counter() - t0))
    _plot(rows, out / "scale.png")
    print(f"wrote {out / 'scale.md'}")


if __name__ == "__main__":
    main()
