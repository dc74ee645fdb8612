"""`trime launch`: start any stage locally, on several nodes with DeepSpeed, or as SLURM batch jobs.

    trime launch local --nproc 2 -- train --config configs/tiny.yaml
    trime launch deepspeed --hosts node1:8,node2:8 -- train --config configs/wt103_247m.yaml
    trime launch slurm --config configs/slurm_example.yaml [--dry-run] -- prepare --input ... --output ...
    trime launch slurm-chain --config configs/slurm_example.yaml [--dry-run]
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

from trime_dist.core.config import config_help, opt
from trime_dist.core.flags import add_dataclass_flags, dataclass_from_flags

EXAMPLES = __doc__.split("\n\n", 1)[1]
DRY_RUN = "print what would run, start nothing"


@dataclass
class LocalLaunch:
    nproc: int = opt(1, "ranks (GPUs, or CPU ranks without GPUs)")
    master_port: Optional[int] = opt(None, "torch rendezvous port (default: a free one)")
    dry_run: bool = opt(False, DRY_RUN)


@dataclass
class DeepSpeedLaunch:
    hosts: str = opt("", "HOST:SLOTS,... e.g. node1:8,node2:8 (written to RUN_DIR/hostfile); or --hostfile")
    hostfile: str = opt("", "an existing hostfile of 'HOST slots=N' lines; or --hosts")
    run_dir: str = opt("runs/launch", "where hostfile and .deepspeed_env are written")
    master_addr: str = opt("", "rendezvous address (default: the first host)")
    master_port: int = opt(29500, "rendezvous port")
    num_nodes: Optional[int] = opt(None, "use the first N hosts (default: all)")
    include: str = opt("", "DeepSpeed resource filter, e.g. 'node1:0,1@node2'")
    exclude: str = opt("", "DeepSpeed resource filter, e.g. 'node2:7'")
    launcher: str = opt("pdsh", "how deepspeed reaches the other nodes",
                        choices=("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm"))
    env: list[str] = opt(doc="export on every node via .deepspeed_env (repeatable; e.g. NCCL_SOCKET_IFNAME); "
                             "PYTHONPATH, OMP_NUM_THREADS and TOKENIZERS_PARALLELISM go by default when set",
                         factory=list, repeat=True, metavar="NAME[=VALUE]")
    dry_run: bool = opt(False, DRY_RUN)


@dataclass
class SlurmLaunch:
    config: Optional[str] = opt(None, "SLURM settings YAML (configs/slurm_example.yaml); keys as listed below",
                                metavar="FILE")
    set: list[str] = opt(doc="override a setting, e.g. --set partition=gpu --set stages.train.nodes=4",
                         factory=list, repeat=True, metavar="KEY=VALUE")
    wait: bool = opt(False, "block until the (last) job ends; fail if it fails")
    write_only: bool = opt(False, "write the sbatch script(s) into run_dir without submitting (submit them "
                                  "with sbatch)")
    dry_run: bool = opt(False, DRY_RUN)


@dataclass
class SlurmChainLaunch(SlurmLaunch):
    step: list[str] = opt(doc="a step (repeatable, in order); replaces the config's chain:", factory=list,
                          repeat=True, metavar="'STAGE ARGS'")


# mode -> (its flags, help line, takes `-- STAGE ARGS`)
MODES: dict[str, tuple[type, str, bool]] = {
    "local": (LocalLaunch, "this machine: DeepSpeed launcher for torch stages, mpiexec for MPI stages", True),
    "deepspeed": (DeepSpeedLaunch, "several nodes through the DeepSpeed launcher and a hostfile", True),
    "slurm": (SlurmLaunch, "render an sbatch script for one stage and submit it", True),
    "slurm-chain": (SlurmChainLaunch, "submit chain: steps (prepare -> group -> train -> datastore -> eval) "
                                      "as jobs, each --dependency=afterok on the one before", False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from launcher.local import stage_kind_help
    from launcher.slurm_config import SlurmConfig

    parser.epilog = f"examples:\n{EXAMPLES}\nrunners: {stage_kind_help()}"
    modes = parser.add_subparsers(dest="mode", metavar="MODE")
    modes.required = True
    for name, (cls, text, takes_command) in MODES.items():
        p = modes.add_parser(name, help=text, description=text, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_dataclass_flags(p, cls, config_file=False)
        if takes_command:  # argparse-special: everything after `--` is the stage's own command line
            p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- STAGE ARGS",
                           help="the trime stage and its arguments, after `--`")
        if issubclass(cls, SlurmLaunch):
            p.epilog = "settings (defaults < --config YAML < --set):\n" + config_help(SlurmConfig)


def run(args: argparse.Namespace) -> int:
    from launcher.slurm_submit import SlurmError

    cfg = dataclass_from_flags(MODES[args.mode][0], args)
    command = getattr(args, "command", [])
    try:
        if args.mode == "local":
            return run_local(cfg, command)
        if args.mode == "deepspeed":
            return run_deepspeed(cfg, command)
        return run_slurm(cfg, command)
    except SlurmError as e:
        print(f"trime launch {args.mode}: {e}", file=sys.stderr)
        return 1


def run_local(cfg: LocalLaunch, command: list[str]) -> int:
    from launcher.local import local_command, run_command
    from trime_dist.core.stages import TORCH, runner_for, split_stage

    cmd = local_command(command, cfg.nproc, cfg.master_port)
    return run_command(cmd, dry_run=cfg.dry_run, signal_ranks=runner_for(split_stage(command)[0]) == TORCH)


def run_deepspeed(cfg: DeepSpeedLaunch, command: list[str]) -> int:
    from launcher.hostfile import parse_hosts_arg, read_hostfile
    from launcher.local import deepspeed_multinode_plan, run_command

    if bool(cfg.hosts) == bool(cfg.hostfile):
        raise ValueError("give one of --hosts HOST:SLOTS,... or --hostfile FILE")
    hosts = parse_hosts_arg(cfg.hosts) if cfg.hosts else read_hostfile(cfg.hostfile)
    plan = deepspeed_multinode_plan(command, hosts, cfg.run_dir, master_addr=cfg.master_addr,
                                    master_port=cfg.master_port, include=cfg.include, exclude=cfg.exclude,
                                    num_nodes=cfg.num_nodes, launcher=cfg.launcher, env_names=cfg.env)
    print(f"# hostfile: {plan.hostfile}\n# environment for every node: {plan.env_file}")
    # several nodes: a stop signal goes to the runner, whose pdsh handler signals every node's launch.py
    return run_command(plan.command, env=plan.env, dry_run=cfg.dry_run, signal_ranks=plan.ranks_here)


def run_slurm(cfg: SlurmLaunch, command: list[str]) -> int:
    """`slurm` (one stage after `--`) and `slurm-chain` (steps from --step or the config's chain:)."""
    from launcher.slurm import dry_run_text, plan_jobs
    from launcher.slurm_config import load_slurm_config
    from launcher.slurm_submit import submit_chain, write_jobs

    settings = load_slurm_config(cfg.config, cfg.set)
    chained = isinstance(cfg, SlurmChainLaunch)
    steps = [shlex.split(s) for s in (cfg.step or settings.chain)] if chained else [command]
    jobs = plan_jobs(steps, settings, os.getcwd(), numbered=chained)
    if cfg.dry_run:
        print(dry_run_text(jobs, chained=chained))
    elif cfg.write_only:
        write_jobs(jobs)
        for job in jobs:
            print(f"wrote {job.script_path}")
    else:
        submit_chain(jobs, wait=cfg.wait)
    return 0
