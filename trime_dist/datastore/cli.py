"""`trime datastore build | info`: the stage's flags and entry point."""
from __future__ import annotations

import argparse
import os

from trime_dist.datastore.config import DatastoreConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.core.flags import add_dataclass_flags

    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="encode the data, train the index, add and merge (R ranks, resumable)")
    add_dataclass_flags(b, DatastoreConfig)
    i = sub.add_parser("info", help="print a datastore's metadata")
    i.add_argument("path", help="datastore directory")
    for p in (b, i):
        p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        from trime_dist.datastore.store import open_datastore

        ds = open_datastore(args.path, load_values=False)
        for k, v in ds.meta.items():
            if k != "parts":
                print(f"{k:>22}: {v}")
        print(f"{'parts':>22}: {len(ds.meta['parts'])}")
        return 0
    from trime_dist.core.flags import dataclass_from_flags

    cfg = dataclass_from_flags(DatastoreConfig, args)
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"trime datastore build: --{name} is required")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out}: is a file, expected a datastore directory")
    from trime_dist.core.launch_env import discover_env
    from trime_dist.core.output_lock import output_lock

    # rank 0 holds --out for the job, taken before torch loads: a second build on it is refused at once
    with output_lock(cfg.out, rank=discover_env().rank):
        _build(cfg)
    return 0


def _build(cfg: DatastoreConfig) -> None:
    from trime_dist.core.distributed import shutdown_distributed
    from trime_dist.datastore.build import build_datastore

    try:
        build_datastore(cfg)
    except Exception as e:
        from trime_dist.core.launch_env import discover_env
        from trime_dist.core.lost_ranks import is_peer_failure, rank_lost_error

        env = discover_env()
        if env.world_size > 1 and is_peer_failure(e):
            raise rank_lost_error(e, env, "the datastore build") from e
        raise
    finally:
        shutdown_distributed()
