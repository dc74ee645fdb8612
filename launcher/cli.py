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

EXAMPLES = __doc__.split("\n\n", 1)[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from launcher.local import stage_kind_help

    parser.epilog = f"examples:\n{EXAMPLES}\nrunners: {stage_kind_help()}"
    modes = parser.add_subparsers(dest="mode", metavar="MODE")
    modes.required = True

    local = modes.add_parser("local", help="this machine: DeepSpeed launcher for torch stages, mpiexec for MPI stages")
    local.add_argument("--nproc", type=int, default=1, help="ranks (GPUs, or CPU ranks without GPUs)")
    local.add_argument("--master-port", type=int, default=None, help="torch rendezvous port (default: a free one)")
    _common(local)

    ds = modes.add_parser("deepspeed", help="several nodes through the DeepSpeed launcher and a hostfile")
    hosts = ds.add_mutually_exclusive_group(required=True)
    hosts.add_argument("--hosts", help="HOST:SLOTS,... e.g. node1:8,node2:8 (written to RUN_DIR/hostfile)")
    hosts.add_argument("--hostfile", help="an existing hostfile of 'HOST slots=N' lines")
    ds.add_argument("--run-dir", default="runs/launch", help="where hostfile and .deepspeed_env are written")
    ds.add_argument("--master-addr", default="", help="rendezvous address (default: the first host)")
    ds.add_argument("--master-port", type=int, default=29500, help="rendezvous port")
    ds.add_argument("--num-nodes", type=int, default=None, help="use the first N hosts (default: all)")
    ds.add_argument("--include", default="", help="DeepSpeed resource filter, e.g. 'node1:0,1@node2'")
    ds.add_argument("--exclude", default="", help="DeepSpeed resource filter, e.g. 'node2:7'")
    ds.add_argument("--launcher", default="pdsh", choices=["pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm"],
                    help="how deepspeed reaches the other nodes")
    ds.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="export on every node via .deepspeed_env (repeatable; e.g. NCCL_SOCKET_IFNAME); "
                         "PYTHONPATH, OMP_NUM_THREADS and TOKENIZERS_PARALLELISM go by default when set")
    _common(ds)

    for name, text in (("slurm", "render an sbatch script for one stage and submit it"),
                       ("slurm-chain", "submit chain: steps (prepare -> group -> train -> datastore -> eval) "
                                       "as jobs, each --dependency=afterok on the one before")):
        p = modes.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=None, help="SLURM settings YAML (configs/slurm_example.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override a setting, e.g. --set partition=gpu --set stages.train.nodes=4")
        p.add_argument("--wait", action="store_true", help="block until the (last) job ends; fail if it fails")
        p.add_argument("--write-only", action="store_true",
                       help="write the sbatch script(s) into run_dir without submitting (submit them with sbatch)")
        if name == "slurm-chain":
            p.add_argument("--step", action="append", default=[], metavar="'STAGE ARGS'",
                           help="a step (repeatable, in order); replaces the config's chain:")
        _common(p, command=(name == "slurm"))


def _common(p: argparse.ArgumentParser, command: bool = True) -> None:
    p.add_argument("--dry-run", action="store_true", help="print what would run, start nothing")
    if command:
        p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- STAGE ARGS",
                       help="the trime stage and its arguments, after `--`")


def run(args: argparse.Namespace) -> int:
    from launcher.slurm_submit import SlurmError

    try:
        return {"local": run_local, "deepspeed": run_deepspeed, "slurm": run_slurm,
                "slurm-chain": run_slurm}[args.mode](args)
    except SlurmError as e:
        print(f"trime launch {args.mode}: {e}", file=sys.stderr)
        return 1


def run_local(args: argparse.Namespace) -> int:
    from launcher.local import local_command, run_command

    return run_command(local_command(args.command, args.nproc, args.master_port), dry_run=args.dry_run)


def run_deepspeed(args: argparse.Namespace) -> int:
    from launcher.hostfile import parse_hosts_arg, read_hostfile
    from launcher.local import deepspeed_multinode_plan, run_command

    hosts = parse_hosts_arg(args.hosts) if args.hosts else read_hostfile(args.hostfile)
    plan = deepspeed_multinode_plan(args.command, hosts, args.run_dir, master_addr=args.master_addr,
                                    master_port=args.master_port, include=args.include, exclude=args.exclude,
                                    num_nodes=args.num_nodes, launcher=args.launcher, env_names=args.env)
    print(f"# hostfile: {plan.hostfile}\n# environment for every node: {plan.env_file}")
    return run_command(plan.command, env=plan.env, dry_run=args.dry_run)


def run_slurm(args: argparse.Namespace) -> int:
    """`slurm` (one stage after `--`) and `slurm-chain` (steps from --step or the config's chain:)."""
    from launcher.slurm import dry_run_text, plan_jobs
    from launcher.slurm_config import load_slurm_config
    from launcher.slurm_submit import submit_chain, write_jobs

    cfg = load_slurm_config(args.config, args.overrides)
    chained = args.mode == "slurm-chain"
    steps = [shlex.split(s) for s in (args.step or cfg.chain)] if chained else [args.command]
    jobs = plan_jobs(steps, cfg, os.getcwd(), numbered=chained)
    if args.dry_run:
        print(dry_run_text(jobs, chained=chained))
    elif args.write_only:
        write_jobs(jobs)
        for job in jobs:
            print(f"wrote {job.script_path}")
    else:
        submit_chain(jobs, wait=args.wait)
    return 0
