"""Heterogeneous merges with every norm correction over several seed pairs, beside the
homogeneous zip of the larger configuration (Fashion-MNIST 5+5, ResNets, the task protocol).

`heterogeneous.py` shows one seed triple with BatchNorm reset; this one repeats the
heterogeneous rows with norms "repair" (the default), "reset" and "none" on 3 seed pairs:
depth 2-2-2 ⊕ 4-4-4 (width ×2) with LMA, SMA and uniform alignment beside 4-4-4 ⊕ 4-4-4;
width ×1 ⊕ ×2 (2-2-2) beside ×2 ⊕ ×2; depth + width 1-1-1 ×1 ⊕ 2-2-2 ×2 beside 2-2-2 ×2 ⊕
2-2-2 ×2. Model A (task: classes 0-4) is the smaller one. Target: each heterogeneous zip within
1 point of the homogeneous reference's joint accuracy (same norms).

Rerun:  .venv/bin/python benchmarks/heterogeneous_norms.py   (about 40 min cold, 15 min cached)
Writes: benchmarks/results/heterogeneous_norms.md, heterogeneous_norms.json, .png
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from _protocol import NORMS, fashion_mnist_setup, mean_rows, plot, score, table
from heterogeneous import arch

from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.experiment import train_model

HERE = Path(__file__).resolve().parent
D1, D2, D4 = [1, 1, 1], [2, 2, 2], [4, 4, 4]
ALIGN = {"zip, LMA": {"method": "zip", "align": "lma"},
         "zip, SMA": {"method": "zip", "align": "sma"},
         "zip, uniform": {"method": "zip", "align": "uniform"}}
ZIP = {"zip": {"method": "zip"}}
# name -> (architecture of model A, of model B, variants, homogeneous reference architecture)
EXPERIMENTS = {
    "depth: 2-2-2 ⊕ 4-4-4, ×2": ((D2, 2), (D4, 2), ALIGN, (D4, 2)),
    "width: ×1 ⊕ ×2, 2-2-2": ((D2, 1), (D2, 2), ZIP, (D2, 2)),
    "depth + width: 1-1-1 ×1 ⊕ 2-2-2 ×2": ((D1, 1), (D2, 2), ALIGN, (D2, 2)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed-pairs", default="0,1;2,3;4,5")
    p.add_argument("--experiments", default=",".join(str(i) for i in range(len(EXPERIMENTS))),
                   help="indices into EXPERIMENTS")
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if args.render:
        render(json.loads((out / "heterogeneous_norms.json").read_text()), out)
        return
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()
    tasks, x_test, y_test, calibration, pairs = fashion_mnist_setup(args.seed_pairs)
    cache, e = Path(args.cache), args.epochs
    names = list(EXPERIMENTS)
    record, reference_rows = {}, {}
    for k in (int(i) for i in args.experiments.split(",")):
        name = names[k]
        a, b, variants, ref = EXPERIMENTS[name]
        hetero, homo = [], []
        for sa, sb in pairs:
            models = [train_model(arch(*a, e), tasks[0], sa, cache, progress=False),
                      train_model(arch(*b, e), tasks[1], sb, cache, progress=False)]
            rows = score(models, tasks, calibration, "task", x_test, y_test, variants)
            key = json.dumps([ref, sa, sb])
            if key not in reference_rows:  # one reference may serve several experiments
                refs = [train_model(arch(*ref, e), t, s, cache, progress=False)
                        for t, s in zip(tasks, (sa, sb))]
                reference_rows[key] = score(refs, tasks, calibration, "task", x_test, y_test,
                                            ZIP)
            ref_rows = reference_rows[key]
            ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
            print(f"\n{name}, seeds {(sa, sb)}\n{table(rows, ens)}\nreference\n"
                  f"{table(ref_rows, ens)}", flush=True)
            hetero.append(rows)
            homo.append(ref_rows)
        record[name] = {"a": a, "b": b, "reference": ref, "runs": hetero, "reference_runs": homo,
                        "mean": mean_rows(hetero), "reference_mean": mean_rows(homo)}
        write(record, args, pairs, t_start, out)  # after every experiment


def write(experiments: dict, args, pairs, t_start: float, out: Path) -> None:
    command = "python benchmarks/heterogeneous_norms.py " + " ".join(
        shlex.quote(x) for x in sys.argv[1:])
    record = {"command": command, "args": vars(args), "seed_pairs": pairs,
              "experiments": experiments, "wall_minutes": (time.perf_counter() - t_start) / 60,
              "torch": torch.__version__, "machine": platform.machine()}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "heterogeneous_norms.json", json.dumps(record, indent=1))
    render(record, out)


def render(record: dict, out: Path) -> None:
    targets, sections, panels = [], [], {}
    for name, ex in record["experiments"].items():
        rows, refs = ex["mean"], ex["reference_mean"]
        ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
        ref_name = f"{'-'.join(map(str, ex['reference'][0]))} ×{ex['reference'][1]}"
        for norms in NORMS:
            ref = next(r for r in refs if r["method"] == "zip" and r["norms"] == norms)
            for r in rows:
                if r["norms"] == norms:
                    gap = r["joint"] - ref["joint"]
                    targets.append(f"- {name}, {r['method']}, {norms}: {r['joint']:.1%} vs "
                                   f"homogeneous {ref_name} {ref['joint']:.1%}: {gap:+.1%} "
                                   f"({'above' if gap > 0 else 'within 1 point' if gap >= -0.01 else 'missed'})")
        marked = [{**r, "method": f"homogeneous {ref_name} zip"} for r in refs if r["norms"]]
        sections += [f"## {name} (mean ± half-range over seed pairs)", "", table(rows, ens), "",
                     f"Homogeneous reference {ref_name} ⊕ {ref_name} (its own ensemble and "
                     f"models; 'of ensemble' relative to the heterogeneous pair's ensemble):", "",
                     table(refs, ens), ""]
        panels[name] = [*rows, *marked]
    md = ["# Heterogeneous merges with every norm correction (Fashion-MNIST 5+5, ResNets)", "",
          f"Task protocol (each model its own 5-class head, heads=\"concat\"), ResNets with a "
          f"stride-2 stem, {record['args']['epochs']} epochs per model, seed pairs "
          f"{[tuple(p) for p in record['seed_pairs']]} (model A: classes 0-4, the smaller "
          f"architecture; model B: classes 5-9); calibration: 40 training images per class "
          f"(400); full 10k test set. Mean ± half-range over the seed pairs.", "",
          f"Command: `{record['command'].strip()}`  ",
          f"torch {record['torch']}, {record['machine']}, 1 thread, wall time "
          f"{record['wall_minutes']:.1f} min", "",
          "## Target: within 1 point of the homogeneous zip (same norms)", "", *targets, "",
          *sections]
    write_text_atomic(out / "heterogeneous_norms.md", "\n".join(md))
    plot(panels, out / "heterogeneous_norms.png", NORMS, title="{}")
    print("\n".join(targets))
    print(f"wrote {out / 'heterogeneous_norms.md'}; rerun: {record['command']}")


if __name__ == "__main__":
    main()
