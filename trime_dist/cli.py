"""The `trime` console script: one subcommand per stage, each implemented in its own module.

A stage module exposes `add_arguments(parser)` and `run(args) -> int`; this file only routes.
Modules are imported lazily so `trime --help` stays fast and a stage's heavy dependencies
(deepspeed, faiss, mpi4py) load only when that stage runs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "corpus": ("data_pipeline.corpus", "write the built-in synthetic corpus (train/valid/test text files)"),
    "prepare": ("data_pipeline.prepare", "tokenize text into segment shards (MPI ranks share the input files)"),
    "group": ("data_pipeline.group", "group segments into global batches: random | consecutive | bm25 (MPI)"),
    "train": ("trime_dist.train.cli", "train a model with DeepSpeed (run under `deepspeed` or `trime launch`)"),
    "datastore": ("trime_dist.datastore.cli", "build the kNN datastore and faiss index from a trained model"),
    "eval": ("trime_dist.eval.cli", "perplexity under none / local / long / external memory"),
    "launch": ("launcher.cli", "start a stage locally, on several nodes with DeepSpeed, or under SLURM"),
    "demo": ("trime_dist.demo", "the end-to-end pipeline on the built-in corpus (CPU, 2 ranks)"),
}


def _available_stages() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_text) in STAGES.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trime", description="trime_dist: distributed training of memory-augmented LMs (TRIME).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True
    for name, (module, help_text) in _available_stages().items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # Bind the module lazily: add_arguments imports it, run() is looked up at dispatch.
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_stage_module=module)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher prepends --local_rank=N; the rank comes from the environment instead."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._stage_module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # User-facing errors (bad config, missing file, corrupt shard) end with one clear line.
        if getattr(args, "debug", False):
            raise
        print(f"trime {args.stage}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
