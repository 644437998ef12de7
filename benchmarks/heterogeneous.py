"""Merging ResNets of different depths and widths on Fashion-MNIST disjoint tasks.

Each heterogeneous zip is shown beside the homogeneous zip of the architectures involved: depth
(depths 1-1-1 vs 2-2-2 and 2-2-2 vs 4-4-4, width ×2) with LMA, SMA and uniform alignment (with one
shallow unit per stage all three coincide); width (×1 vs ×2);
depth + width; and three models on three tasks (classes 0-3, 4-6, 7-9). Models are trained once
and cached. Also draws the unit CKA matrices with the chosen alignment of the depth merge.

Rerun:  .venv/bin/python benchmarks/heterogeneous.py     (about 40 min cold, 4 min cached)
Writes: benchmarks/results/heterogeneous.md, heterogeneous.json, cka_alignment.png
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from graphmerge.io.plots import plot_alignment
from graphmerge.lab.data import fashion_mnist_tasks
from graphmerge.lab.experiment import (
    TaskPairConfig,
    calibration_batches,
    format_table,
    score_methods,
    train_model,
)

HERE = Path(__file__).resolve().parent
D1, D2, D4 = [1, 1, 1], [2, 2, 2], [4, 4, 4]


def arch(depths, width, epochs):
    return TaskPairConfig(model={"depths": depths, "width": width, "stem_stride": 2},
                          epochs=epochs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2", help="seeds of the models of tasks 0, 1, 2")
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = Path(args.cache)
    e = args.epochs

    def models(tasks, archs):
        return [train_model(a, t, s, cache, progress=False) for t, a, s in zip(tasks, archs, seeds)]

    pairs = fashion_mnist_tasks("halves")
    triples = fashion_mnist_tasks("halves", num_tasks=3)
    # BatchNorm statistics reset, ZipIt!'s protocol for per-task heads (benchmarks/
    # merge_quality.py compares it with REPAIR, the library's default)
    lma = {"method": "zip", "align": "lma", "norms": "reset"}
    sma, uniform = {**lma, "align": "sma"}, {**lma, "align": "uniform"}
    experiments = [
        ("homogeneous depth 1-1-1, ×2", pairs, [arch(D1, 2, e), arch(D1, 2, e)], {"zip": lma}),
        ("homogeneous depth 2-2-2, ×2", pairs, [arch(D2, 2, e), arch(D2, 2, e)], {"zip": lma}),
        ("depth: 1-1-1 ⊕ 2-2-2, ×2", pairs, [arch(D1, 2, e), arch(D2, 2, e)],
         {"zip, LMA": lma, "zip, SMA": sma, "zip, uniform": uniform}),
        ("homogeneous depth 4-4-4, ×2", pairs, [arch(D4, 2, e), arch(D4, 2, e)], {"zip": lma}),
        ("depth: 2-2-2 ⊕ 4-4-4, ×2", pairs, [arch(D2, 2, e), arch(D4, 2, e)],
         {"zip, LMA": lma, "zip, SMA": sma, "zip, uniform": uniform}),
        ("homogeneous width ×1, 2-2-2", pairs, [arch(D2, 1, e), arch(D2, 1, e)], {"zip": lma}),
        ("width: ×1 ⊕ ×2, 2-2-2", pairs, [arch(D2, 1, e), arch(D2, 2, e)], {"zip": lma}),
        ("depth + width: 1-1-1 ×1 ⊕ 2-2-2 ×2", pairs, [arch(D1, 1, e), arch(D2, 2, e)],
         {"zip, LMA": lma}),
        ("homogeneous 3 models: 2-2-2 ×2", triples, [arch(D2, 2, e)] * 3, {"zip": lma}),
        ("3 models: 1-1-1 ×2, 2-2-2 ×2, 2-2-2 ×1", triples,
         [arch(D1, 2, e), arch(D2, 2, e), arch(D2, 1, e)], {"zip, LMA": lma}),
    ]
    sections, record, png = [], [], None
    for title, tasks, archs, variants in experiments:
        ms = models(tasks, archs)
        calib = calibration_batches(tasks)
        rows, results = score_methods(ms, tasks, calib, variants, progress=False, alone=False)
        table = format_table(rows)
        align_lines = []
        for name, res in results.items():
            for a in res.alignments:
                if len(set(a.depths)) > 1:
                    align_lines.append(f"- {name}: stage {a.stage} ({a.name}), depths "
                                       f"{a.depths}, unit positions {a.positions}")
            if png is None and title.startswith("depth: 2-2-2") and name == "zip, LMA":
                stages = [(a.cka[i], a.positions[i]) for a in res.alignments
                          for i in range(len(a.depths)) if a.cka[i] is not None]
                titles = [f"stage {a.stage} ({a.name}): model {i} in model {a.reference}"
                          for a in res.alignments for i in range(len(a.depths))
                          if a.cka[i] is not None]
                png = plot_alignment(stages, Path(args.out) / "cka_alignment.png", titles)
        sections += [f"## {title}", "", table, "", *align_lines, ""]
        record.append({"title": title, "rows": rows})
        print(f"\n## {title}\n{table}", flush=True)
    command = "python benchmarks/heterogeneous.py " + " ".join(sys.argv[1:])
    md = ["# Heterogeneous merging on Fashion-MNIST disjoint tasks", "",
          f"ResNets with a stride-2 stem, {e} epochs per model, seeds {seeds} for the models of "
          f"tasks 0, 1, 2; merged with zip (alpha 0.5, beta 1), heads kept per task, BatchNorm "
          f"reset on 40 training images per class; full 10k test set. Shallower models are "
          f"expanded with identity units at the aligned positions. CKA matrices with the LMA "
          f"alignment of the depth merge: `cka_alignment.png`.", "",
          f"Command: `{command.strip()}`  ", f"Date: {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()}, torch {torch.__version__}", "", *sections]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heterogeneous.md").write_text("\n".join(md))
    (out / "heterogeneous.json").write_text(json.dumps({"command": command, "experiments": record},
                                                       indent=1))
    print(f"wrote {out / 'heterogeneous.md'}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
