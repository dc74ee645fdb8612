"""BM25 neighbour search of `trime group`: agreement with bm25s and speed vs bm25s / rank_bm25 on WikiText-2
segments (`wikitext`), the pruned search's recall@20 against the exact one and its speed-up on the same
real text (`recall`), and the distributed stage on a synthetic corpus with 1 and 2 MPI ranks (`scale`),
with CPU time per rank and phase, and a projection to a larger corpus and more ranks.

    python benchmarks/bench_bm25.py wikitext --seq-lens 128 512
    python benchmarks/bench_bm25.py recall --seq-lens 128 512 --query-terms 16 32 64 --candidates 50 100 200
    python benchmarks/bench_bm25.py scale --segments 50000 200000 --ranks 1 2 --query-terms 0 32
    python benchmarks/bench_bm25.py exact-cost --segments 200000
    python benchmarks/bench_bm25.py project      # again, from the outputs `scale` left in --workdir
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # single-thread comparisons (BLAS included)
import argparse  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from data_pipeline.bm25 import (  # noqa: E402
    BM25Params,
    NeighbourIndex,
    count_matrix,
    document_frequencies,
    recall_at_k,
)
from trime_dist.core import shards  # noqa: E402
from trime_dist.core.io import atomic_write_text, sha256_file  # noqa: E402

K = 20


def wikitext_segments(path: str, vocab_size: int, seq_lens: list[int]) -> dict[int, list[np.ndarray]]:
    """The file's lines as documents, BPE-tokenized (trained here), joined with <eod> into one stream and
    cut into segments of L input tokens, as `trime prepare` does."""
    from data_pipeline.tokenizer import EOD, encode_docs, train_bpe

    lines = [ln for ln in open(path, encoding="utf-8").read().split("\n") if ln.strip()]
    tok = train_bpe(lines, vocab_size)
    eod = tok.token_to_id(EOD)
    stream = np.array([t for ids in encode_docs(tok, lines) for t in ids + [eod]], dtype=np.int32)
    print(f"{path}: {len(lines)} lines, {len(stream)} BPE tokens (vocab {tok.get_vocab_size()}, trained here)")
    # bm25s (0.3.16) indexes int ids correctly only when they are 0..U-1 without gaps: renumber the used ids
    # (BM25 does not depend on the names of the terms)
    used, stream = np.unique(stream, return_inverse=True)
    stream = stream.astype(np.int32)
    return {L: [stream[s:s + L] for s in range(0, len(stream) - 1, L)] for L in seq_lens}, len(used)


def ours_topk(docs: list[np.ndarray], vocab: int, params: BM25Params, block: int = 256, clock=time.perf_counter):
    t0 = clock()
    counts = count_matrix(docs, vocab)
    index = NeighbourIndex(counts, np.array([len(d) for d in docs]), document_frequencies(counts), params)
    t1 = clock()
    ids = np.concatenate([index.topk(np.arange(s, min(s + block, len(docs))), K)[0]
                          for s in range(0, len(docs), block)])
    return ids, t1 - t0, clock() - t1


def bm25s_topk(docs: list[np.ndarray], params: BM25Params, backend: str):
    import bm25s

    lists = [d.tolist() for d in docs]
    t0 = time.perf_counter()
    retriever = bm25s.BM25(k1=params.k1, b=params.b, backend=backend)
    retriever.index(lists, show_progress=False)
    t1 = time.perf_counter()
    res, scores = retriever.retrieve(lists, k=K + 1, show_progress=False, n_threads=1)
    return res, scores, t1 - t0, time.perf_counter() - t1


def rank_bm25_qps(docs: list[np.ndarray], params: BM25Params, n_queries: int) -> float:
    from rank_bm25 import BM25Okapi

    bm = BM25Okapi([d.tolist() for d in docs], k1=params.k1, b=params.b)
    t0 = time.perf_counter()
    for q in docs[:n_queries]:
        scores = bm.get_scores(q.tolist())
        np.argpartition(-scores, K)[: K + 1]
    return n_queries / (time.perf_counter() - t0)


def recall_vs_bm25s(ours: np.ndarray, res: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Mean recall of bm25s's top-20 (self and zero scores removed) in ours, and the fraction identical."""
    recalls, same = [], 0
    for q in range(len(ours)):
        ref = [int(d) for d, s in zip(res[q], scores[q]) if d != q and s > 0][:K]
        got = set(ours[q][ours[q] >= 0].tolist())
        recalls.append(len(got & set(ref)) / max(1, len(ref)))
        same += got == set(ref)
    return float(np.mean(recalls)), same / len(ours)


