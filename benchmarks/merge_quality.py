"""Merge quality in ZipIt!'s setting: two ResNets trained on disjoint Fashion-MNIST tasks (5+5
classes), merged by every method, with every norm correction, fully and partially.

Two protocols:

* **embedding** (the paper's): every model ends in a linear map to a 64-dim embedding and its
  logits are 16 · cos(embedding, class embedding) against fixed, seeded, orthonormal class
  embeddings shared by all models (ZipIt! and HET use CLIP text embeddings; none are
  available offline). Each model is trained on its own 5 classes' logits; all logits are over
  all 10 classes, so heads merge by averaging and the ensemble's joint accuracy is meaningful.
* **task**: each model has its own 5-class linear head; merges keep both heads
  (heads="concat"), the ensemble concatenates log-softmaxes.

Rows: each model alone, the ensemble, weight averaging, permutation, zip, and zip with a
partial merge cut after 1/3 and 2/3 of the weighted layers; every merge with norms "repair"
(the default), "reset" and "none". Mean ± half-range over the seed pairs; parameters and
FLOPs (one 28×28 image) beside each row.

Rerun:  .venv/bin/python benchmarks/merge_quality.py     (about 40 min cold, 5 min cached)
Writes: benchmarks/results/merge_quality.md, merge_quality.json, merge_quality.png
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
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graphmerge as gm
from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.data import fashion_mnist_tasks, load_fashion_mnist
from graphmerge.lab.evaluation import (
    ensemble_logits,
    evaluate_multitask,
    single_model_logits,
)
from graphmerge.lab.experiment import TaskPairConfig, calibration_batches, train_model
from graphmerge.lab.training import cached_model, predict_logits, train_classifier
from graphmerge.lab.zoo.registry import build

HERE = Path(__file__).resolve().parent
EMBED_DIM, SCALE, CLASSES = 64, 16.0, 10


def class_embeddings(seed: int = 0) -> torch.Tensor:
    """[10, 64] orthonormal rows, fixed by the seed."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(EMBED_DIM, CLASSES, generator=g))
    return q.T.contiguous()


class CosineClassifier(nn.Module):
    """logits = SCALE · cos(backbone(x), class embedding) over all classes. The embeddings are
    a plain tensor attribute, not a parameter or buffer: a constant the models share."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.embeddings = class_embeddings()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return SCALE * f @ self.embeddings.T


class TaskView(nn.Module):
    """Training view: the logits of one task's classes."""

    def __init__(self, model: nn.Module, classes: list[int]) -> None:
        super().__init__()
        self.model, self.classes = model, list(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.classes]


def embedding_model(cfg: TaskPairConfig, task, seed: int, cache: Path) -> nn.Module:
    def make() -> nn.Module:
        torch.manual_seed(seed)
        return TaskView(CosineClassifier(build(cfg.family, num_classes=EMBED_DIM, **cfg.model)),
                        list(task.classes))

    def fit(view: nn.Module) -> nn.Module:
        return train_classifier(view, task.train[0], task.train[1], epochs=cfg.epochs,
                                batch_size=cfg.batch_size, seed=seed, progress=False)

    key = {**cfg.key(task, seed), "head": f"cosine{EMBED_DIM}x{SCALE}"}
    return cached_model(key, make, fit, cache).model.eval()


def flops(model: nn.Module) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    return counter.get_total_flops()


