"""Peak memory and time of the TRIME objective, forward + backward: dense reference vs tiled.

Each case runs in a fresh subprocess; peak memory = rise of the process's peak RSS over its RSS
after building the inputs. Usage: python benchmarks/bench_objective.py [--sizes 2048 8192 32768]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DENSE_LIMIT_GB = 12.0  # dense needs roughly 40 bytes per query-key pair; skip it above this


def run_case(method: str, n: int, args) -> dict:
    """One forward+backward in this process (called in a fresh subprocess)."""
    import torch

    from trime_dist.core.constants import IGNORE_INDEX
    from trime_dist.objective.masks import TokenMeta, build_memory_mask
    from trime_dist.objective.trime_loss import trime_nll, trime_nll_tiled

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    row = torch.arange(n) // args.T                                      # [N] segments of T tokens
    meta = TokenMeta(row=row, position=torch.arange(n) % args.T, stream=row // 4, stream_index=row % 4)
    vocab_logits = torch.randn(n, args.V, requires_grad=True)            # [N, V]
    queries = torch.randn(n, args.d, requires_grad=True)                 # [N, d]; keys = queries, as in training
    targets = torch.randint(0, args.V, (n,))                             # [N]
    targets[torch.rand(n) < 0.05] = IGNORE_INDEX                         # some padding

    def step():
        if method == "dense":
            mask = build_memory_mask(meta, meta, "external")              # [N, N]
            nll = trime_nll(vocab_logits, targets, queries, queries, targets, mask)
        else:
            nll = trime_nll_tiled(vocab_logits, targets, queries, queries, targets, meta, meta, "external",
                                  tile_size=args.tile_size)
        nll.sum().backward()
        vocab_logits.grad = queries.grad = None

    import psutil
    base_rss = psutil.Process().memory_info().rss
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return dict(method=method, n=n, time_s=min(times), peak_mb=(peak_rss - base_rss) / 2**20)


def spawn_case(method: str, n: int, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--one", method, str(n), "--d", str(args.d), "--V", str(args.V),
           "--T", str(args.T), "--tile-size", str(args.tile_size), "--threads", str(args.threads),
           "--repeats", str(args.repeats if n < 32768 else 1)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 32768], help="N = M")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--V", type=int, default=1000, help="vocabulary size of the (small) vocab part")
    p.add_argument("--T", type=int, default=128, help="tokens per segment")
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats (1 at N >= 32768)")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], int(args.one[1]), args)))
        return
    print(f"external layout, d={args.d}, V={args.V}, T={args.T}, tile={args.tile_size}, threads={args.threads}, "
          f"forward+backward, keys = queries")
    print(f"{'N=M':>7} | {'dense s':>8} | {'dense MB':>9} | {'tiled s':>8} | {'tiled MB':>9} | "
          f"{'time ratio':>10} | {'mem ratio':>9}")
    for n in args.sizes:
        dense = None
        if n * n * 40 / 2**30 <= DENSE_LIMIT_GB:
            dense = spawn_case("dense", n, args)
        tiled = spawn_case("tiled", n, args)
        if dense:
            print(f"{n:>7} | {dense['time_s']:>8.2f} | {dense['peak_mb']:>9.0f} | {tiled['time_s']:>8.2f} | "
                  f"{tiled['peak_mb']:>9.0f} | {tiled['time_s'] / dense['time_s']:>10.2f} | "
                  f"{tiled['peak_mb'] / dense['peak_mb']:>9.3f}", flush=True)
        else:
            print(f"{n:>7} | {'skipped':>8} | {n * n * 40 / 2**30:>7.0f}GB | {tiled['time_s']:>8.2f} | "
                  f"{tiled['peak_mb']:>9.0f} | {'-':>10} | {'-':>9}", flush=True)


if __name__ == "__main__":
    main()