def bench_wikitext(args) -> None:
    segs, vocab = wikitext_segments(args.data, args.vocab_size, args.seq_lens)
    print("\n| L | segments | method | seconds | queries/s | ours (numba) speed-up | recall@20 vs bm25s | "
          "identical top-20 |")
    print("|---|---|---|---|---|---|---|---|")
    for L, docs in segs.items():  # best of --repeat runs each (the dev box is shared)
        rows = []
        ref = None
        for backend in ("numpy", "numba"):
            res, scores, t_idx, t_ret = min((bm25s_topk(docs, BM25Params(args.k1, args.b), backend)
                                             for _ in range(args.repeat)), key=lambda r: r[3])
            ref = ref or (res, scores)
            rows.append((f"bm25s retrieve, {backend} backend, 1 thread (index {t_idx:.2f}s not counted)", t_ret,
                         None))
        for numba in (True, False):
            params = BM25Params(k1=args.k1, b=args.b, use_numba=numba)
            ids, t_build, t_search = min((ours_topk(docs, vocab, params) for _ in range(args.repeat)),
                                         key=lambda r: r[1] + r[2])
            rows.append((f"ours, {'numba loop' if numba else 'scipy only'}, index build + all-pairs top-20",
                         t_build + t_search, recall_vs_bm25s(ids, *ref)))
        n_q = min(args.rank_bm25_queries, len(docs))
        rank_qps = rank_bm25_qps(docs, BM25Params(args.k1, args.b), n_q)
        rows.append((f"rank_bm25 BM25Okapi get_scores ({n_q} queries, extrapolated)", len(docs) / rank_qps, None))
        ours_s = rows[2][1]
        for name, sec, rec in rows:
            rec_s = f"{rec[0]:.4f} | {rec[1]:.3f}" if rec else "- | -"
            print(f"| {L} | {len(docs)} | {name} | {sec:.3f} | {len(docs) / sec:,.0f} | {sec / ours_s:.1f}x | {rec_s} |")


def bench_recall(args) -> None:
    """Pruned search (each segment queries with its m highest count x idf terms, its best C candidates
    rescored exactly) vs the exact all-pairs search on real text: recall@20 and CPU-time speed-up."""
    segs, vocab = wikitext_segments(args.data, args.vocab_size, args.seq_lens)
    ours_topk(segs[args.seq_lens[0]][:300], vocab, BM25Params(query_terms=8))  # compile the numba kernels
    print("\n| L | segments | query terms m | candidates C | recall@20 vs exact | CPU s (index + search) | "
          "speed-up vs exact |")
    print("|---|---|---|---|---|---|---|")
    for L, docs in segs.items():  # best of --repeat runs each (the dev box is shared); CPU time of this process
        def run(params):
            ids, t_idx, t_search = min((ours_topk(docs, vocab, params, clock=time.process_time)
                                        for _ in range(args.repeat)), key=lambda r: r[1] + r[2])
            return ids, t_idx + t_search
        exact, t_exact = run(BM25Params(k1=args.k1, b=args.b))
        print(f"| {L} | {len(docs)} | exact | - | 1.0000 | {t_exact:.3f} | 1.0x |")
        for m in args.query_terms:
            for c in args.candidates:
                ids, t = run(BM25Params(k1=args.k1, b=args.b, query_terms=m, candidates=c))
                print(f"| {L} | {len(docs)} | {m} | {c} | {recall_at_k(ids, exact):.4f} | {t:.3f} | "
                      f"{t_exact / t:.1f}x |", flush=True)


# ----------------------------------------------------------------------------- scale

