"""Throughput of `trime prepare` (tokens/s per rank) with 1 and 2 MPI ranks on real WikiText-2 text.

    .venv/bin/python benchmarks/bench_prepare.py [--input /work/shared/data/wikitext2-valid.tokens]

The input is split at document boundaries into --parts files (ranks own whole files); the BPE
tokenizer is trained once (timed separately) and passed with --tokenizer to every timed run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BIN = os.path.join(ROOT, ".venv", "bin")


def split_input(path: str, parts: int, out_dir: str) -> None:
    from data_pipeline.text_input import iter_documents

    docs = list(iter_documents(path, "wikitext"))
    os.makedirs(out_dir, exist_ok=True)
    for p in range(parts):
        with open(os.path.join(out_dir, f"part-{p:02d}.tokens"), "w", encoding="utf-8") as f:
            f.write("".join(docs[p * len(docs) // parts:(p + 1) * len(docs) // parts]))


def run_prepare(inputs: str, out: str, ranks: int, extra: list[str]) -> float:
    cmd = [os.path.join(BIN, "trime"), "prepare", "--input", inputs, "--output", out, "--overwrite"] + extra
    if ranks > 1:
        cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def rank_rates(out: str, ranks: int) -> list[tuple[int, float]]:
    """(tokens, seconds) of each rank's own work, from its record."""
    rates = []
    for r in range(ranks):
        with open(os.path.join(out, f".prepare-r{r:03d}.json")) as f:
            res = json.load(f)["result"]
        rates.append((sum(e["tokens"] for e in res["shards"]), res["seconds"]))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="/work/shared/data/wikitext2-valid.tokens")
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--seq-len", default="512")
    ap.add_argument("--vocab-size", default="16384")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_prepare_")
    parts = os.path.join(work, "parts")
    split_input(args.input, args.parts, parts)
    base = ["--seq-len", args.seq_len]
    t_train = run_prepare(parts, os.path.join(work, "train_tok"), 1, base + ["--vocab-size", args.vocab_size])
    tok = os.path.join(work, "train_tok", "tokenizer.json")
    print(f"input {args.input} ({os.path.getsize(args.input) / 2**20:.1f} MiB, {args.parts} parts); "
          f"bpe vocab {args.vocab_size} train+prepare 1 rank: {t_train:.1f}s wall")
    print(f"{'tokenizer':>9} {'ranks':>5} {'tokens':>9} {'wall s':>7} {'rank s':>13} "
          f"{'tok/s/rank':>11} {'tok/s total':>11}")
    for kind, extra in (("bpe", ["--tokenizer", tok]), ("byte", ["--tokenizer-kind", "byte"])):
        for ranks in (1, 2):
            out = os.path.join(work, f"{kind}{ranks}")
            best = None
            for _ in range(args.repeats):
                wall = run_prepare(parts, out, ranks, base + extra)
                rates = rank_rates(out, ranks)
                if best is None or wall < best[0]:
                    best = (wall, rates)
            wall, rates = best
            tokens = sum(t for t, _ in rates)
            per_rank = sum(t / s for t, s in rates) / ranks
            secs = "/".join(f"{s:.2f}" for _, s in rates)
            print(f"{kind:>9} {ranks:>5} {tokens:>9} {wall:>7.2f} {secs:>13} {per_rank:>11.0f} "
                  f"{tokens / max(s for _, s in rates):>11.0f}")


if __name__ == "__main__":
    main()
