"""Speed of the fast zip matcher against the naive loop (same groups), one thread.

For each size the correlation matrix comes from random features of two models that share a
latent signal (so there is real structure to match). Both matchers run on the same matrix in the
same process; the table gives the median (and best) of repeats and checks that the groups are
identical; the speed-up is median against median.
Up to --full-naive-up-to units (default 3072) the whole naive loop is timed. Above, its first
--naive-prefix merges are timed and scaled to all d - r merges: each naive merge masks the
whole d x d matrix and scans the live pairs, which shrink as groups merge, so the scaled time
should overestimate; the sizes timed in full are also estimated that way, to show how close it
is. Above the largest size timed in full, its time is also scaled by the O((d - r) d^2) cost.

Rerun:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py      (about 4 min; --quick: seconds)
Writes: benchmarks/results/speed.md and speed.json (speed_quick.* with --quick)

--matcher W (e.g. 8192): instead, the whole matching of one space of W + W units whose
statistics come from --samples random samples (rank-deficient, as calibration statistics of
wide layers are): SpaceStats.correlation, then zip_match exact (on a copy, as a caller's matrix
is; and on the correlation lent to it, `overwrite=True`, as `match_spaces` runs it) and with
--candidates, wall and CPU seconds, and the candidate variant's quality against the exact one
(groups identical, mean matched correlation). Writes its lines into speed.md's section "The
whole matching of one space" (replaced on each run).
Rerun:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed.py --matcher 8192
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphmerge.match.matchers import zip_groups, zip_groups_naive, zip_match  # noqa: E402
from graphmerge.match.statistics import SpaceStats  # noqa: E402

HERE = Path(__file__).resolve().parent


def correlated(widths: tuple[int, ...], samples: int = 4096, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((samples, 256))
    feats = [np.tanh(latent @ rng.standard_normal((256, w)) / 16
                     + 0.5 * rng.standard_normal((samples, w))) for w in widths]
    return np.corrcoef(np.concatenate(feats, axis=1), rowvar=False)


def timed(fn, repeats: int) -> tuple[float, list, list[float]]:
    """Median seconds of `repeats` calls, the last result, and every time."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, times


def prefix_estimate(corr: np.ndarray, widths: list[int], r: int, k: int) -> float:
    """The naive loop's first k merges, timed once and scaled to all d - r merges."""
    d = sum(widths)
    k = min(k, d - r)
    seconds, _, _ = timed(lambda: zip_groups_naive(corr, widths, d - k, 0.5, 1.0), 1)
    return seconds * (d - r) / k


