"""What the merge option rotate=True rotates outside the ViT pair, and that it costs no
exactness: a permuted self-merge of the zoo's ResNet, GPT (pre-norm, tied LM head) and ViT
with rotation off and on (max |output difference| and merge seconds), and the MiniLM pair as
`bbc_minilm.py` merges it (pretrained MiniLM-L6 ⊕ MiniLM-L3, depth 6 ⊕ 3, heads="concat";
what rotates is read from the graph, so fine-tuning would not change it). For each, the
spaces rotated and why each other was not.

Rerun:  .venv/bin/python benchmarks/rotate_checks.py     (about 1 min)
Writes: benchmarks/results/rotate_checks.md
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _protocol import rerun_command

import graphmerge as gm
from graphmerge.io.atomic import write_text_atomic
from graphmerge.lab.zoo.registry import builtin
from graphmerge.merge import rotation_rows


def self_merge(name: str, n: int = 64) -> list[str]:
    torch.manual_seed(0)
    m, x = builtin(name, n)
    b = gm.permute(m, x, seed=3)
    out, res = {}, None
    with torch.no_grad():
        ref = m(x)
        for rot in (False, True):
            t0 = time.perf_counter()
            res = gm.merge([m, b], [x], rotate=rot, progress=False)
            out[rot] = (float((res.module(x) - ref).abs().max()), time.perf_counter() - t0)
    return [f"## {name}: permuted self-merge", "",
            f"max |output difference| rotate=False {out[False][0]:.2g} ({out[False][1]:.1f} s), "
            f"rotate=True {out[True][0]:.2g} ({out[True][1]:.1f} s); outputs up to "
            f"{float(ref.abs().max()):.3g}", "", *_rows(res), ""]


def _rows(res) -> list[str]:
    return [f"- {line.strip()}" for line in rotation_rows(res.rotations)]


def minilm() -> list[str]:
    torch.manual_seed(0)
    l6, x = builtin("minilm-l6", 8, num_classes=3)
    l3, _ = builtin("minilm-l3", 8, num_classes=2)
    res = gm.merge([l6, l3], [x], heads="concat", rotate=True, progress=False)
    return ["## MiniLM-L6 ⊕ MiniLM-L3 (post-norm BERT, depth 6 ⊕ 3, heads=concat)", "",
            *_rows(res), ""]


def main() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    md = ["# rotate=True outside the ViT pair", "", __doc__.split("\n\n")[0].replace("\n", " "),
          ""]
    for name in ("resnet", "gpt", "vit"):
        md += self_merge(name)
    md += minilm()
    md += [f"Command: `{rerun_command(__file__).strip()}`  ",
           f"torch {torch.__version__}, 1 thread, wall time "
           f"{(time.perf_counter() - t0) / 60:.1f} min", ""]
    out = Path(__file__).parent / "results" / "rotate_checks.md"
    write_text_atomic(out, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
