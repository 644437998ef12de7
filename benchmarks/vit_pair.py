"""Merge quality of a vision-transformer pair in ZipIt!'s setting: two small ViTs trained on
disjoint Fashion-MNIST tasks (5+5 classes), merged with head-aware attention and with the
heads kept in place.

The protocol of `merge_quality.py` (its embedding protocol, `_protocol.py`): every ViT's head
maps the [cls] token to a 64-dim embedding and its logits are 16 · cos(embedding, class
embedding) against fixed, seeded, orthonormal class embeddings shared by both models; each
model is trained on its own 5 classes' logits, all logits are over all 10 classes (heads
averaged). ViT: 28×28 images in 7×7 patches (16 tokens + [cls]), dim 64, 4 heads of 16 dims,
depth 4, MLP 128, pre-norm (LayerNorm); AdamW.

Rows: each model alone, the ensemble, weight averaging, permutation and zip with head-aware
attention (the default: heads matched as wholes, each merged head's dims by its own transform),
and permutation and zip with the heads kept in place (merge option attention="frozen": head h
of A merged with head h of B, dim by dim; the residual stream and the MLPs merged as usual),
and zip with partial merges (cut after 1/3 and 2/3 of the weighted layers) for reference;
rows "…, rotated" with merge option rotate=True, rows "…, refit" with refit=True (every linear
layer refitted by least squares on the calibration data).
Norms "repair" (the default) and "none"; "reset" only recomputes BatchNorm statistics and a ViT
has none. Also checks that a self-merge with a permuted copy (heads and each head's dims
permuted) is exact under the defaults.

Rerun:  .venv/bin/python benchmarks/vit_pair.py     (about 15 min cold, 2 min cached)
        --dim 256 --seed-pairs 0,1: the same at another width (MLP 2 · dim; about 20 min per
        model to train at dim 256 on one thread), written as vit_pair_dim256.*
Writes: benchmarks/results/vit_pair.md, vit_pair.json, vit_pair.png
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch
from _protocol import (
    benchmark_parser,
    embedding_model,
    fashion_mnist_setup,
    mean_rows,
    plot,
    rerun_command,
    score,
    table,
)

import graphmerge as gm
from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.experiment import TaskPairConfig
from graphmerge.lab.training import predict_logits
from graphmerge.merge import rotation_rows

NORMS = ("repair", "none")
VARIANTS = {"average": {"method": "average"},
            "permute": {"method": "permute"},
            "zip": {"method": "zip"},
            "permute, heads frozen": {"method": "permute", "attention": "frozen"},
            "zip, heads frozen": {"method": "zip", "attention": "frozen"},
            "zip, partial 1/3": {"method": "zip", "partial": 1 / 3},
            "zip, partial 2/3": {"method": "zip", "partial": 2 / 3},
            "permute, rotated": {"method": "permute", "rotate": True},
            "zip, rotated": {"method": "zip", "rotate": True},
            "permute, refit": {"method": "permute", "refit": True},
            "zip, refit": {"method": "zip", "refit": True},
            "zip, rotated, refit": {"method": "zip", "rotate": True, "refit": True}}
VIT = {"patch_size": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_dim": 128}
TRAIN = {"optimizer": "adam", "lr": 1e-3}


def self_merge_error(model: torch.nn.Module, calibration, x_test, **options) -> dict:
    """Merge `model` with a copy whose every free space is permuted (heads as wholes, each
    head's dims by its own permutation), with the defaults and `options`; the largest output
    difference."""
    twin = gm.permute(model, calibration[0], seed=7)
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in
                    zip(model.state_dict().values(), twin.state_dict().values()))
    res = gm.merge([model, twin], calibration, progress=False, **options)
    x = x_test[:2000]
    ref = predict_logits(model, x)
    return {"twin_max_weight_change": moved,
            "twin_output_error": float((predict_logits(twin, x) - ref).abs().max()),
            "merged_output_error": float((predict_logits(res.module, x) - ref).abs().max()),
            "heads_spaces": len(gm.trace(model, calibration[0]).space_table.heads),
            "rotated": sorted(s for s, r in res.rotations.items() if r.ok)}


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__, smoke="tiny untrained ViTs, 500 test images, one seed pair "
                                        "(tests)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed-pairs", default="0,1;2,3;4,5")
    p.add_argument("--dim", type=int, default=VIT["dim"],
                   help="the stream's width (MLP 2 · dim, 4 heads); results of another width "
                        "than 64 go to vit_pair_dim<D>.*")
    args = p.parse_args(argv)
    out, stem = Path(args.out), _stem(args.dim)
    if args.render:
        render(json.loads((out / f"{stem}.json").read_text()), out)
        return
    torch.set_num_threads(1)
    if not args.smoke:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    t_start = time.perf_counter()
    tasks, x_test, y_test, calibration, pairs = fashion_mnist_setup(args.seed_pairs)
    vit = {**VIT, "dim": args.dim, "mlp_dim": 2 * args.dim}
    if args.smoke:
        x_test, y_test = x_test[:500], y_test[:500]
        calibration, pairs = calibration[:2], pairs[:1]
        vit = {**VIT, "dim": 16, "depth": 1, "mlp_dim": 16}
    runs, check, rotations = [], None, []
    for seeds in pairs:
        cfg = TaskPairConfig(family="vit", model=vit, seeds=seeds, epochs=args.epochs)
        if args.smoke:
            from _protocol import EMBED_DIM, CosineClassifier

            from graphmerge.lab.zoo.registry import build
            models = []
            for s in seeds:
                torch.manual_seed(s)
                models.append(CosineClassifier(build("vit", num_classes=EMBED_DIM, **vit)).eval())
        else:
            torch.set_flush_denormal(True)
            models = [embedding_model(cfg, t, s, Path(args.cache), TRAIN)
                      for t, s in zip(tasks, seeds)]
        if check is None:
            check = self_merge_error(models[0], calibration, x_test)
            check["with_rotation"] = self_merge_error(models[0], calibration, x_test,
                                                      rotate=True)
            check["with_refit"] = self_merge_error(models[0], calibration, x_test, refit=True)
            print(f"self-merge with a permuted copy: {check}", flush=True)
        notes = {}

        def on_merge(name, norm, res, notes=notes):
            if res.rotations and norm == NORMS[0]:
                notes[name] = rotation_rows(res.rotations)

        rows = score(models, tasks, calibration, "embedding", x_test, y_test, VARIANTS, NORMS,
                     on_merge=on_merge)
        rotations.append(notes)
        ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
        print(f"\nseeds {seeds}\n{table(rows, ens, EXTRA)}", flush=True)
        runs.append(rows)
    command = rerun_command(__file__, argv)
    record = {"command": command, "args": vars(args), "stem": stem, "vit": vit, "train": TRAIN,
              "seed_pairs": pairs, "self_merge": check, "runs": runs, "rotations": rotations,
              "mean": mean_rows(runs),
              "wall_minutes": (time.perf_counter() - t_start) / 60,
              "torch": torch.__version__, "machine": platform.machine()}
    for r, rows in zip(record["mean"], zip(*runs)):
        r["seconds"] = sum(x["seconds"] or 0 for x in rows) / len(rows) if r["norms"] else None
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{stem}.json", json.dumps(record, indent=1))
    render(record, out)


def _stem(dim: int) -> str:
    return "vit_pair" if dim == VIT["dim"] else f"vit_pair_dim{dim}"


EXTRA = [("merge s", "seconds", "{:.1f}")]


def _rotation_section(record: dict) -> list[str]:
    """The self-merge with rotate=True and, per seed pair, what the rotated merges rotated."""
    c = record["self_merge"].get("with_rotation")
    if c is None:
        return []
    md = ["## Rotation (merge option rotate=True)", "",
          "Rows \"…, rotated\": before matching, every space the graph lets rotate (every op "
          "on it commutes with an orthogonal map once each LayerNorm's affine is folded into "
          "the linears reading it) is rotated in model B onto model A by orthogonal "
          "Procrustes on the features' cross moment, kept to Q·1 = 1 (LayerNorm): an exact "
          "reparametrisation of B; then the same matcher runs.", "",
          f"Self-merge with the permuted copy and rotate=True: spaces rotated "
          f"{c['rotated']}, merged model's max |logit difference| "
          f"{c['merged_output_error']:.2g}.", ""]
    for seeds, notes in zip(record["seed_pairs"], record.get("rotations", [])):
        lines = notes.get("zip, rotated", [])
        if lines:
            md += [f"Seeds {tuple(seeds)}, zip rotated: " + "; ".join(x.strip() for x in lines),
                   ""]
    return md


def _refit_section(record: dict) -> list[str]:
    """What the rows with refit=True do, and the self-merge with it."""
    c = record["self_merge"].get("with_refit")
    if c is None:
        return []
    return ["## Refit (merge option refit=True)", "",
            "Rows \"…, refit\": after the norm correction every linear layer of the merged "
            "model is refitted in graph order by closed-form least squares on the 400 "
            "calibration images (every token a sample): on the inputs the merged model gives "
            "it, it reproduces the merged image of the parents' outputs of that layer, with a "
            "small ridge toward the merged weight. No gradient steps; the test set is not "
            "seen.", "",
            f"Self-merge with the permuted copy and refit=True: merged model's max |logit "
            f"difference| {c['merged_output_error']:.2g}.", ""]


def render(record: dict, out: Path) -> None:
    """vit_pair.md and .png (vit_pair_dim<D>.* at another width) from the measured record."""
    rows = record["mean"]
    ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
    ens_tasks = next(r["task_mean"] for r in rows if r["method"] == "ensemble")
    a, v = record["args"], record["vit"]
    stem = record.get("stem", "vit_pair")

    def row(method, norms="repair"):
        return next(r for r in rows if r["method"] == method and r["norms"] == norms)

    summary = [f"- {m} (repair): joint {row(m)['joint']:.1%} = {row(m)['joint'] / ens:.1%} of "
               f"the ensemble's; per-task mean {row(m)['task_mean']:.1%} = "
               f"{row(m)['task_mean'] / ens_tasks:.1%} of the ensemble's" for m in VARIANTS]
    c = record["self_merge"]
    md = ["# Merge quality: Fashion-MNIST 5+5, ViT pair", "",
          f"ViT: patch {v['patch_size']} (16 tokens + [cls]), dim {v['dim']}, {v['heads']} heads, "
          f"depth {v['depth']}, MLP {v['mlp_dim']}, pre-norm; 64-dim embedding head, cosine "
          f"logits against fixed orthonormal class embeddings (the embedding protocol of "
          f"`merge_quality.md`). Trained {a['epochs']} epochs per model with "
          f"{record['train']['optimizer']} (lr {record['train']['lr']}), seed pairs "
          f"{[tuple(p) for p in record['seed_pairs']]}; calibration: 40 training images per "
          f"class of both tasks (400); test: the full 10k test set. Joint: argmax over all 10 "
          f"classes. Mean ± half-range over the seed pairs; merge seconds are the mean wall time "
          f"of `gm.merge` (with its permutation-oracle check).", "",
          "**Heads frozen** is the merge option `attention=\"frozen\"`: every attention's heads "
          "and head dims keep the identity, so head h of model A is merged with head h of "
          "model B and dim j with dim j (q, k, v rows and the output projection's columns "
          "averaged in place, after the residual stream's transform); everything else (residual "
          "stream, MLP) is matched as usual. The default (`attention=\"heads\"`) matches heads "
          "as wholes and each merged head's dims by its own transform. Norms: `repair` "
          "(default) and `none`; `reset` recomputes BatchNorm statistics only and a ViT has "
          "none (LayerNorm only). Partial merges (zip, cut after 1/3 or 2/3 of the weighted "
          "layers: the graph up to the cut merged, after it each model keeps its own layers, "
          "fed through its unmerge matrices) are shown for reference; they have more "
          "parameters.", "",
          f"Command: `{record['command'].strip()}`  ",
          f"torch {record['torch']}, {record['machine']}, 1 thread, wall time "
          f"{record['wall_minutes']:.1f} min", "",
          "## Self-merge with a permuted copy (defaults: zip, repair)", "",
          f"Model A of the first seed pair merged with `gm.permute(model, x, seed=7)` (every free "
          f"space permuted; the {c['heads_spaces']} attention heads spaces as whole heads, each "
          f"head's dims by its own permutation): weights moved by up to "
          f"{c['twin_max_weight_change']:.3g}, the twin's outputs differ by "
          f"{c['twin_output_error']:.2g}, the merged model's by {c['merged_output_error']:.2g} "
          f"(max |logit difference| on 2,000 test images; logits are in [-16, 16]).", "",
          *_rotation_section(record), *_refit_section(record), "## Summary", "", *summary, "",
          "## Mean over seed pairs", "", table(rows, ens, EXTRA), ""]
    for seeds, run in zip(record["seed_pairs"], record["runs"]):
        e = next(r["joint"] for r in run if r["method"] == "ensemble")
        md += [f"## Seeds {tuple(seeds)}", "", table(run, e, EXTRA), ""]
    write_text_atomic(out / f"{stem}.md", "\n".join(md))
    plot({"ViT pair": rows}, out / f"{stem}.png", NORMS, title="{}: embedding protocol, mean "
         "over seed pairs")
    print("\n".join(summary))
    print(f"wrote {out / (stem + '.md')}; wall time {record['wall_minutes']:.1f} min; rerun: "
          f"{record['command']}")


if __name__ == "__main__":
    main()
