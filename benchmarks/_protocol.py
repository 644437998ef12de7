"""The protocol the merge-quality benchmarks share (ZipIt!'s, on two disjoint tasks):
cosine logits against fixed class embeddings, cached task models, scoring every merge with every
norm correction, mean rows over seed pairs, the markdown table and the bar plot.

Used by `merge_quality.py` (ResNets) and `vit_pair.py` (ViTs); `bbc_minilm.py` reuses the
table and the plot.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graphmerge as gm
from graphmerge.lab.evaluation import (
    ensemble_logits,
    evaluate_multitask,
    single_model_logits,
)
from graphmerge.lab.experiment import TaskPairConfig
from graphmerge.lab.training import cached_model, predict_logits, train_classifier
from graphmerge.lab.zoo.registry import build

EMBED_DIM, SCALE, CLASSES = 64, 16.0, 10
NORMS = ("repair", "reset", "none")


def fashion_mnist_setup(seed_groups: str, num_tasks: int = 2
                        ) -> tuple[list, torch.Tensor, torch.Tensor, list, list]:
    """The Fashion-MNIST disjoint-task protocol (5+5 classes, or 4+3+3 for three tasks):
    tasks, the 10k test set, the 400 calibration images, and the seed groups parsed from
    "0,1;2,3" (one seed per task in each group)."""
    from graphmerge.lab.data import fashion_mnist_tasks, load_fashion_mnist
    from graphmerge.lab.experiment import calibration_batches

    tasks = fashion_mnist_tasks("halves", num_tasks=num_tasks)
    x_test, y_test = load_fashion_mnist("test")
    groups = [tuple(int(s) for s in group.split(",")) for group in seed_groups.split(";")]
    if any(len(g) != num_tasks for g in groups):
        raise SystemExit(f"each seed group needs {num_tasks} seeds, one per task: {seed_groups!r}")
    return tasks, x_test, y_test, calibration_batches(tasks), groups


def benchmark_parser(doc: str, smoke: str | None = None) -> argparse.ArgumentParser:
    """The options these benchmarks share: --cache (trained models), --out (results),
    --render (rewrite the .md and .png from the measured .json) and, given its help text,
    --smoke."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--cache", default=str(here / "cache"))
    p.add_argument("--out", default=str(here / "results"))
    p.add_argument("--render", action="store_true",
                   help="only rewrite the .md and .png from the measured .json")
    if smoke is not None:
        p.add_argument("--smoke", action="store_true", help=smoke)
    return p


def rerun_command(script: str, argv: list[str] | None = None) -> str:
    """The command that reruns `script` (a benchmark's __file__) with these arguments."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *map(shlex.quote, args)])


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


def embedding_model(cfg: TaskPairConfig, task, seed: int, cache: Path,
                    train_options: dict[str, Any] | None = None) -> nn.Module:
    """A CosineClassifier on `cfg`'s backbone (EMBED_DIM outputs) trained on `task`'s logits,
    cached. `train_options` (e.g. {"optimizer": "adam"}) go to `train_classifier` and, when
    given, into the cache key."""
    train_options = dict(train_options or {})

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return TaskView(CosineClassifier(build(cfg.family, num_classes=EMBED_DIM, **cfg.model)),
                        list(task.classes))

    def fit(view: nn.Module) -> nn.Module:
        return train_classifier(view, task.train[0], task.train[1], epochs=cfg.epochs,
                                batch_size=cfg.batch_size, seed=seed, progress=False,
                                **train_options)

    key = {**cfg.key(task, seed), "head": f"cosine{EMBED_DIM}x{SCALE}"}
    if train_options:
        key["train"] = train_options
    return cached_model(key, make, fit, cache).model.eval()


def flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass on `inputs` (default: one 28×28 image)."""
    inputs = inputs or (torch.zeros(1, 1, 28, 28),)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


VARIANTS = {"average": {"method": "average"}, "permute": {"method": "permute"},
            "zip": {"method": "zip"}, "zip, partial 1/3": {"method": "zip", "partial": 1 / 3},
            "zip, partial 2/3": {"method": "zip", "partial": 2 / 3},
            "permute, refit": {"method": "permute", "refit": True},
            "zip, refit": {"method": "zip", "refit": True}}