def score(models, tasks, calibration, protocol, x_test, y_test):
    classes = [list(t.classes) for t in tasks]
    concat = protocol == "task"
    rows = []

    def row(name, module, logits, norms="", seconds=None):
        r = evaluate_multitask(logits, y_test, classes)
        params = sum(p.numel() for p in module.parameters()) if module is not None else sum(
            p.numel() for m in models for p in m.parameters())
        cost = flops(module) if module is not None else sum(flops(m) for m in models)
        rows.append({"method": name, "norms": norms, "joint": r["joint"],
                     "per_task": r["per_task"], "task_mean": r["task_mean"],
                     "params": params, "flops": cost, "seconds": seconds})

    logits = [predict_logits(m, x_test) for m in models]
    for i, (m, lg) in enumerate(zip(models, logits)):
        row(f"model {'AB'[i]} alone", m, single_model_logits(lg, i, classes) if concat else lg)
    if concat:
        ensemble = ensemble_logits(logits)
    else:
        ensemble = torch.stack([F.log_softmax(lg, -1) for lg in logits]).mean(0)
    row("ensemble", None, ensemble)
    variants = {"average": {"method": "average"}, "permute": {"method": "permute"},
                "zip": {"method": "zip"}, "zip, partial 1/3": {"method": "zip", "partial": 1 / 3},
                "zip, partial 2/3": {"method": "zip", "partial": 2 / 3}}
    for name, kwargs in variants.items():
        for norms in ("repair", "reset", "none"):
            t0 = time.perf_counter()
            res = gm.merge(models, calibration, heads="concat" if concat else "average",
                           norms=norms, progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            row(name, res.module, predict_logits(res.module, x_test), norms, seconds)
    return rows


def mean_rows(runs):
    out = []
    for k, first in enumerate(runs[0]):
        group = [r[k] for r in runs]
        joint = [g["joint"] for g in group]
        out.append({**{key: first[key] for key in ("method", "norms", "params", "flops")},
                    "joint": sum(joint) / len(joint), "spread": (max(joint) - min(joint)) / 2,
                    "task_mean": sum(g["task_mean"] for g in group) / len(group),
                    "per_task": [sum(g["per_task"][t] for g in group) / len(group)
                                 for t in range(len(first["per_task"]))]})
    return out


def table(rows, ensemble_joint):
    lines = ["| method | norms | joint | of ensemble | task A | task B | task mean | params | "
             "MFLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = f" ± {r['spread']:.1%}" if "spread" in r else ""
        lines.append(f"| {r['method']} | {r['norms'] or '-'} | {r['joint']:.1%}{spread} | "
                     f"{r['joint'] / ensemble_joint:.1%} | {r['per_task'][0]:.1%} | "
                     f"{r['per_task'][1]:.1%} | {r['task_mean']:.1%} | {r['params']:,} | "
                     f"{r['flops'] / 1e6:.1f} |")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, (protocol, rows) in zip(axes[0], results.items()):
        ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
        merges = [r for r in rows if r["norms"]]
        names = list(dict.fromkeys(r["method"] for r in merges))
        for j, norms in enumerate(("repair", "reset", "none")):
            vals = [next(r["joint"] for r in merges if r["method"] == n and r["norms"] == norms)
                    for n in names]
            ax.bar([i + (j - 1) * 0.27 for i in range(len(names))], vals, 0.27, label=norms)
        ax.axhline(ens, color="black", ls="--", lw=1, label="ensemble")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("joint accuracy (10 classes)")
        ax.set_title(f"{protocol} protocol, mean over seed pairs", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed-pairs", default="0,1;2,3;4,5")
    p.add_argument("--protocols", default="embedding,task")
    p.add_argument("--cache", default=str(HERE / "cache"))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--render", action="store_true",
                   help="only rewrite the .md and .png from the measured .json")
    args = p.parse_args()
    if args.render:
        out = Path(args.out)
        render(json.loads((out / "merge_quality.json").read_text()), out)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    tasks = fashion_mnist_tasks("halves")
    x_test, y_test = load_fashion_mnist("test")
    calibration = calibration_batches(tasks)
    pairs = [tuple(int(s) for s in pair.split(",")) for pair in args.seed_pairs.split(";")]
    cache = Path(args.cache)
    results, record = {}, {}
    for protocol in args.protocols.split(","):
        runs = []
        for seeds in pairs:
            cfg = TaskPairConfig(model={"depths": [2, 2, 2], "width": 2, "stem_stride": 2},
                                 seeds=seeds, epochs=args.epochs)
            models = [embedding_model(cfg, t, s, cache) if protocol == "embedding"
                      else train_model(cfg, t, s, cache, progress=False)
                      for t, s in zip(tasks, seeds)]
            rows = score(models, tasks, calibration, protocol, x_test, y_test)
            ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
            print(f"\n{protocol}, seeds {seeds}\n{table(rows, ens)}", flush=True)
            runs.append(rows)
        results[protocol] = mean_rows(runs)
        record[protocol] = {"seed_pairs": pairs, "runs": runs, "mean": results[protocol]}
    command = "python benchmarks/merge_quality.py " + " ".join(shlex.quote(a)
                                                                for a in sys.argv[1:])
    record = {"command": command, "args": vars(args), "protocols": record,
              "wall_minutes": (time.perf_counter() - t_start) / 60}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "merge_quality.json", json.dumps(record, indent=1))
    render(record, out)


def render(record: dict, out: Path) -> None:
    """merge_quality.md and .png from the measured record (merge_quality.json)."""
    args = record["args"]
    results = {protocol: r["mean"] for protocol, r in record["protocols"].items()}
    pairs = next(iter(record["protocols"].values()))["seed_pairs"]
    targets, sections = [], []
    for protocol, rows in results.items():
        ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
        for norms in ("repair", "reset"):
            full = next(r for r in rows if r["method"] == "zip" and r["norms"] == norms)
            partial = max((r for r in rows if r["method"].startswith("zip, partial")
                           and r["norms"] == norms), key=lambda r: r["joint"])
            targets.append(f"- {protocol}, {norms}: zip joint {full['joint']:.1%} = "
                           f"{full['joint'] / ens:.1%} of the ensemble's (target ≥ 92%); best "
                           f"partial ({partial['method']}) {partial['joint']:.1%} = "
                           f"{partial['joint'] / ens:.1%} (target ≥ 97%)")
        sections += [f"## {protocol} protocol (mean ± half-range over seed pairs)", "",
                     table(rows, ens), ""]
    md = ["# Merge quality: Fashion-MNIST 5+5, ResNet 2-2-2 ×2", "",
          f"{args['epochs']} epochs per model, seed pairs {[tuple(p) for p in pairs]}; "
          f"calibration: 40 training images per class of both tasks (400); test: the full 10k "
          f"test set. Partial cuts are after 1/3 and 2/3 of the weighted layers. Joint: argmax "
          f"over all 10 classes.", "", f"Command: `{record['command'].strip()}`  ",
          f"torch {torch.__version__}, {platform.machine()}, wall time "
          f"{record['wall_minutes']:.1f} min", "", "## Targets", "", *targets, "", *sections]
    write_text_atomic(out / "merge_quality.md", "\n".join(md) + "\n")
    plot(results, out / "merge_quality.png")
    print("\n".join(targets))
    print(f"wrote {out / 'merge_quality.md'}; rerun: {record['command']}")


if __name__ == "__main__":
    main()
