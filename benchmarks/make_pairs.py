"""How fast `spatialscore data make-pairs` writes pairs, and the speed-up of all cores over one.

    .venv/bin/python benchmarks/make_pairs.py --n 10000

Prints pairs/second for 1 worker and for all cores, measured in the same run, and the wall time of the full job.
"""

import argparse
import os
import tempfile
import time

from spatialscore.data.pairs import PairSpec, make_pairs


def timed(n: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        make_pairs(out, n, PairSpec(seed=0), workers=workers, progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--baseline-n", type=int, default=1000, help="pairs for the one-worker baseline")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    timed(50, 1)  # warm-up: imports, font loading
    single = timed(args.baseline_n, 1)
    full = timed(args.n, cores)
    print(f"1 worker:  {args.baseline_n / single:7.1f} pairs/s ({args.baseline_n} pairs in {single:.1f} s)")
    print(f"{cores} workers: {args.n / full:7.1f} pairs/s ({args.n} pairs in {full:.1f} s)")
    print(f"speed-up of {cores} workers over 1: {(args.n / full) / (args.baseline_n / single):.2f}x")


if __name__ == "__main__":
    main()
