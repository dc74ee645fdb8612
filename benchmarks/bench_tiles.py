"""Where one tile of the trime_ext objective spends its time, and the whole tiled objective (fwd+bwd).

Shape of trime_ext at 247M with 8 ranks' memory: N = 3072 queries, M = 24,576 keys, tile 4096 (1 x 6 tiles),
d scaled down (default 64) so that per-tile work other than the matmul is visible on a CPU.
Usage: python benchmarks/bench_tiles.py [--d 64] [--N 3072] [--M 24576] [--tile-size 4096] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from trime_dist.objective.masks import TokenMeta, build_memory_mask
from trime_dist.objective.trime_loss import memory_lse_tiled


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--N", type=int, default=3072)
    p.add_argument("--M", type=int, default=24576)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--T", type=int, default=3072, help="tokens per segment")
    p.add_argument("--tile-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    row = torch.arange(a.M) // a.T                                                   # [M] one segment per rank
    key_meta = TokenMeta(row=row, position=torch.arange(a.M) % a.T, stream=row, stream_index=torch.zeros_like(row))
    query_meta = key_meta.slice(0, a.N)
    keys = torch.randn(a.M, a.d, requires_grad=True)
    labels = torch.randint(0, 1000, (a.M,))
    queries, targets = keys[:a.N], labels[:a.N]
    n, m = min(a.tile_size, a.N), min(a.tile_size, a.M)
    qm, km = query_meta.slice(0, n), key_meta.slice(0, m)
    qb, kb = queries[:n].detach(), keys[:m].detach()
    sim = qb @ kb.T
    allowed = build_memory_mask(qm, km, "external", True, True)
    positive = allowed & (labels[None, :m] == targets[:n, None])
    rows = [
        ("mask (build_memory_mask + key validity)", lambda: build_memory_mask(qm, km, "external", True, True)
         & (labels[None, :m] != -100)),
        ("positive mask (labels == target)", lambda: allowed & (labels[None, :m] == targets[:n, None])),
        ("similarity matmul [n,d]x[d,m]", lambda: qb @ kb.T),
        ("lse over allowed (masked_fill + logsumexp)", lambda: sim.masked_fill(~allowed, float("-inf")).logsumexp(1)),
        ("lse over positives (dense masked)", lambda: sim.masked_fill(~positive, float("-inf")).logsumexp(1)),
        ("positives via nonzero (old path; host sync on GPU)", lambda: positive.nonzero(as_tuple=True)),
        ("backward grad matmuls (2 x)", lambda: (sim @ kb, sim.T @ qb)),
    ]
    print(f"trime_ext tile {n} x {m}, d={a.d}, N={a.N}, M={a.M}: per-tile costs (ms, best of {a.repeats})")
    print(f"{'component':<52} | {'ms':>8}")
    for name, fn in rows:
        print(f"{name:<52} | {best(fn, a.repeats):>8.2f}")

    def whole(backward):
        lse_all, lse_pos, _ = memory_lse_tiled(queries, keys, targets, labels, query_meta, key_meta, "external",
                                               True, tile_size=a.tile_size, exclude_future=True)
        if backward:
            (lse_all.sum() + lse_pos.clamp_min(-1e4).sum()).backward()
            keys.grad = None
    with torch.no_grad():
        fwd = best(lambda: whole(False), a.repeats)
    print(f"{'whole objective forward':<52} | {fwd:>8.2f}")
    print(f"{'whole objective forward + backward':<52} | {best(lambda: whole(True), a.repeats):>8.2f}")


if __name__ == "__main__":
    main()
