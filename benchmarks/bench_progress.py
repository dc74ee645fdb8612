"""Cost of one progress update: core/progress.py's log-file lines on rank 0, its silent display on the other
ranks, and the tqdm it replaced (output discarded). Usage: python benchmarks/bench_progress.py [--n N]"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trime_dist.core.progress import show_progress  # noqa: E402


def ns_per_update(run, n: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(n)
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


def lines(n):
    with show_progress(n, "bench", "it", rank=0, tty=False, every_s=30, write=lambda s: None) as bar:
        for _ in range(n):
            bar.update(1)


def silent(n):
    with show_progress(n, "bench", "it", rank=1) as bar:
        for _ in range(n):
            bar.update(1)


def tqdm_bar(n):
    from tqdm import tqdm

    with tqdm(total=n, file=io.StringIO(), mininterval=30) as bar:
        for _ in range(n):
            bar.update(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000)
    n = ap.parse_args().n
    print(f"| display ({n:,} updates, best of 3) | cost |\n|---|---|")
    for name, run in (("lines (rank 0, log file)", lines), ("rank != 0", silent), ("tqdm, mininterval 30 s", tqdm_bar)):
        print(f"| {name} | {ns_per_update(run, n):.0f} ns/update |")


if __name__ == "__main__":
    main()
