"""Throughput of `trime prepare` (tokens/s per rank) with 1 and 2 MPI ranks on one real WikiText-2 file.

    .venv/bin/python benchmarks/bench_prepare.py [--input /work/shared/data/wikitext2-valid.tokens] [--split-mb 0.125]

The one input file is cut by prepare itself (--split-mb) into byte ranges at ` = Title = ` boundaries, so both
ranks work on it; the BPE tokenizer is trained once (timed separately) and passed with --tokenizer to every timed
run. Per rank: wall and CPU seconds of its tokenize+segment+write work (from its .prepare-rNNN.json record).
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
BIN = os.path.dirname(sys.executable)  # the venv that runs this script: its trime and mpiexec


def run_prepare(inputs: str, out: str, ranks: int, extra: list[str]) -> float:
    cmd = [os.path.join(BIN, "trime"), "prepare", "--input", inputs, "--output", out, "--overwrite"] + extra
    if ranks > 1:
        cmd = [os.path.join(BIN, "mpiexec"), "-n", str(ranks)] + cmd
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def rank_rates(out: str, ranks: int) -> list[tuple[int, float, float]]:
    """(tokens, wall seconds, CPU seconds) of each rank's own work, from its record."""
    rates = []
    for r in range(ranks):
        with open(os.path.join(out, f".prepare-r{r:03d}.json")) as f:
            res = json.load(f)["result"]
        rates.append((sum(e["tokens"] for e in res["shards"]), res["seconds"], res["cpu_seconds"]))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="/work/shared/data/wikitext2-valid.tokens")
    ap.add_argument("--split-mb", default="0.125")
    ap.add_argument("--seq-len", default="512")
    ap.add_argument("--vocab-size", default="16384")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_prepare_")
    base = ["--seq-len", args.seq_len, "--split-mb", args.split_mb]
    t_train = run_prepare(args.input, os.path.join(work, "train_tok"), 1, base + ["--vocab-size", args.vocab_size])
    tok = os.path.join(work, "train_tok", "tokenizer.json")
    print(f"input {args.input} ({os.path.getsize(args.input) / 2**20:.1f} MiB, one file, --split-mb "
          f"{args.split_mb}); bpe vocab {args.vocab_size} train+prepare 1 rank: {t_train:.1f}s wall")
    print(f"{'tokenizer':>9} {'ranks':>5} {'tokens':>9} {'wall s':>7} {'rank wall s':>13} {'rank cpu s':>13} "
          f"{'tok/s/rank':>11} {'tok/s total':>11} {'speed-up':>8}")
    for kind, extra in (("bpe", ["--tokenizer", tok]), ("byte", ["--tokenizer-kind", "byte"])):
        one_rank = None
        for ranks in (1, 2):
            out = os.path.join(work, f"{kind}{ranks}")
            best = None
            for _ in range(args.repeats):
                wall = run_prepare(args.input, out, ranks, base + extra)
                rates = rank_rates(out, ranks)
                if best is None or wall < best[0]:
                    best = (wall, rates)
            wall, rates = best
            tokens = sum(t for t, _, _ in rates)
            per_rank = sum(t / s for t, s, _ in rates) / ranks
            total = tokens / max(s for _, s, _ in rates)  # the slowest rank finishes the stage
            one_rank = one_rank or total
            print(f"{kind:>9} {ranks:>5} {tokens:>9} {wall:>7.2f} {'/'.join(f'{s:.2f}' for _, s, _ in rates):>13} "
                  f"{'/'.join(f'{c:.2f}' for _, _, c in rates):>13} {per_rank:>11.0f} {total:>11.0f} "
                  f"{total / one_rank:>7.2f}x")


if __name__ == "__main__":
    main()
