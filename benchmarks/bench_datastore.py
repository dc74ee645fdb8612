"""Datastore benchmarks: encode throughput vs the training forward pass, index add with 1 vs 2 ranks and
merge time, search throughput and recall@k of IVF-PQ vs Flat at several nprobe.

Usage: python benchmarks/bench_datastore.py [--model RUN --data SHARDS] [--keys N --dim D] [--skip encode,add,search]
Without --model/--data a random tiny model (configs/tiny.yaml shape) and synthetic shards are used.
Add/search use synthetic clustered keys (a Gaussian mixture) of the given shape unless --datastore
points at a built store, whose own keys are then used (queries: a held-out slice of them).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiny_model_and_data(tmp: str, n_segments: int):
    sys.path.insert(0, os.path.join(REPO, "tests", "helpers"))
    from trime_dist.model.config import ModelConfig
    from trime_dist.model.export import export_model
    from trime_dist.model.transformer import build_model

    from shard_fixtures import write_segment_dir

    model_cfg = ModelConfig(vocab_size=2000, d_model=128, n_heads=4, d_ffn=512, max_seq_len=128)
    export_model(build_model(model_cfg, seed=0).state_dict(), model_cfg, f"{tmp}/run",
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 128})
    write_segment_dir(f"{tmp}/data", [128 * 16 + 1] * (n_segments // 16), seq_len=128, vocab_size=2000,
                      per_shard=200)
    return f"{tmp}/run", f"{tmp}/data"


def bench_encode(model_dir: str, data_dir: str, batch_size: int, repeats: int) -> list[dict]:
    """keys/s of encode_part (shard reading + forward + fp16 memmap writes) vs the training forward pass."""
    import torch

    from trime_dist.core import shards
    from trime_dist.datastore import parts as build
    from trime_dist.model.export import load_model

    model, _ = load_model(model_dir)
    manifest = shards.read_manifest(data_dir)
    part = build.Part(0, 0, int(manifest["segments"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build.part_paths(tmp, part)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = build.encode_part(model, data_dir, manifest, part, paths, batch_size)
            times.append(time.perf_counter() - t0)
    rows.append({"what": "encode_part (read + forward + write)", "tokens": n, "s": min(times)})
    batches = [b for b, _, _ in build._batches(build.iter_segment_range(data_dir, manifest, 0, part.end_segment),
                                             batch_size, 0)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            for ids in batches:
                model.encode(ids)
    rows.append({"what": "model.encode forward only (inference)", "tokens": n, "s": (time.perf_counter() - t0) / repeats})
    model.train()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for ids in batches:
            logits, keys = model(ids)  # training forward: autograd on, logits + keys
            del logits, keys
    rows.append({"what": "training forward (train mode, autograd)", "tokens": n,
                 "s": (time.perf_counter() - t0) / repeats})
    model.eval()
    del torch
    return rows


def synthetic_keys(n: int, dim: int, seed: int = 0, clusters: int = 256) -> np.ndarray:
    """[n, dim] float16: a Gaussian mixture (LM keys are clustered, not isotropic)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32) * 2.0
    which = rng.integers(0, clusters, n)
    return (centers[which] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float16)


def _add_worker(args) -> float:
    from trime_dist.datastore import index as dsi

    trained, keys_path, lo, hi, out, factory = args
    dsi.set_threads(1)
    keys = np.load(keys_path, mmap_mode="r")
    t0, c0 = time.perf_counter(), time.process_time()
    dsi.add_part(trained, keys[lo:hi], lo, out, factory)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_add_merge(keys: np.ndarray, factory: str, tmp: str) -> list[dict]:
    from trime_dist.datastore import index as dsi

    keys_path = f"{tmp}/keys.npy"
    np.save(keys_path, keys)
    dsi.set_threads(1)
    rng = np.random.default_rng(1)
    sample = keys[np.sort(rng.choice(len(keys), min(len(keys), 100_000), replace=False))].astype(np.float32)
    t0 = time.perf_counter()
    dsi.train_index(factory, sample, f"{tmp}/trained.index")
    rows = [{"what": f"train {factory} on {len(sample)} keys (1 thread)", "s": time.perf_counter() - t0}]
    n = len(keys)
    ctx = mp.get_context("spawn")
    for ranks in (1, 2):
        bounds = np.linspace(0, n, ranks + 1).astype(int)
        jobs = [(f"{tmp}/trained.index", keys_path, int(bounds[r]), int(bounds[r + 1]), f"{tmp}/add{ranks}-{r}.faiss",
                 factory) for r in range(ranks)]
        with ctx.Pool(ranks) as pool:
            t0 = time.perf_counter()
            per_rank = pool.map(_add_worker, jobs)
            wall = time.perf_counter() - t0
        rows.append({"what": f"add {n} keys, {ranks} rank(s)", "s": wall, "keys_per_s": n / wall,
                     "rank_s": [round(x, 2) for x, _ in per_rank], "rank_cpu_s": [round(c, 2) for _, c in per_rank]})
    parts = [f"{tmp}/add2-{r}.faiss" for r in range(2)]
    t0 = time.perf_counter()
    dsi.merge_parts(f"{tmp}/trained.index", parts, f"{tmp}/merged.faiss", factory)
    rows.append({"what": "merge 2 parts in memory", "s": time.perf_counter() - t0})
    if factory != "Flat":
        t0 = time.perf_counter()
        dsi.merge_parts(f"{tmp}/trained.index", parts, f"{tmp}/ondisk/index.faiss", factory, ondisk=True)
        rows.append({"what": "merge 2 parts on disk (merge_ondisk)", "s": time.perf_counter() - t0})
    return rows


