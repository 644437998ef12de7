"""What a merge costs against its floor: the input models' forward passes over the calibration
data. Default options (zip, REPAIR), untrained models (the cost does not depend on training).

Cases:
* resnet: two ResNets 2-2-2, width ×2, stride-2 stem (the demo's), 400 images 28×28;
* depth+width: ResNet 1-1-1 ×1 ⊕ ResNet 2-2-2 ×2 (alignment by CKA, expansion, elastic zip);
* vit: two ViTs (dim 128, depth 4, 4 heads, 16 patches), 400 images.

Each case runs in a fresh process (its peak memory is its own): the floor is the best of three
timed forward passes of every model over the calibration data (no grad, eval); the merge is the
best of two `gm.merge` calls, with the per-pass breakdown of the faster one. The memory of the
feature statistics is Σ over merged spaces of 8·(d² + d) bytes, d = Σ_i d_i.

The growth part times whole merges of MLP stacks (64 → d → … → d → 10, 1024 calibration
samples) against width d = 256 … 4096 (3 hidden layers) and against depth L = 2 … 16 (d = 512),
and fits time ≈ c · size^k.

Rerun:  .venv/bin/python benchmarks/merge_time.py          (about 6 min; --skip-growth: 1 min)
Writes: benchmarks/results/merge_time.md, merge_time.json, merge_growth.png
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
CASES = ("resnet", "depth+width", "vit")


def case_models(name: str) -> tuple[list[nn.Module], list[torch.Tensor]]:
    from graphmerge.lab.zoo.resnet import resnet
    from graphmerge.lab.zoo.vit import vit

    torch.manual_seed(0)
    if name == "resnet":
        models = [resnet((2, 2, 2), width=2, stem_stride=2) for _ in range(2)]
    elif name == "depth+width":
        models = [resnet((1, 1, 1), width=1, stem_stride=2),
                  resnet((2, 2, 2), width=2, stem_stride=2)]
    elif name == "vit":
        models = [vit(dim=128, depth=4, heads=4, mlp_dim=256) for _ in range(2)]
    else:
        raise SystemExit(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    x = torch.randn(400, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    return [m.eval() for m in models], [x[i:i + 100] for i in range(0, 400, 100)]


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).eval()


def floor_seconds(models: list[nn.Module], batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        for m in models:
            m(batches[0])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for m in models:
                for b in batches:
                    m(b)
            best = min(best, time.perf_counter() - t)
    return best


def timed_merge(models: list[nn.Module], batches: list[torch.Tensor], repeats: int = 2
                ) -> tuple[float, dict[str, float], object]:
    import graphmerge as gm

    best, passes, result = float("inf"), {}, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = gm.merge(models, batches, progress=False)
        took = time.perf_counter() - t
        if took < best:
            best, passes = took, dict(result.seconds)
    return best, passes, result


def run_case(name: str) -> dict:
    from graphmerge.match.statistics import statistics_bytes

    models, batches = case_models(name)
    floor = floor_seconds(models, batches)
    merge, passes, result = timed_merge(models, batches)
    stats_bytes = sum(statistics_bytes(sum(p.widths)) for p in result.plans.values())
    return {"case": name, "floor_s": floor, "merge_s": merge, "ratio": merge / floor,
            "passes": {k: v for k, v in passes.items() if k != "total"},
            "statistics_bytes": stats_bytes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": [sum(p.numel() for p in m.parameters()) for m in models]}


def run_growth() -> dict:
    out = {"width": [], "depth": []}
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(2))
    batches = [x[i:i + 256] for i in range(0, 1024, 256)]
    for key, sizes, make in (("width", [256, 512, 1024, 2048, 4096], lambda s: mlp(s, 3)),
                             ("depth", [2, 4, 8, 16], lambda s: mlp(512, s))):
        for size in sizes:
            torch.manual_seed(size)
            models = [make(size), make(size)]
            merge, passes, _ = timed_merge(models, batches, repeats=1)
            out[key].append({"size": size, "merge_s": merge, "passes": passes})
            print(f"  {key} {size}: {merge:.2f} s", flush=True)
    for key in ("width", "depth"):
        sizes = np.log([r["size"] for r in out[key]][1:])  # the smallest is overhead-bound
        times = np.log([r["merge_s"] for r in out[key]][1:])
        k, c = np.polyfit(sizes, times, 1)
        out[f"{key}_exponent"], out[f"{key}_constant"] = float(k), float(np.exp(c))
    return out


def plot(growth: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "width", "hidden width d (3 layers)"),
                           (axes[1], "depth", "hidden layers L (d = 512)")):
        rows = growth[key]
        sizes = np.array([r["size"] for r in rows], dtype=float)
        ax.loglog(sizes, [r["merge_s"] for r in rows], "o-", label="measured")
        k, c = growth[f"{key}_exponent"], growth[f"{key}_constant"]
        ax.loglog(sizes, c * sizes ** k, "--", label=f"fit: time ∝ {key}^{k:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("merge time (s)")
        ax.set_xticks(sizes, [str(int(s)) for s in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Whole-merge time of two MLP stacks (zip + REPAIR, 1024 samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(record: dict) -> str:
    rows = ["# Merge time against the forward-pass floor", "",
            f"Rerun: `{record['command']}` ({record['wall_s'] / 60:.1f} min, "
            f"{record['threads']} thread(s), {record['machine']}; torch {record['torch']}).", "",
            "Before this session's rewrite (issue 12): 7–19× on the ResNet pair, up to 31× on "
            "a depth-heterogeneous one.", "",
            "Floor: every input model's forward passes over the calibration data. Target: "
            "merge ≤ 1.5× floor.", "",
            "| case | parameters | floor | merge | ratio | statistics memory | peak RSS | "
            "passes over 5% of the merge |", "|---|---|---|---|---|---|---|---|"]
    for c in record["cases"]:
        big = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(c["passes"].items(),
                                                           key=lambda kv: -kv[1])
                        if v > 0.05 * c["merge_s"])
        rows.append(f"| {c['case']} | {' + '.join(f'{p:,}' for p in c['parameters'])} | "
                    f"{c['floor_s']:.2f} s | {c['merge_s']:.2f} s | {c['ratio']:.2f}× | "
                    f"{c['statistics_bytes'] / 2**20:.1f} MiB | {c['peak_rss_mb']:.0f} MB | "
                    f"{big} |")
    rows += ["", "Where the time goes: `collect_statistics` runs every input model once over "
             "the data (the floor) and adds the moments; `correct_norms` (REPAIR) runs the "
             "merged model once over the data — a second forward pass no merge with REPAIR can "
             "skip, so with two models the ratio cannot go below about 1.5× even with free "
             "statistics; `align_depths` (heterogeneous depths) runs the models once more for "
             "CKA.", ""]
    growth = record.get("growth")
    if growth:
        rows += ["## Growth", "",
                 f"Two MLP stacks, 1024 calibration samples. Fitted on all but the smallest "
                 f"size: time ∝ width^{growth['width_exponent']:.2f} (3 hidden layers) and "
                 f"∝ depth^{growth['depth_exponent']:.2f} (width 512).", "",
                 "| width | merge | | depth | merge |", "|---|---|---|---|---|"]
        cells = {key: [(str(r["size"]), f"{r['merge_s']:.2f} s") for r in growth[key]]
                 for key in ("width", "depth")}
        for i in range(max(len(cells["width"]), len(cells["depth"]))):
            w = cells["width"][i] if i < len(cells["width"]) else ("", "")
            d = cells["depth"][i] if i < len(cells["depth"]) else ("", "")
            rows.append(f"| {w[0]} | {w[1]} | | {d[0]} | {d[1]} |")
        rows += ["", "![growth](merge_growth.png)", ""]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the md and png from the JSON, without measuring")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.render:
        record = json.loads((args.out / "merge_time.json").read_text())
        if record["growth"]:
            plot(record["growth"], args.out / "merge_growth.png")
        from graphmerge.io.atomic import write_text_atomic
        write_text_atomic(args.out / "merge_time.md", render(record))
        return
    if args.case:  # one case, in this process
        print(json.dumps(run_case(args.case)))
        return
    t0 = time.perf_counter()
    cases = []
    for name in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                              text=True, check=True)
        cases.append(json.loads(done.stdout.strip().splitlines()[-1]))
        c = cases[-1]
        print(f"{name}: floor {c['floor_s']:.2f} s, merge {c['merge_s']:.2f} s, "
              f"ratio {c['ratio']:.2f}×  {c['passes']}", flush=True)
    growth = None if args.skip_growth else run_growth()
    record = {"command": shlex.join([".venv/bin/python", "benchmarks/merge_time.py",
                                     *sys.argv[1:]]),
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "torch": torch.__version__, "cases": cases, "growth": growth,
              "wall_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    from graphmerge.io.atomic import write_text_atomic
    write_text_atomic(args.out / "merge_time.json", json.dumps(record, indent=1))
    if growth:
        plot(growth, args.out / "merge_growth.png")
    write_text_atomic(args.out / "merge_time.md", render(record))
    print(f"wrote {args.out / 'merge_time.md'} in {record['wall_s']:.0f} s; rerun: "
          f"{record['command']}")


if __name__ == "__main__":
    main()
