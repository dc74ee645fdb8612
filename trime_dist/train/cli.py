"""`trime train`: the stage's command line (config file, overrides, --resume) and entry point."""
from __future__ import annotations

import argparse

from trime_dist.core.config import load_config
from trime_dist.core.describe import config_help
from trime_dist.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file (configs/*.yaml); keys as listed below")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in run.out_dir (same data order)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override config values, e.g. model.n_layers=2 objective.name=trime_local")
    parser.epilog = "configuration keys (defaults < --config YAML < overrides):\n" + config_help(TrainConfig)


def run(args: argparse.Namespace) -> int:
    from trime_dist.core.distributed import shutdown_distributed
    from trime_dist.train.loop import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    try:
        train(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    return 0
