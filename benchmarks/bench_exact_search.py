"""Exact search (datastore/exact.py topk_chunked): where the time goes, the distance matmul vs the top-k selection,
and the full topk per chunk (select="topk", the old search) vs the block-pruned selection (select="blocks").

Usage: python benchmarks/bench_exact_search.py [--keys 100000,1000000] [--dim 64] [--queries 256,1024]
       [--k 16,256,1024] [--repeats 3] [--device cpu|cuda]
Per row: one chunk's (the search's default, 262,144 keys, or all keys when fewer) matmul alone, a full
torch.topk of its scores, the block-pruned selection of the same scores; then the whole search over N keys both
ways (best of --repeats, the two interleaved) and the speed-up. Keys fp32 on the CPU, fp16 (fp16 matmul) on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trime_dist.datastore.exact import entering_candidates, topk_chunked  # noqa: E402

CHUNK = 1 << 18


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fns: dict, repeats: int, device) -> dict:
    """{name: best seconds} of each callable, run interleaved `repeats` times after one warm-up each."""
    for f in fns.values():
        f()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", default="256,1024")
    ap.add_argument("--k", default="16,256,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} thread(s), d={args.dim}, keys {dtype}, chunk {CHUNK:,}")
    print("| keys | queries | k | matmul s (1 chunk) | topk s (1 chunk) | blocks s (1 chunk) "
          "| search topk s | search blocks s | speed-up | queries/s (blocks) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.keys.split(",")):
        keys = torch.randn(n, args.dim, device=device, generator=g, dtype=dtype)
        for nq in (int(x) for x in args.queries.split(",")):
            queries = torch.randn(nq, args.dim, device=device, generator=g)
            q, first = queries.to(dtype), keys[:CHUNK]
            scores = q @ first.T                                                             # [Q, c]
            for k in (int(x) for x in args.k.split(",")):
                kk = min(k, n)
                t = best_of({"matmul": lambda: q @ first.T,
                             "topk": lambda: scores.topk(kk, dim=1, sorted=False),
                             "blocks": lambda: entering_candidates(scores, kk),
                             "search_topk": lambda: topk_chunked(queries, keys, kk, compute_dtype=dtype,
                                                                 select="topk"),
                             "search_blocks": lambda: topk_chunked(queries, keys, kk, compute_dtype=dtype)},
                            args.repeats, device)
                a = topk_chunked(queries, keys, kk, compute_dtype=dtype, select="topk")[0]
                b = topk_chunked(queries, keys, kk, compute_dtype=dtype)[0]
                assert torch.equal(a, b), "the two selections disagree"
                print(f"| {n:,} | {nq:,} | {k} | {t['matmul']:.3f} | {t['topk']:.3f} | {t['blocks']:.3f} "
                      f"| {t['search_topk']:.3f} | {t['search_blocks']:.3f} "
                      f"| {t['search_topk'] / t['search_blocks']:.2f}x | {nq / t['search_blocks']:,.0f} |",
                      flush=True)
            del scores


if __name__ == "__main__":
    main()