def matcher_benchmark(width: int, samples: int, candidates: list[int]) -> list[str]:
    """Correlation and zip_match of a [2 width, 2 width] space from `samples` random samples:
    the lines printed."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(samples, 64, generator=gen)
    feats = [torch.tanh(latent @ torch.randn(64, width, generator=gen) / 8
                        + torch.randn(samples, width, generator=gen)) for _ in range(2)]
    stats = SpaceStats([width, width])
    stats.add(feats)

    def clock(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    lines = []

    def say(line: str) -> None:
        lines.append(f"{line} (load average {os.getloadavg()[0]:.1f})")
        print(lines[-1], flush=True)

    corr, wall, cpu = clock(stats.correlation)
    say(f"correlation [{2 * width}, {2 * width}] from {samples} samples: {wall:.2f} s wall, "
        f"{cpu:.2f} s CPU")
    exact = None
    runs = [("exact, on a copy", 0, False), *[(f"{k} candidates", k, False) for k in candidates],
            ("exact, on the lent correlation (overwrite=True, as match_spaces)", 0, True)]
    for what, k, lent in runs:  # the lent run last: it overwrites corr's upper triangle
        match, wall, cpu = clock(lambda k=k, lent=lent: zip_match(
            corr, [width, width], candidates=k, overwrite=lent))
        line = (f"zip_match {width}+{width} -> {width}, {what}: {wall:.2f} s wall, {cpu:.2f} s "
                f"CPU, mean matched correlation {match.mean_correlation:.4f}")
        if exact is None:
            exact = match
        else:
            same = len({tuple(g) for g in match.groups} & {tuple(g) for g in exact.groups})
            line += f", groups identical to exact: {same / exact.width:.1%}"
        say(line)
    return lines


def write_matcher_section(lines: list[str], path: Path, args: argparse.Namespace) -> None:
    """speed.md's section on the whole matching of one space, replaced by `lines`."""
    head = "## The whole matching of one space"
    text = path.read_text() if path.exists() else "# Zip matcher: fast vs naive loop\n"
    text = text.split(f"\n{head}")[0].rstrip("\n")
    cmd = (f"OMP_NUM_THREADS=1 python benchmarks/speed.py --matcher {args.matcher} "
           f"--samples {args.samples}")
    section = [head, "", f"Command: `{cmd}`  ",
               f"Date: {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch "
               f"{torch.__version__}, {torch.get_num_threads()} thread(s). Two models of "
               f"{args.matcher} units, statistics from {args.samples} random samples "
               f"(rank-deficient). Wall includes the page faults of fresh memory, which are "
               f"slow on this machine (about 3 s per GiB).", "",
               *[f"- {ln}" for ln in lines]]
    from graphmerge.io.atomic import write_text_atomic

    write_text_atomic(path, text + "\n\n" + "\n".join(section) + "\n")

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--repeats", type=int, default=7, help="repeats of the fast matcher")
    p.add_argument("--naive-repeats", type=int, default=1, help="repeats of the naive loop")
    p.add_argument("--full-naive-up-to", type=int, default=3072,
                   help="run the whole naive loop up to this d; above, time a prefix and scale")
    p.add_argument("--naive-prefix", type=int, default=32, help="merges timed when scaling")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--matcher", type=int, default=0,
                   help="time the whole matching of a W+W space instead (see above)")
    p.add_argument("--samples", type=int, default=256, help="samples of --matcher's statistics")
    p.add_argument("--candidates", type=int, nargs="*", default=[32, 16],
                   help="candidate counts of zip_match timed with --matcher")
    args = p.parse_args()
    if args.matcher:
        torch.set_flush_denormal(True)
        lines = matcher_benchmark(args.matcher, args.samples, args.candidates)
        write_matcher_section(lines, Path(args.out) / "speed.md", args)
        return
    sizes = [(256, 256), (512, 512)] if args.quick else [(1024, 1024), (2048, 1024),
                                                            (4096, 4096), (8192, 8192)]
    load_before = os.getloadavg()
    rows = []
    for widths in sizes:
        corr = correlated(widths)
        ws, r, d = list(widths), max(widths), sum(widths)
        fast_s, fast, fast_times = timed(lambda: zip_groups(corr, ws, r, 0.5, 1.0),
                                         args.repeats)
        estimate = prefix_estimate(corr, ws, r, args.naive_prefix)
        if d <= args.full_naive_up_to:
            naive_s, naive, _ = timed(lambda: zip_groups_naive(corr, ws, r, 0.5, 1.0),
                                      args.naive_repeats)
            same, how = fast == naive, "measured"
        else:
            naive_s, same = estimate, None
            how = f"first {args.naive_prefix} merges timed, scaled (estimate)"
        rows.append({"widths": ws, "r": r, "fast_s": fast_s, "fast_times_s": fast_times,
                     "naive_s": naive_s,
                     "naive": how, "naive_prefix_estimate_s": estimate,
                     "speedup": naive_s / fast_s, "same_groups": same})
        print(f"d = {'+'.join(map(str, widths))}, r = {r}: fast {fast_s:.3f} s, naive "
              f"{naive_s:.2f} s ({how}; prefix estimate {estimate:.2f} s), speed-up "
              f"{naive_s / fast_s:.0f}x, same groups: {same}", flush=True)
    load_after = os.getloadavg()
    command = ("OMP_NUM_THREADS=" + os.environ["OMP_NUM_THREADS"] + " python benchmarks/speed.py "
               + " ".join(sys.argv[1:])).strip()
    md = ["# Zip matcher: fast vs naive loop", "",
          f"Command: `{command}`  ",
          f"Date: {time.strftime('%Y-%m-%d')}, {platform.machine()}, numpy {np.__version__}, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (one "
          f"thread); fast: median of {args.repeats}, naive: median of {args.naive_repeats}; "
          f"alpha 0.5, beta 1, r = the larger width. Load average before / after: "
          f"{load_before[0]:.1f} / {load_after[0]:.1f} (a shared 2-core machine).", "",
          "| d | r | fast | fast, best | naive | naive timing | speed-up | same groups |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {'+'.join(map(str, x['widths']))} | {x['r']} | {x['fast_s']:.3f} s | "
           f"{min(x['fast_times_s']):.3f} s | "
           f"{x['naive_s']:.2f} s | {x['naive']} | {x['speedup']:.0f}× | "
           f"{'not compared' if x['same_groups'] is None else x['same_groups']} |" for x in rows]
    measured = [x for x in rows if x["naive"] == "measured"]
    if measured:
        md += ["", "Where the naive loop ran in full, the prefix estimate "
               f"({args.naive_prefix} merges, scaled) was "
               + ", ".join(f"{x['naive_prefix_estimate_s'] / x['naive_s']:.2f}×"
                           for x in measured)
               + " the measured time (" + ", ".join('+'.join(map(str, x['widths']))
                                                    for x in measured) + ")."]
        md.append("")
        base = max(measured, key=lambda x: sum(x["widths"]))
        for x in rows:
            if x["naive"] != "measured":
                # the naive loop is O((d - r) d^2): scale the largest size timed in full
                cost = ((sum(x["widths"]) - x["r"]) * sum(x["widths"]) ** 2
                        / ((sum(base["widths"]) - base["r"]) * sum(base["widths"]) ** 2))
                x["naive_cubic_estimate_s"] = base["naive_s"] * cost
                md.append(f"At {'+'.join(map(str, x['widths']))}, scaling the naive loop's "
                          f"measured {base['naive_s']:.1f} s at "
                          f"{'+'.join(map(str, base['widths']))} by its O((d - r) d²) cost "
                          f"gives {x['naive_cubic_estimate_s']:.0f} s instead: "
                          f"{x['naive_cubic_estimate_s'] / x['fast_s']:.0f}× the fast one.")
    if any(x["same_groups"] is None for x in rows):
        md += ["", "Groups of the sizes estimated are not compared (the naive loop would take "
               "an hour or more); `tests/test_matchers.py` checks fast == naive == a plain "
               "reference loop on random matrices with ties, negative scores, budgets and "
               "lifting."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "speed_quick" if args.quick else "speed"
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    (out / f"{name}.json").write_text(json.dumps(
        {"command": command, "omp_num_threads": os.environ["OMP_NUM_THREADS"],
         "load_average_before_after": [load_before[0], load_after[0]], "rows": rows},
        indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
