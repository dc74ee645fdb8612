"""`trime train`: the stage's command line (config file, overrides, --resume / --auto-resume) and entry point."""
from __future__ import annotations

import argparse
import os

from trime_dist.core.config import config_help, config_yaml, load_config
from trime_dist.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.train.signals import EXIT_STOPPED_BY_SIGNAL

    parser.add_argument("--config", default=None, help="YAML file (configs/*.yaml); keys as listed below")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in run.out_dir (same data order; an error "
                        "when there is none)")
    resume.add_argument("--auto-resume", action="store_true",
                        help="--resume when run.out_dir holds a checkpoint, else start fresh (a requeued job)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (checks keys and types, starts nothing)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override config values, e.g. model.n_layers=2 objective.name=trime_local")
    parser.epilog = (f"SIGTERM / SIGUSR1 stop training after the current step with a checkpoint and exit status "
                     f"{EXIT_STOPPED_BY_SIGNAL}: rerun with --auto-resume to continue.\n\n") + \
        "configuration keys (defaults < --config YAML < overrides):\n" + config_help(TrainConfig)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    from trime_dist.core.launch_env import discover_env
    from trime_dist.core.output_lock import output_lock

    # before the slow imports, so a second job on run.out_dir is refused at once; rank 0 holds it for the job
    with output_lock(cfg.run.out_dir, rank=discover_env().rank):
        return _train(cfg, args)


def _train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from trime_dist.core.distributed import shutdown_distributed
    from trime_dist.train.loop import train
    from trime_dist.train.signals import EXIT_STOPPED_BY_SIGNAL, StoppedBySignal

    resume = args.resume or (args.auto_resume and has_checkpoint(cfg.run.out_dir))
    try:
        train(cfg, resume=resume)
    except StoppedBySignal:  # the loop logged it; the exit code tells the job script to requeue
        return EXIT_STOPPED_BY_SIGNAL
    finally:
        shutdown_distributed()
    return 0


def has_checkpoint(out_dir: str) -> bool:
    """Whether `out_dir` holds a checkpoint to resume from; says which (rank 0, stdout: the job log)."""
    from trime_dist.core.launch_env import discover_env

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    latest = os.path.join(ckpt_dir, "latest")
    found = os.path.isfile(latest)
    if discover_env().rank == 0:
        tag = open(latest).read().strip() if found else ""
        print(f"resuming from {ckpt_dir}/{tag}" if found else f"no checkpoint in {ckpt_dir}: starting fresh",
              flush=True)
    return found
