"""Merge option refit=True on the ViT pair (`vit_pair.py`'s cached models): how its gain depends
on the calibration size and on the ridge toward the merged weight.

Zip with refit=True (norms repair) on each seed pair, with 2, 10, 40 (the default protocol's
400 images) and 200 calibration images per class of both tasks, and with the ridge at 1e-5,
1e-3 (the default), 1e-2, 1e-1 and 1 of the mean input power (400 images). Per-task mean
accuracy as a share of the ensemble's on the 10k test images; mean ± half-range over the seed
pairs, and each pair's value.

Rerun:  .venv/bin/python benchmarks/refit_sweep.py --cache DIR     (about 3 min with vit_pair's
        cached models; trains them otherwise)
Writes: benchmarks/results/refit_sweep.md, refit_sweep.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from _protocol import (
    EMBED_DIM,
    CosineClassifier,
    benchmark_parser,
    embedding_model,
    fashion_mnist_setup,
    rerun_command,
)
from vit_pair import TRAIN, VIT

import graphmerge as gm
import graphmerge.surgery.refit as refit_module
from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.evaluation import evaluate_multitask
from graphmerge.lab.experiment import TaskPairConfig, calibration_batches
from graphmerge.lab.training import predict_logits
from graphmerge.lab.zoo.registry import build

PER_CLASS = (2, 10, 40, 200)
RIDGES = (1e-5, 1e-3, 1e-2, 1e-1, 1.0)


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__, smoke="tiny untrained ViTs, 300 test images (tests)")
    p.add_argument("--seed-pairs", default="0,1;2,3;4,5")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render:
        render(json.loads((out / "refit_sweep.json").read_text()), out)
        return
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    tasks, x_test, y_test, calibration, pairs = fashion_mnist_setup(args.seed_pairs)
    classes = [list(t.classes) for t in tasks]
    per_class, ridges, vit = PER_CLASS, RIDGES, VIT
    if args.smoke:
        x_test, y_test, pairs = x_test[:300], y_test[:300], pairs[:1]
        per_class, ridges, vit = (2, 4), (1e-3, 1.0), {**VIT, "dim": 16, "depth": 1,
                                                         "mlp_dim": 16}
    default = refit_module.RIDGE
    runs = []
    for seeds in pairs:
        if args.smoke:
            models = []
            for s in seeds:
                torch.manual_seed(s)
                models.append(CosineClassifier(build("vit", num_classes=EMBED_DIM,
                                                     **vit)).eval())
        else:
            cfg = TaskPairConfig(family="vit", model=vit, seeds=seeds, epochs=8)
            models = [embedding_model(cfg, t, s, Path(args.cache), TRAIN)
                      for t, s in zip(tasks, seeds)]
        logits = [predict_logits(m, x_test) for m in models]
        ensemble = torch.stack([torch.log_softmax(lg, -1) for lg in logits]).mean(0)
        ens = evaluate_multitask(ensemble, y_test, classes)["task_mean"]
        settings = [("images per class", k, calibration_batches(tasks, per_class=k), default)
                    for k in per_class]
        settings += [("ridge", r, calibration, r) for r in ridges]
        for what, value, data, ridge in settings:
            refit_module.RIDGE = ridge
            try:
                res = gm.merge(models, data, method="zip", refit=True, progress=False)
            finally:
                refit_module.RIDGE = default
            score = evaluate_multitask(predict_logits(res.module, x_test), y_test,
                                       classes)["task_mean"]
            runs.append({"seeds": list(seeds), "what": what, "value": value,
                         "of_ensemble": score / ens, "error_before": res.refit.error_before,
                         "error_after": res.refit.error_after})
            print(f"{seeds} {what} {value}: {score / ens:.1%} of the ensemble's per-task mean; "
                  f"{res.refit.format()}", flush=True)
    record = {"command": rerun_command(__file__, argv), "seed_pairs": pairs, "runs": runs,
              "wall_minutes": (time.perf_counter() - t_start) / 60,
              "torch": torch.__version__, "machine": platform.machine()}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "refit_sweep.json", json.dumps(record, indent=1))
    render(record, out)


def render(record: dict, out: Path) -> None:
    """refit_sweep.md from the measured record."""
    md = ["# refit=True on the ViT pair: calibration size and ridge", "",
          "Zip with refit=True (norms repair) on `vit_pair.py`'s dim-64 models, seed pairs "
          f"{[tuple(p) for p in record['seed_pairs']]}. Per-task mean accuracy as a share of "
          "the ensemble's (10k test images); mean ± half-range over the seed pairs. The "
          "calibration error is the refitted layers' mean relative error on the calibration "
          "data after the refit (before it: the plain merge's).", "",
          f"Command: `{record['command'].strip()}`  ",
          f"torch {record['torch']}, {record['machine']}, 1 thread, wall time "
          f"{record['wall_minutes']:.1f} min", ""]
    for what, unit in (("images per class", "calibration images per class (10 classes)"),
                       ("ridge", "ridge (of the mean input power; 400 images)")):
        md += [f"| {unit} | of the ensemble's per-task mean | per seed pair | calibration "
               f"error before → after |", "|---|---|---|---|"]
        values = sorted({r["value"] for r in record["runs"] if r["what"] == what})
        for v in values:
            rs = [r for r in record["runs"] if r["what"] == what and r["value"] == v]
            share = [r["of_ensemble"] for r in rs]
            mean, half = sum(share) / len(share), (max(share) - min(share)) / 2
            before = sum(r["error_before"] for r in rs) / len(rs)
            after = sum(r["error_after"] for r in rs) / len(rs)
            md.append(f"| {v:g} | {mean:.1%} ± {half:.1%} | "
                      f"{', '.join(f'{s:.1%}' for s in share)} | {before:.3f} → {after:.3f} |")
        md.append("")
    write_text_atomic(out / "refit_sweep.md", "\n".join(md))
    print(f"wrote {out / 'refit_sweep.md'}; rerun: {record['command']}")


if __name__ == "__main__":
    main()
