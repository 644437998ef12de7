"""Heterogeneous merges with every norm correction over several seed groups, beside the
homogeneous zip of the larger configuration (Fashion-MNIST disjoint tasks, ResNets, the task
protocol).

`heterogeneous.py` shows one seed triple with BatchNorm reset; this one repeats the
heterogeneous rows with norms "repair" (the default), "reset" and "none" on 3 seed groups:
depth 2-2-2 ⊕ 4-4-4 (width ×2) with LMA, SMA and uniform alignment beside 4-4-4 ⊕ 4-4-4;
width ×1 ⊕ ×2 (2-2-2) beside ×2 ⊕ ×2 and ×2 ⊕ ×4 beside ×4 ⊕ ×4; depth + width 1-1-1 ×1 ⊕
2-2-2 ×2 beside 2-2-2 ×2 ⊕ 2-2-2 ×2; three models (1-1-1 ×2, 2-2-2 ×2, 2-2-2 ×1 on classes
0-3, 4-6, 7-9) beside three 2-2-2 ×2. Model A (task: classes 0-4) is the smaller one. Target:
each heterogeneous zip within 1 point of the homogeneous reference's joint accuracy (same
norms).

Rerun:  .venv/bin/python benchmarks/heterogeneous_norms.py   (about 2 h cold, 30 min cached)
        --experiments 3,4 reruns some rows and keeps the others' results in the JSON.
Writes: benchmarks/results/heterogeneous_norms.md, heterogeneous_norms.json, .png
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch
from _protocol import (
    NORMS,
    benchmark_parser,
    fashion_mnist_setup,
    mean_rows,
    plot,
    rerun_command,
    score,
    table,
)
from heterogeneous import arch

from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.experiment import train_model
from graphmerge.lab.zoo.registry import build

D1, D2, D4 = [1, 1, 1], [2, 2, 2], [4, 4, 4]
ALIGN = {"zip, LMA": {"method": "zip", "align": "lma"},
         "zip, SMA": {"method": "zip", "align": "sma"},
         "zip, uniform": {"method": "zip", "align": "uniform"}}
ZIP = {"zip": {"method": "zip"}}
# name -> (architectures of models A, B[, C], variants, homogeneous reference architecture)
EXPERIMENTS = {
    "depth: 2-2-2 ⊕ 4-4-4, ×2": (((D2, 2), (D4, 2)), ALIGN, (D4, 2)),
    "width: ×1 ⊕ ×2, 2-2-2": (((D2, 1), (D2, 2)), ZIP, (D2, 2)),
    "depth + width: 1-1-1 ×1 ⊕ 2-2-2 ×2": (((D1, 1), (D2, 2)), ALIGN, (D2, 2)),
    "width: ×2 ⊕ ×4, 2-2-2": (((D2, 2), (D2, 4)), ZIP, (D2, 4)),
    "3 models: 1-1-1 ×2, 2-2-2 ×2, 2-2-2 ×1": (((D1, 2), (D2, 2), (D2, 1)), ALIGN, (D2, 2)),
}


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__, smoke="untrained models, 500 test images, one seed group, "
                                        "one variant (tests)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed-pairs", default="0,1;2,3;4,5")
    p.add_argument("--seed-triples", default="0,1,2;3,4,5;6,7,8")
    p.add_argument("--experiments", default=",".join(str(i) for i in range(len(EXPERIMENTS))),
                   help="indices into EXPERIMENTS; results of the others are kept from the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    saved = out / "heterogeneous_norms.json"
    if args.render:
        render(json.loads(saved.read_text()), out)
        return
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if not args.smoke:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    setups = {2: fashion_mnist_setup(args.seed_pairs), 3: fashion_mnist_setup(args.seed_triples, 3)}
    if args.smoke:
        setups = {n: (tasks, x[:500], y[:500], calibration[:2], groups[:1])
                  for n, (tasks, x, y, calibration, groups) in setups.items()}
    cache, e = Path(args.cache), args.epochs
    names = list(EXPERIMENTS)
    record = json.loads(saved.read_text())["experiments"] if saved.exists() else {}
    reference_rows = {}

    def model(a, task, seed):
        if not args.smoke:
            return train_model(arch(*a, e), task, seed, cache, progress=False)
        torch.manual_seed(seed)
        cfg = arch(*a, e)
        return build(cfg.family, num_classes=len(task.classes), **cfg.model).eval()

    for k in (int(i) for i in args.experiments.split(",")):
        t_start = time.perf_counter()
        name = names[k]
        archs, variants, ref = EXPERIMENTS[name]
        tasks, x_test, y_test, calibration, groups = setups[len(archs)]
        if args.smoke:
            variants = dict(list(variants.items())[:1])
        hetero, homo = [], []
        for seeds in groups:
            models = [model(a, t, s) for a, t, s in zip(archs, tasks, seeds)]
            rows = score(models, tasks, calibration, "task", x_test, y_test, variants)
            key = json.dumps([ref, seeds])
            if key not in reference_rows:  # one reference may serve several experiments
                refs = [model(ref, t, s) for t, s in zip(tasks, seeds)]
                reference_rows[key] = score(refs, tasks, calibration, "task", x_test, y_test,
                                            ZIP)
            ref_rows = reference_rows[key]
            ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
            print(f"\n{name}, seeds {seeds}\n{table(rows, ens)}\nreference\n"
                  f"{table(ref_rows, ens)}", flush=True)
            hetero.append(rows)
            homo.append(ref_rows)
        command = rerun_command(__file__, argv)
        record[name] = {"archs": archs, "reference": ref, "seeds": groups, "runs": hetero,
                        "reference_runs": homo, "mean": mean_rows(hetero),
                        "reference_mean": mean_rows(homo), "epochs": e, "command": command,
                        "wall_minutes": (time.perf_counter() - t_start) / 60}
        write(record, out)  # after every experiment


def write(experiments: dict, out: Path) -> None:
    record = {"experiments": experiments, "torch": torch.__version__,
              "machine": platform.machine()}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "heterogeneous_norms.json", json.dumps(record, indent=1))
    render(record, out)


def render(record: dict, out: Path) -> None:
    targets, sections, panels, commands = [], [], {}, {}
    order = list(EXPERIMENTS)
    for name, ex in sorted(record["experiments"].items(),
                           key=lambda e: order.index(e[0]) if e[0] in order else len(order)):
        rows, refs = ex["mean"], ex["reference_mean"]
        ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
        ref_name = f"{'-'.join(map(str, ex['reference'][0]))} ×{ex['reference'][1]}"
        for norms in NORMS:
            ref = next(r for r in refs if r["method"] == "zip" and r["norms"] == norms)
            for r in rows:
                if r["norms"] == norms:
                    gap = r["joint"] - ref["joint"]
                    verdict = ("above" if gap > 0 else "within 1 point" if gap >= -0.01
                               else "missed")
                    targets.append(f"- {name}, {r['method']}, {norms}: {r['joint']:.1%} "
                                   f"(± {r['spread']:.1%}) vs homogeneous {ref_name} "
                                   f"{ref['joint']:.1%} (± {ref['spread']:.1%}): {gap:+.1%} "
                                   f"({verdict}); mean per-task accuracy "
                                   f"{r['task_mean']:.1%} vs {ref['task_mean']:.1%}")
        marked = [{**r, "method": f"homogeneous {ref_name} zip"} for r in refs if r["norms"]]
        copies = " ⊕ ".join([ref_name] * len(ex["archs"]))
        took = f", {ex['wall_minutes']:.0f} min" if ex["wall_minutes"] is not None else ""
        sections += [f"## {name} (mean ± half-range over seed groups "
                     f"{[tuple(s) for s in ex['seeds']]}{took})", "",
                     table(rows, ens), "",
                     f"Homogeneous reference {copies} (its own ensemble and models; 'of "
                     f"ensemble' relative to the heterogeneous models' ensemble):", "",
                     table(refs, ens), ""]
        panels[name] = [*rows, *marked]
        commands.setdefault(ex["command"].strip(), []).append(name)
    epochs = sorted({ex["epochs"] for ex in record["experiments"].values()})
    md = ["# Heterogeneous merges with every norm correction (Fashion-MNIST, ResNets)", "",
          f"Task protocol (each model its own head, heads=\"concat\"), ResNets with a stride-2 "
          f"stem, {'/'.join(map(str, epochs))} epochs per model. Two models: model A on classes "
          f"0-4 (the smaller architecture), model B on classes 5-9. Three models: classes 0-3, "
          f"4-6, 7-9. Calibration: 40 training images per class (400); full 10k test set. Mean "
          f"± half-range over the seed groups (one seed per model).", "",
          f"torch {record['torch']}, {record['machine']}, 1 thread. Commands that produced the "
          f"results:", "", *(f"- `{c}`: {', '.join(n)}" for c, n in commands.items()), "",
          "## Target: within 1 point of the homogeneous zip (same norms)", "", *targets, "",
          *sections]
    write_text_atomic(out / "heterogeneous_norms.md", "\n".join(md))
    plot(panels, out / "heterogeneous_norms.png", NORMS, title="{}")
    print("\n".join(targets))
    print(f"wrote {out / 'heterogeneous_norms.md'}; rerun: {', '.join(commands)}")


if __name__ == "__main__":
    main()