def score(models, tasks, calibration, protocol, x_test, y_test, variants=None, norms=NORMS,
          on_merge=None):
    """Rows for each model alone, the ensemble and every variant × norm correction. Protocol
    "embedding": the models' logits cover all classes (heads averaged), "task": every model has
    its own head (heads="concat"). `on_merge(name, norms, result)` sees every merge."""
    classes = [list(t.classes) for t in tasks]
    concat = protocol == "task"
    rows = []

    def row(name, module, logits, norms="", seconds=None):
        r = evaluate_multitask(logits, y_test, classes)
        n_params = params(module) if module is not None else sum(params(m) for m in models)
        cost = flops(module) if module is not None else sum(flops(m) for m in models)
        rows.append({"method": name, "norms": norms, "joint": r["joint"],
                     "per_task": r["per_task"], "task_mean": r["task_mean"],
                     "params": n_params, "flops": cost, "seconds": seconds})

    logits = [predict_logits(m, x_test) for m in models]
    for i, (m, lg) in enumerate(zip(models, logits)):
        row(f"model {chr(ord('A') + i)} alone", m, single_model_logits(lg, i, classes) if concat else lg)
    if concat:
        ensemble = ensemble_logits(logits)
    else:
        ensemble = torch.stack([F.log_softmax(lg, -1) for lg in logits]).mean(0)
    row("ensemble", None, ensemble)
    for name, kwargs in (variants or VARIANTS).items():
        for norm in norms:
            t0 = time.perf_counter()
            res = gm.merge(models, calibration, heads="concat" if concat else "average",
                           norms=norm, progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            if on_merge is not None:
                on_merge(name, norm, res)
            row(name, res.module, predict_logits(res.module, x_test), norm, seconds)
    return rows


def mean_rows(runs):
    """Per row, the mean over the runs (seed pairs) and the half-range of the joint accuracy."""
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


def table(rows, ensemble_joint, extra=()):
    """Markdown rows: joint (± half-range), as a share of the ensemble's, per task, params,
    MFLOPs; `extra` = [(header, row key, format)] columns appended; a row with "error" shows
    it instead of the accuracies."""
    n_tasks = max((len(r["per_task"]) for r in rows if not r.get("error")), default=2)
    tasks = [f"task {chr(ord('A') + t)}" for t in range(n_tasks)]
    head = ["method", "norms", "joint", "of ensemble", *tasks, "task mean", "params", "MFLOPs",
            *(h for h, _, _ in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        more = [fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in extra]
        if r.get("error"):
            cells = [r["method"], r["norms"] or "-", f"refused: {r['error']}",
                     *["-"] * (4 + n_tasks), *more]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        spread = f" ± {r['spread']:.1%}" if "spread" in r else ""
        cells = [r["method"], r["norms"] or "-", f"{r['joint']:.1%}{spread}",
                 f"{r['joint'] / ensemble_joint:.1%}", *(f"{a:.1%}" for a in r["per_task"]),
                 f"{r['task_mean']:.1%}", f"{r['params']:,}",
                 f"{r['flops'] / 1e6:.1f}", *more]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path: Path, norms=NORMS, ylabel="joint accuracy (10 classes)",
         title="{} protocol, mean over seed pairs") -> None:
    """One panel per entry of `results` (name -> rows): a bar per merge and norm correction,
    the ensemble as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(results), 3)
    nrows = -(-len(results) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    width = 0.8 / len(norms)
    for ax, (name, rows) in zip(axes.flat, results.items()):
        ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
        merges = [r for r in rows if r["norms"]]
        names = list(dict.fromkeys(r["method"] for r in merges))
        for j, norm in enumerate(norms):
            vals = [next((r["joint"] for r in merges if r["method"] == n and r["norms"] == norm
                          and not r.get("error")), 0.0) for n in names]
            ax.bar([i + (j - (len(norms) - 1) / 2) * width for i in range(len(names))], vals,
                   width, label=norm)
        ax.axhline(ens, color="black", ls="--", lw=1, label="ensemble")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(name), fontsize=10)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
