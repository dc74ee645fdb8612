"""The `trime` console script: one subcommand per stage (trime_dist.core.stages), each in its own module.

A stage module exposes `add_arguments(parser)` and `run(args) -> int`; this file only routes. Only the
chosen stage's module is imported, so `trime --help` stays fast and needs no torch, and a stage's heavy
dependencies (deepspeed, faiss, mpi4py) load only when that stage runs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional

from trime_dist.core.stages import STAGES


def build_parser(stage: Optional[str] = None) -> argparse.ArgumentParser:
    """Every stage as a subcommand; only `stage` (when given) gets its options, from its module."""
    parser = argparse.ArgumentParser(
        prog="trime", description="trime_dist: distributed training of memory-augmented LMs (TRIME).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True
    for name, entry in STAGES.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == stage:
            importlib.import_module(entry.module).add_arguments(p)
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
    in_process = argv is not None  # called by Python code (tests), not as the `trime` command
    argv = _strip_local_rank(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # The stage is the first word (the top level has no options but --help).
    stage = argv[0] if argv and argv[0] in STAGES else None
    if stage != "train":
        return _run(stage, argv)
    # before the slow imports: a time-limit signal during start-up must not kill a rank
    from trime_dist.train.signals import catch_early, release_early

    catch_early()
    try:
        return _run(stage, argv)
    finally:
        # Called in-process, leave the handlers as they were; the `trime` command keeps recording until it
        # exits, so a time-limit signal just after training ended cannot turn a finished job into a failed one.
        if in_process:
            release_early()


def _run(stage: Optional[str], argv: list[str]) -> int:
    args = build_parser(stage).parse_args(argv)
    module = importlib.import_module(STAGES[args.stage].module)
    from trime_dist.core.constants import EXIT_RANK_LOST
    from trime_dist.core.lost_ranks import RankLost
    from trime_dist.core.rank_logs import add_rank_log_file

    log_file = None
    try:
        log_file = add_rank_log_file(args.stage)  # TRIME_LOG_DIR/STAGE-HOST-rankR.log, when set
        return int(module.run(args) or 0)
    except RankLost as e:  # another rank died: one line naming it, from every survivor
        if getattr(args, "debug", False):
            raise
        print(f"trime {args.stage}: error: {e}", file=sys.stderr)
        return EXIT_RANK_LOST
    except (ValueError, FileNotFoundError, KeyError) as e:
        # User-facing errors (bad config, missing file, corrupt shard) end with one clear line.
        if getattr(args, "debug", False):
            raise
        if not (getattr(e, "all_ranks", False) and _rank() != 0):  # an error of every rank: rank 0 says it
            print(f"trime {args.stage}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()


def _rank() -> int:
    from trime_dist.core.launch_env import discover_env

    return discover_env().rank


if __name__ == "__main__":
    sys.exit(main())
