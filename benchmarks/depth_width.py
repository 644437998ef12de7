"""Depth and width on every architecture: deepen, widen, and merges across depths and widths.

For each zoo family (ours and the community-style ones) and each transformers model of
tests/hf_models.py: the relative output error of `deepen(permute(m), reference)` (a deeper
model of the family) against m; of `merge([m, deepen(permute(m))])` and
`merge([m, widen(permute(m))])` against m (heads="average", norms="none", align="uniform" so
the units sit where deepen put them); and whether an independent deeper and wider variant
(another seed) merges with m into a finite model of m's output shape (its output's relative
distance to m's is shown; it is not expected to be small). A refusal shows its error class and
the first words of its message. Norm statistics and affine values are randomised as in the tests.

Rerun:  .venv/bin/python benchmarks/depth_width.py          (about 3 min)
Writes: benchmarks/results/depth_width.md
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_capture import _like, _randomise_norms  # noqa: E402

import graphmerge as gm  # noqa: E402
from graphmerge.graph.oracle import output_error  # noqa: E402
from graphmerge.io.atomic import write_text_atomic  # noqa: E402
from graphmerge.lab.zoo.registry import build, builtin  # noqa: E402

# family: (base kwargs, a deeper configuration, a deeper and wider one; None: no deeper one)
CONFIGS = {
    "mlp": ({"hidden": (64, 64)}, {"hidden": (64, 64, 64)}, {"hidden": (96, 96, 96)}),
    "resnet": ({"depths": (2, 2, 2), "stem_stride": 2}, {"depths": (4, 4, 4), "stem_stride": 2},
               {"depths": (4, 4, 4), "width": 2, "stem_stride": 2}),
    "vgg": ({"channels": (8, 8, "M", 16, 16), "hidden": 32},
            {"channels": (8, 8, 8, "M", 16, 16, 16), "hidden": 32},
            {"channels": (12, 12, 12, "M", 24, 24, 24), "hidden": 48}),
    "vit": ({"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
            {"dim": 32, "depth": 4, "heads": 4, "mlp_dim": 64},
            {"dim": 48, "depth": 4, "heads": 6, "mlp_dim": 96}),
    "mobilenet": ({}, {"depths": (1, 3, 3)}, {"depths": (1, 3, 3), "width": 2}),
    "densenet": ({}, {"block_layers": (5, 5)}, {"block_layers": (5, 5), "growth": 12}),
    "unet": ({}, None, {"base": 12}),
    "gpt": ({}, {"n_layer": 4}, {"n_layer": 4, "n_embd": 48, "n_head": 6}),
    "mha": ({}, {"depth": 4}, {"depth": 4, "dim": 48, "heads": 6, "mlp_dim": 96}),
    "convnext": ({}, {"depths": (2, 3)}, {"depths": (2, 3), "dims": (24, 48)}),
    "senet": ({}, {"depths": (2, 3)}, {"depths": (2, 3), "width": 2}),
    "functional": ({}, None, {"c1": 12, "c2": 10, "hidden": 48}),
}


def _refusal(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:70]}…".replace("|", "/").replace("\n", " ")


def _merge_error(model, other, calibration, x) -> str:
    result = gm.merge([model, other], calibration, x, heads="average", norms="none",
                      align="uniform", progress=False)
    return f"{output_error(model, result.module, calibration[0]):.1e}"


def _cell(fn) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except gm.GraphmergeError as e:
        return _refusal(e)


def row(name: str, model, x: tuple, deeper, variant) -> str:
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    twin = gm.permute(model, x, seed=1)
    cells = [name]
    if deeper is None:
        cells += ["no deeper configuration"] * 2
    else:
        deep: list = []

        def deepen() -> str:
            deep.append(gm.deepen(twin, x, deeper, calibration=calibration))
            return f"{output_error(model, deep[0], calibration[0]):.1e}"

        cells.append(_cell(deepen))
        cells.append(_cell(lambda: _merge_error(model, deep[0], calibration, x)) if deep
                     else "-")
    cells.append(_cell(lambda: _merge_error(model, gm.widen(twin, x, extra=0.5), calibration,
                                            x)))

    def independent() -> str:
        result = gm.merge([model, variant], calibration, x, heads="average", progress=False)
        with torch.no_grad():
            out, ref = result.module(*calibration[0]), model(*calibration[0])
        if out.shape != ref.shape or not torch.isfinite(out).all():
            return f"BAD: shape {tuple(out.shape)}, finite {bool(torch.isfinite(out).all())}"
        return f"finite, {tuple(out.shape)}, distance {float((out - ref).norm() / ref.norm()):.2f}"

    cells.append(_cell(independent))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    torch.set_flush_denormal(True)
    start = time.time()
    rows = ["| model | deepen error | merge with deepened copy | merge with widened copy | "
            "independent deeper + wider variant |", "|---|---|---|---|---|"]
    for name, (base, deeper, variant) in CONFIGS.items():
        model, x = builtin(name, batch=4, **base)
        model, x = _randomise_norms(model), (x,)
        torch.manual_seed(1)
        ref = build(name, **deeper).eval() if deeper is not None else None
        other = _randomise_norms(build(name, **variant).eval())
        rows.append(row(name, model, x, ref, other))
        print(rows[-1], flush=True)
    try:
        import hf_models
    except ImportError:
        print("transformers is not installed: the transformers rows are skipped")
    else:
        for name, make in sorted(hf_models.HF_MODELS.items()):
            model, x = make()
            deeper, _ = make(seed=1, layers=4)
            variant, _ = make(seed=2, layers=4, heads=6)
            rows.append(row(f"transformers {name}", model, x, deeper, variant))
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Depth and width on every architecture", "",
        "Rerun: `.venv/bin/python benchmarks/depth_width.py`", "",
        "Relative output errors against the model m (3 × 16 calibration samples). Deeper "
        "configurations and variants: see `CONFIGS` in the script (transformers: 4 layers "
        "instead of 2; the variant also has 6 heads of width 8 instead of 4, hidden 48). Post-norm models (BERT, "
        "DistilBERT) cannot be deepened exactly: their inserted units' norms are fitted (exact "
        "here because these randomly initialised norms have unit affine).", "",
        *rows, "", f"Wall time {time.time() - start:.0f} s, torch {torch.__version__}.", ""])
    out = HERE / "results" / "depth_width.md"
    write_text_atomic(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
