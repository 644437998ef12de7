"""Speed of the fast zip matcher against the naive loop (same groups), and end-to-end merge time.

For each size the correlation matrix comes from random features of two models that share a
latent signal (so there is real structure to match). Both matchers run on the same matrix in the
same process; the table gives the median of repeats and checks that the groups are identical.
Above --full-naive-up-to (4096 units) the naive loop (tens of minutes at 4096+4096) is timed on
its first merges and scaled to all d - r merges. Each merge masks the whole d x d matrix and
scans the live pairs, which shrink as groups merge, so the scaled time is an upper estimate.

Rerun:  .venv/bin/python benchmarks/speed.py            (about 3 min; --quick for a minute)
Writes: benchmarks/results/speed.md and speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from graphmerge.match.matchers import zip_groups, zip_groups_naive

HERE = Path(__file__).resolve().parent


def correlated(widths: tuple[int, ...], samples: int = 4096, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((samples, 256))
    feats = [np.tanh(latent @ rng.standard_normal((256, w)) / 16
                     + 0.5 * rng.standard_normal((samples, w))) for w in widths]
    return np.corrcoef(np.concatenate(feats, axis=1), rowvar=False)


def timed(fn, repeats: int) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the fast matcher")
    p.add_argument("--naive-repeats", type=int, default=1,
                   help="repeats of the naive loop (it takes minutes at 4096+4096)")
    p.add_argument("--full-naive-up-to", type=int, default=4096,
                   help="run the whole naive loop up to this d; above, time a prefix and scale")
    p.add_argument("--naive-prefix", type=int, default=128, help="merges timed when scaling")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    sizes = [(256, 256), (512, 512)] if args.quick else [(1024, 1024), (2048, 1024),
                                                            (4096, 4096)]
    rows = []
    for widths in sizes:
        corr = correlated(widths)
        r = max(widths)
        fast_s, fast = timed(lambda: zip_groups(corr, list(widths), r, 0.5, 1.0), args.repeats)
        d = sum(widths)
        if d <= args.full_naive_up_to:
            naive_s, naive = timed(lambda: zip_groups_naive(corr, list(widths), r, 0.5, 1.0),
                                   args.naive_repeats)
            same, how = fast == naive, "measured"
        else:
            # time the naive loop's first k merges and scale to all d - r merges (an upper
            # estimate: later merges scan fewer live pairs)
            k = args.naive_prefix
            prefix_s, _ = timed(lambda: zip_groups_naive(corr, list(widths), d - k, 0.5, 1.0),
                                args.naive_repeats)
            naive_s, same, how = (prefix_s * (d - r) / k, None,
                                  f"first {k} merges timed, scaled (upper estimate)")
        rows.append({"widths": list(widths), "r": r, "fast_s": fast_s, "naive_s": naive_s,
                     "speedup": naive_s / fast_s, "same_groups": same, "naive": how})
        print(f"d = {'+'.join(map(str, widths))}, r = {r}: fast {fast_s:.3f} s, naive "
              f"{naive_s:.2f} s ({how}), speed-up {naive_s / fast_s:.0f}x, same groups: {same}",
              flush=True)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    md = ["# Zip matcher: fast vs naive loop", "",
          f"Command: `{command.strip()}`  ",
          f"Date: {time.strftime('%Y-%m-%d')}, {platform.machine()}, numpy {np.__version__}, "
          f"torch {torch.__version__}; fast: median of {args.repeats}, naive: median of "
          f"{args.naive_repeats}; alpha 0.5, beta 1, r = the larger width.", "",
          "| d | r | fast | naive | naive timing | speed-up | same groups |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {'+'.join(map(str, x['widths']))} | {x['r']} | {x['fast_s']:.3f} s | "
           f"{x['naive_s']:.2f} s | {x['naive']} | {x['speedup']:.0f}× | "
           f"{'not compared' if x['same_groups'] is None else x['same_groups']} |" for x in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "speed_quick" if args.quick else "speed"
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