def bench_search(keys: np.ndarray, queries: np.ndarray, factory: str, tmp: str, k: int, threads: int) -> list[dict]:
    """queries/s and recall@k (|top-k ∩ exact top-k| / k) of IVF-PQ at nprobe 8/32/128 vs exact Flat."""
    from trime_dist.datastore import index as dsi

    dsi.set_threads(threads)
    flat = dsi.build_empty_index("Flat", keys.shape[1])
    flat.add(keys.astype(np.float32))
    t0 = time.perf_counter()
    _, exact = dsi.search(flat, queries, k)
    rows = [{"index": "Flat", "nprobe": "-", "queries_per_s": len(queries) / (time.perf_counter() - t0),
             f"recall@{k}": 1.0, "recall@10": 1.0}]
    trained = f"{tmp}/trained.index"
    if not os.path.isfile(trained):
        rng = np.random.default_rng(1)
        dsi.train_index(factory, keys[rng.choice(len(keys), min(len(keys), 100_000), replace=False)], trained)
    dsi.add_part(trained, keys, 0, f"{tmp}/ivf.faiss", factory)
    index = dsi.read_index(f"{tmp}/ivf.faiss")
    for nprobe in (8, 32, 128):
        dsi.set_nprobe(index, nprobe)
        t0 = time.perf_counter()
        _, ids = dsi.search(index, queries, k)
        dt = time.perf_counter() - t0
        rec = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, exact)])
        rec10 = np.mean([len(np.intersect1d(a[:10], b[:10])) / 10 for a, b in zip(ids, exact)])
        rows.append({"index": factory, "nprobe": nprobe, "queries_per_s": len(queries) / dt,
                     f"recall@{k}": rec, "recall@10": rec10})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="")
    p.add_argument("--data", default="")
    p.add_argument("--datastore", default="", help="use a built store's keys for add/search")
    p.add_argument("--segments", type=int, default=800, help="synthetic shards: segments of 128 tokens")
    p.add_argument("--keys", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--factory", default="IVF1024,PQ16")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if "encode" not in skip:
            model, data = (args.model, args.data) if args.model else tiny_model_and_data(tmp, args.segments)
            rows = bench_encode(model, data, args.batch_size, args.repeats)
            print(f"\nEncode throughput ({args.threads} thread(s), batch {args.batch_size} segments)")
            for r in rows:
                print(f"  {r['what']:<42} {r['tokens'] / r['s']:>10,.0f} keys/s ({r['s']:.2f} s)")
            print(f"  ratio encode_part / training forward: {rows[2]['s'] / rows[0]['s']:.2f}")
        if args.datastore:
            from trime_dist.datastore.store import open_datastore

            all_keys = open_datastore(args.datastore).all_keys().astype(np.float16)
            keys, queries = all_keys[:-args.queries], all_keys[-args.queries:].astype(np.float32)
        else:
            both = synthetic_keys(args.keys + args.queries, args.dim)  # queries: held-out draws of the same mixture
            keys, queries = both[:args.keys], both[args.keys:].astype(np.float32)
        if "add" not in skip:
            print(f"\nIndex add / merge: {len(keys)} keys x {keys.shape[1]}, {args.factory}, 1 faiss thread per rank")
            for r in bench_add_merge(keys, args.factory, tmp):
                extra = (f"  {r['keys_per_s']:>10,.0f} keys/s  per rank wall {r['rank_s']} cpu {r['rank_cpu_s']}"
                         if "keys_per_s" in r else "")
                print(f"  {r['what']:<45} {r['s']:>8.2f} s{extra}")
        if "search" not in skip:
            print(f"\nSearch: {len(queries)} queries, k={args.k}, {len(keys)} keys, {args.threads} thread(s)")
            print(f"  {'index':<16}{'nprobe':>7}{'queries/s':>12}{'recall@' + str(args.k):>13}{'recall@10':>11}")
            for r in bench_search(keys, queries, args.factory, tmp, args.k, args.threads):
                print(f"  {r['index']:<16}{r['nprobe']:>7}{r['queries_per_s']:>12,.0f}"
                      f"{r['recall@' + str(args.k)]:>13.3f}{r['recall@10']:>11.3f}")


if __name__ == "__main__":
    main()