def write_synthetic(out: str, n: int, L: int, vocab: int = 32000, topics: int = 2000, seed: int = 0) -> None:
    """n segments of L tokens: half from a global Zipf(1) over `vocab`, half from the segment's topic (500 ids,
    Zipf(0.8)); 50 segments per stream."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    topic_words = np.stack([rng.choice(np.arange(2, vocab), 500, replace=False) for _ in range(topics)])
    pt = 1.0 / np.arange(1, 501) ** 0.8
    pt /= pt.sum()
    writer = shards.SegmentShardWriter(out, rank=0, max_segments=2000)
    for s0 in range(0, n, 10000):
        m = min(10000, n - s0)
        topic = rng.integers(0, topics, m)
        common = np.maximum(rng.choice(vocab, size=(m, L + 1), p=p), 2)
        own = topic_words[topic[:, None], rng.choice(500, size=(m, L + 1), p=pt)]
        toks = np.where(rng.random((m, L + 1)) < 0.5, common, own).astype(np.int32)
        for j in range(m):
            i = s0 + j
            writer.add(i // 50, i % 50, (i % 50) * L, toks[j])
    atomic_write_text(os.path.join(out, "tokenizer.json"), '{"synthetic": true}\n')
    manifest = {"format": shards.SEGMENTS_FORMAT, "seq_len": L, "stream_mode": "file", "segments": n,
                "tokens": n * L, "streams": -(-n // 50),
                "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(os.path.join(out, "tokenizer.json")),
                              "kind": "synthetic", "vocab_size": vocab, "eod_id": 1, "pad_id": 0},
                "shards": [{k: v for k, v in e.items() if k != "reused"} for e in writer.close()]}
    shards.write_manifest(out, manifest)


def run_group(src: str, out: str, ranks: int, args, query_terms: int, max_df: float) -> dict:
    """One `trime group` run (under mpiexec for ranks > 1): wall, per-rank CPU and peak RSS (/usr/bin/time),
    the output manifest (phase CPU seconds per rank, sampled recall of the pruned search)."""
    shutil.rmtree(out, ignore_errors=True)
    bindir = os.path.dirname(sys.executable)
    cmd = ["/usr/bin/time", "-f", "rank_usage user=%U sys=%S maxrss_kb=%M", os.path.join(bindir, "trime"), "group",
           "--input", src, "--output", out, "--method", "bm25", "--group-size", str(args.group_size),
           "--query-terms", str(query_terms), "--candidates", str(args.candidates),
           "--recall-sample", str(args.recall_sample), "--max-df-ratio", str(max_df)]
    if ranks > 1:
        cmd = [os.path.join(bindir, "mpiexec"), "-n", str(ranks)] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    usage = re.findall(r"rank_usage user=([\d.]+) sys=([\d.]+) maxrss_kb=(\d+)", proc.stderr)
    return {"wall": wall, "cpu": [float(u) + float(s) for u, s, _ in usage],
            "rss": [int(m) / 2**20 for _, _, m in usage], "manifest": shards.read_manifest(out)}


def neighbour_sets(out: str) -> np.ndarray:
    from data_pipeline.group_search import load_neighbours

    m = shards.read_manifest(out)
    g = m["grouping"]
    return load_neighbours(os.path.join(out, "neighbours"), m["segments"] + m["dropped_segments"], g["top_k"],
                           g["query_block"])


PHASES = ("read", "index", "search", "recall", "chain", "write", "similarity")


def bench_scale(args) -> None:
    print("\n| segments | max_df_ratio | ranks | query terms (0 = exact) | wall s | CPU s per rank | wall speed-up | CPU speed-up "
          "| peak RSS per rank GiB | recall@20 vs exact | within-group BM25 (bm25 / random) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    runs = {}
    for n in args.segments:
        src = os.path.join(args.workdir, f"synthetic-{n}x{args.seq_len}")
        if not os.path.isfile(os.path.join(src, "manifest.json")):
            write_synthetic(src, n, args.seq_len)
        for max_df, m in [(x, m) for x in args.max_df_ratios for m in args.query_terms]:
            if m == 0 and n > args.exact_max_segments:
                continue
            for ranks in args.ranks:
                tag = "" if max_df == 1.0 else f"-df{max_df}"
                out = os.path.join(args.workdir, f"out-n{n}-r{ranks}-m{m}{tag}")
                r = runs[n, max_df, m, ranks] = run_group(src, out, ranks, args, m, max_df)
                one = runs.get((n, max_df, m, 1))
                speed = (f"{one['wall'] / r['wall']:.2f}x | {sum(one['cpu']) / max(r['cpu']):.2f}x" if one
                         else "- | -")
                sim = r["manifest"]["similarity"]
                if m == 0:
                    recall = "1 (exact)"
                elif os.path.isdir(os.path.join(args.workdir, f"out-n{n}-r{ranks}-m0{tag}")):
                    exact = neighbour_sets(os.path.join(args.workdir, f"out-n{n}-r{ranks}-m0{tag}"))
                    recall = f"{recall_at_k(neighbour_sets(out), exact):.4f} (all)"
                else:
                    p = sim["pruned_search"]
                    recall = f"{p[f'recall_at_{K}']:.4f} ({p['segments_sampled']} sampled)"
                print(f"| {n} | {max_df} | {ranks} | {m} | {r['wall']:.1f} | {', '.join(f'{x:.1f}' for x in r['cpu'])} | "
                      f"{speed} | {', '.join(f'{x:.2f}' for x in r['rss'])} | {recall} | "
                      f"{sim['mean_within_group_bm25']:.1f} / {sim['mean_within_group_bm25_random']:.1f} |", flush=True)
    print("\nCPU seconds per phase (per rank, from the manifests):\n")
    print("| segments | max_df_ratio | ranks | query terms | " + " | ".join(PHASES) + " |")
    print("|---|---|---|---|" + "---|" * len(PHASES))
    for (n, max_df, m, ranks), r in runs.items():
        per_rank = r["manifest"]["cpu_seconds_per_rank"]
        cells = [", ".join(f"{c.get(p, 0.0):.1f}" for c in per_rank) for p in PHASES]
        print(f"| {n} | {max_df} | {ranks} | {m} | " + " | ".join(cells) + " |")
    if args.project_tokens:
        project(runs, args)


def project(runs: dict, args) -> None:
    """Per-rank CPU time at --project-tokens on --project-ranks from the phase CPU measured at the two
    largest sizes. Each phase's cost on R ranks is split as parallel / R + replicated, from the 1- and
    2-rank runs at the largest size (parallel = 2 (c1 - c2), replicated = 2 c2 - c1, clamped at 0); the
    parallel part scales with N (the search's with N^(1 + a), a fitted from the 1-rank search CPU at the
    two sizes: a query's cost grows with the df of its terms), the replicated part with N. The chain runs
    on rank 0 (~N); the similarity report samples a fixed number of groups (constant). Peak RSS per rank:
    a + b / R from the 1- and 2-rank runs, times N / N_measured."""
    for m in sorted({m for (_, _, m, _) in runs}):
        sizes = sorted(n for (n, df, mm, r) in runs if mm == m and r == 1 and df == 1.0)
        if len(sizes) < 2 or (sizes[-1], 1.0, m, 2) not in runs:
            continue
        n0, n1 = sizes[-2:]
        cpu = {key: r["manifest"]["cpu_seconds_per_rank"] for key, r in runs.items()}
        c0, c1 = cpu[n0, 1.0, m, 1][0], cpu[n1, 1.0, m, 1][0]
        c2 = {p: max(rank.get(p, 0.0) for rank in cpu[n1, 1.0, m, 2]) for p in PHASES}
        big_n, big_r = args.project_tokens / args.seq_len, args.project_ranks
        alpha = np.log((c1["search"] / n1) / (c0["search"] / n0)) / np.log(n1 / n0)
        growth = {p: big_n / n1 for p in PHASES}
        growth["search"] = (big_n / n1) ** (1 + alpha)
        est = {}
        for p in ("read", "index", "search", "recall", "write"):
            one = c1.get(p, 0.0)
            par, rep = max(0.0, 2 * (one - c2[p])), max(0.0, 2 * c2[p] - one)
            est[p] = (par * growth[p] / big_r, rep * big_n / n1)
        est["chain (rank 0)"] = (c1.get("chain", 0.0) * big_n / n1, 0.0)
        est["similarity (rank 0)"] = (c1.get("similarity", 0.0), 0.0)
        print(f"\nProjection, query terms {m}: {args.project_tokens:.0e} tokens = {big_n:,.0f} segments of "
              f"{args.seq_len} on {big_r} ranks, from runs at {n0:,} and {n1:,} segments (1 rank) and {n1:,} "
              f"(2 ranks); search cost per query ~ N^{alpha:.2f}:\n")
        print("| phase | CPU s per rank, parallel part | CPU s per rank, replicated part |\n|---|---|---|")
        for name, (par, rep) in est.items():
            print(f"| {name} | {par:,.0f} | {rep:,.0f} |")
        total = sum(par + rep for par, rep in est.values())
        print(f"| total | {total:,.0f} ({total / 60:,.1f} min) | |")
        rss1, rss2 = runs[n1, 1.0, m, 1].get("rss"), runs[n1, 1.0, m, 2].get("rss")
        if rss1 and rss2:
            a, b = 2 * max(rss2) - rss1[0], 2 * (rss1[0] - max(rss2))
            print(f"| peak RSS per rank | {(a + b / big_r) * big_n / n1:,.1f} GiB ({rss1[0]:.2f} GiB on 1 rank, "
                  f"{max(rss2):.2f} on 2, at {n1:,}) | |")


def bench_project(args) -> None:
    """The projection from the `scale` outputs left in --workdir (CPU only; peak RSS is not in the manifests)."""
    runs = {}
    for name in os.listdir(args.workdir):
        hit = re.fullmatch(r"out-n(\d+)-r(\d+)-m(\d+)", name)
        if hit and os.path.isfile(os.path.join(args.workdir, name, shards.MANIFEST)):
            n, r, m = map(int, hit.groups())
            runs[n, 1.0, m, r] = {"manifest": shards.read_manifest(os.path.join(args.workdir, name))}
    project(runs, args)


def bench_exact_cost(args) -> None:
    """CPU time of the exact search per query on a corpus too large to search exactly here: the exact index
    (one process) and --blocks query blocks spread over the corpus, extrapolated to all N queries; next to
    the search CPU of the pruned runs that `scale` left in --workdir."""
    from data_pipeline.group_search import read_local_segments

    src = os.path.join(args.workdir, f"synthetic-{args.segments}x{args.seq_len}")
    manifest = shards.read_manifest(src)
    docs = read_local_segments(src, manifest, 0, 1).docs(set())
    counts = count_matrix(docs, manifest["tokenizer"]["vocab_size"])
    del docs
    t0 = time.process_time()
    index = NeighbourIndex(counts, np.asarray(counts.sum(axis=1)).ravel(), document_frequencies(counts),
                           BM25Params(k1=args.k1, b=args.b))
    t_index = time.process_time() - t0
    starts = np.linspace(0, index.n_docs - 256, args.blocks).astype(int)
    t0 = time.process_time()
    for s0 in starts:
        index.topk(np.arange(s0, s0 + 256), K)
    per_query = (time.process_time() - t0) / (256 * len(starts))
    print("\n| segments | search | CPU s per query | search CPU s, all queries, 1 rank |\n|---|---|---|---|")
    print(f"| {args.segments} | exact (index {t_index:.1f}s) | {per_query * 1e3:.3f} ms | "
          f"{per_query * index.n_docs:.0f} (extrapolated from {len(starts)} blocks of 256) |")
    for name in sorted(os.listdir(args.workdir)):
        if name.startswith(f"out-n{args.segments}-r1-m") and not name.endswith("-m0"):
            cpu = shards.read_manifest(os.path.join(args.workdir, name))["cpu_seconds_per_rank"][0]["search"]
            print(f"| {args.segments} | pruned, {name} | {cpu / index.n_docs * 1e3:.3f} ms | {cpu:.0f} (measured; "
                  f"{per_query * index.n_docs / cpu:.1f}x faster) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("wikitext")
    w.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "../../shared/data/wikitext2-valid.tokens"))
    w.add_argument("--vocab-size", type=int, default=8000)
    w.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    w.add_argument("--rank-bm25-queries", type=int, default=100)
    w.add_argument("--repeat", type=int, default=3)
    rc = sub.add_parser("recall")
    rc.add_argument("--data", default=w.get_default("data"))
    rc.add_argument("--vocab-size", type=int, default=8000)
    rc.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    rc.add_argument("--query-terms", type=int, nargs="+", default=[16, 32, 64])
    rc.add_argument("--candidates", type=int, nargs="+", default=[50, 100, 200])
    rc.add_argument("--repeat", type=int, default=3)
    s = sub.add_parser("scale")
    s.add_argument("--segments", type=int, nargs="+", default=[50_000, 200_000])
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    s.add_argument("--query-terms", type=int, nargs="+", default=[0, 32], help="0 = exact search")
    s.add_argument("--candidates", type=int, default=100)
    s.add_argument("--max-df-ratios", type=float, nargs="+", default=[1.0], help="terms in more segments unscored")
    s.add_argument("--recall-sample", type=int, default=1024)
    s.add_argument("--exact-max-segments", type=int, default=50_000, help="larger corpora: pruned runs only")
    s.add_argument("--group-size", type=int, default=16)
    s.add_argument("--workdir", default="/tmp/bench_bm25")
    s.add_argument("--project-tokens", type=float, default=1e9)
    s.add_argument("--project-ranks", type=int, default=64)
    e = sub.add_parser("exact-cost")
    e.add_argument("--segments", type=int, default=200_000)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--blocks", type=int, default=8)
    e.add_argument("--workdir", default="/tmp/bench_bm25")
    pr = sub.add_parser("project")
    pr.add_argument("--seq-len", type=int, default=512)
    pr.add_argument("--workdir", default="/tmp/bench_bm25")
    pr.add_argument("--project-tokens", type=float, default=1e9)
    pr.add_argument("--project-ranks", type=int, default=64)
    for p in (w, rc, s, e, pr):
        p.add_argument("--k1", type=float, default=0.9)
        p.add_argument("--b", type=float, default=0.4)
    args = parser.parse_args()
    {"wikitext": bench_wikitext, "recall": bench_recall, "scale": bench_scale,
     "exact-cost": bench_exact_cost, "project": bench_project}[args.what](args)


if __name__ == "__main__":
    main()
