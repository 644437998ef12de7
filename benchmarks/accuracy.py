"""Accuracy of merging ResNets trained on disjoint Fashion-MNIST tasks (5+5 classes).

For each seed pair, model A is trained on classes 0-4 and model B on classes 5-9 (cached), and
both are merged with weight averaging, permutation matching and zip (heads concatenated). The
table gives joint accuracy (argmax over all 10 classes), per-task accuracy and their mean on the
full 10k test set, plus zip's joint accuracy as a fraction of the ensemble's.

Rerun:  .venv/bin/python benchmarks/accuracy.py            (about 20 min cold, 1 min cached)
Writes: benchmarks/results/accuracy.md and accuracy.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from graphmerge.lab.data import fashion_mnist_tasks
from graphmerge.lab.experiment import (
    TaskPairConfig,
    calibration_batches,
    format_table,
    score_methods,
    train_task_models,
)

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8, help="training epochs per model")
    p.add_argument("--width", type=int, default=2, help="ResNet width multiplier")
    p.add_argument("--depths", default="2,2,2", help="blocks per stage")
    p.add_argument("--seed-pairs", default="0,1;2,3", help="model A,B seeds per run")
    p.add_argument("--calib-per-class", type=int, default=40)
    p.add_argument("--cache", default=str(HERE / "cache"), help="trained-model cache")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)

    tasks = fashion_mnist_tasks("halves")
    runs = []
    for pair in args.seed_pairs.split(";"):
        seeds = tuple(int(s) for s in pair.split(","))
        cfg = TaskPairConfig(model={"depths": [int(d) for d in args.depths.split(",")],
                                    "width": args.width, "stem_stride": 2},
                             seeds=seeds, epochs=args.epochs)
        models = train_task_models(cfg, tasks, Path(args.cache), progress=False)
        calib = calibration_batches(tasks, per_class=args.calib_per_class)
        rows, _ = score_methods(models, tasks, calib, progress=False)
        runs.append({"seeds": seeds, "rows": rows})
        print(f"\nseeds {seeds}:\n{format_table(rows)}", flush=True)

    mean_rows = []
    for k, row in enumerate(runs[0]["rows"]):
        group = [r["rows"][k] for r in runs]
        secs = [g["seconds"] for g in group if g["seconds"] is not None]
        mean_rows.append({
            "method": row["method"],
            "joint": sum(g["joint"] for g in group) / len(group),
            "per_task": [sum(g["per_task"][t] for g in group) / len(group)
                         for t in range(len(row["per_task"]))],
            "task_mean": sum(g["task_mean"] for g in group) / len(group),
            "seconds": sum(secs) / len(secs) if secs else None,
        })
    command = "python benchmarks/accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    zip_row = next(r for r in mean_rows if r["method"] == "zip")
    ens = next(r for r in mean_rows if r["method"] == "ensemble")
    summary = (f"zip joint accuracy = {zip_row['joint'] / ens['joint']:.1%} of the ensemble's "
               f"(mean over {len(runs)} seed pairs)")
    md = ["# Fashion-MNIST 5+5: merging two ResNets trained on disjoint tasks", "",
          f"ResNet depths ({args.depths}), width ×{args.width}, stride-2 stem, {args.epochs} "
          f"epochs per model; calibration: {args.calib_per_class} training images per class of "
          f"both tasks; test: the full 10k test set. Heads of merged models are kept per task "
          f"and their logits concatenated; BatchNorm statistics are reset on the calibration "
          f"data.", "",
          f"Command: `{command.strip()}`  ", f"Date: {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          "", f"## Mean over seed pairs {[r['seeds'] for r in runs]}", "",
          format_table(mean_rows), "", summary, ""]
    for r in runs:
        md += [f"## Seeds {r['seeds']}", "", format_table(r["rows"]), ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text("\n".join(md))
    (out / "accuracy.json").write_text(json.dumps(
        {"command": command, "args": vars(args), "runs": runs, "mean": mean_rows}, indent=1))
    print("\n" + "\n".join(md[-(len(md) - 8):]))
    print(summary)


if __name__ == "__main__":
    main()
