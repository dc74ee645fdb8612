"""Command lines for one machine (DeepSpeed launcher / mpiexec / one process) and for several nodes with DeepSpeed.

Each builder returns the argv a person could type; `run_command` prints it and runs it.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from launcher.hostfile import format_hostfile, is_local
from trime_dist.core.rank_logs import LOG_DIR_ENV
from trime_dist.core.stages import (
    MPI,
    SINGLE,
    STAGES,
    TORCH,
    env_bin,
    runner_for,
    split_stage,
)

DEFAULT_ENV_VARS = ("PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def local_command(argv: list[str], nproc: int, master_port: Optional[int] = None) -> list[str]:
    """The command that runs `trime STAGE ...` as `nproc` ranks on this machine with the stage's runner."""
    stage, stage_args = split_stage(argv)
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: expected at least 1")
    trime = [env_bin("trime"), stage, *stage_args]
    kind = runner_for(stage)
    if kind == TORCH:
        if master_port is None:
            from trime_dist.core.launch_env import free_port

            master_port = free_port()
        return [env_bin("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(master_port), *trime]
    if kind == MPI:
        return [env_bin("mpiexec"), "-n", str(nproc), *trime]
    if nproc != 1:
        raise ValueError(f"stage {stage!r} runs as one process; drop --nproc {nproc}")
    return trime


def run_command(cmd: list[str], env: Optional[dict] = None, dry_run: bool = False, cwd: Optional[str] = None,
                signal_ranks: bool = False) -> int:
    """Print `$ cmd` and run it (or only print it); returns its exit status. A stop signal to this process is
    passed on (launcher/supervise.py): with `signal_ranks` (DeepSpeed ranks on this machine) to every rank,
    and the status is EXIT_STOPPED_BY_SIGNAL once they saved a checkpoint and stopped; else to the command."""
    from launcher.supervise import run_supervised

    print(f"$ {shlex.join(cmd)}", flush=True)
    if dry_run:
        return 0
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    try:
        return run_supervised(cmd, full_env, cwd, signal_ranks)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cmd[0]}: not found (is it installed in this environment?)") from None


# ----------------------------------------------------------------------------- several nodes

@dataclass
class MultiNodePlan:
    hostfile: str                   # the hostfile deepspeed reads
    env_file: str                   # .deepspeed_env: variables exported on every node
    command: list[str]              # the deepspeed command line
    env: dict[str, str] = field(default_factory=dict)  # extra variables for the local deepspeed process
    ranks_here: bool = False        # one local host: the ranks are this machine's processes (signalled directly)


def collect_env(names: list[str]) -> dict[str, str]:
    """Variables for every node: the defaults that are set here, plus `NAME` (value from here) or `NAME=VALUE`."""
    out: dict[str, str] = {}
    for name in DEFAULT_ENV_VARS:
        if os.environ.get(name):
            out[name] = os.environ[name]
    out.setdefault("OMP_NUM_THREADS", "1")
    for item in names:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise ValueError(f"--env {item!r}: {name!r} is not a valid environment variable name")
        if not sep:
            if name not in os.environ:
                raise ValueError(f"--env {name}: not set in this environment; give a value with --env {name}=VALUE")
            value = os.environ[name]
        out[name] = value
    for name, value in out.items():
        if "\n" in value:
            raise ValueError(f"environment variable {name} holds a newline, which .deepspeed_env cannot carry")
    return out


def write_env_file(path: str, env: dict[str, str]) -> None:
    from trime_dist.core.io import atomic_write_text

    atomic_write_text(path, "".join(f"{k}={v}\n" for k, v in env.items()))


def deepspeed_multinode_plan(argv: list[str], hosts: dict[str, int], run_dir: str, *, master_addr: str = "",
                             master_port: int = 29500, include: str = "", exclude: str = "",
                             num_nodes: Optional[int] = None, launcher: str = "pdsh",
                             env_names: list[str] = ()) -> MultiNodePlan:
    """Hostfile + .deepspeed_env in `run_dir` and the `deepspeed --hostfile ...` command for a torch stage."""
    stage, stage_args = split_stage(argv)
    if runner_for(stage) != TORCH:
        raise ValueError(f"stage {stage!r} does not run under DeepSpeed; start MPI stages with "
                         f"`trime launch local` (mpiexec) or `trime launch slurm`")
    if include and exclude:
        raise ValueError("--include and --exclude cannot be combined (DeepSpeed refuses it)")
    if (include or exclude) and num_nodes is not None:
        raise ValueError("--num-nodes cannot be combined with --include/--exclude (DeepSpeed refuses it)")
    os.makedirs(run_dir, exist_ok=True)
    hostfile = os.path.join(os.path.abspath(run_dir), "hostfile")
    env_file = os.path.join(os.path.abspath(run_dir), ".deepspeed_env")
    from trime_dist.core.io import atomic_write_text

    atomic_write_text(hostfile, format_hostfile(hosts))
    node_env = collect_env(list(env_names))
    node_env.setdefault(LOG_DIR_ENV, os.path.join(os.path.abspath(run_dir), "logs"))  # STAGE-HOST-rankR.log
    write_env_file(env_file, node_env)
    first = next(iter(hosts))
    # 127.0.0.1 only when every rank is on this machine: with other hosts in the hostfile their ranks
    # would dial their own loopback (a two-node run started on node A hung in the rendezvous).
    all_local = all(is_local(h) for h in hosts)
    master_addr = master_addr or ("127.0.0.1" if all_local else first)
    cmd = [env_bin("deepspeed"), "--hostfile", hostfile, "--master_addr", master_addr,
           "--master_port", str(master_port), "--launcher", launcher]
    if include:
        cmd += ["--include", include]
    elif exclude:
        cmd += ["--exclude", exclude]
    else:
        cmd += ["--num_nodes", str(num_nodes if num_nodes is not None else len(hosts))]
    ranks_here = len(hosts) == 1 and is_local(first)
    if ranks_here:
        # One local host: deepspeed starts the ranks itself, so its ssh reachability check is moot.
        cmd.append("--no_ssh_check")
    cmd += [env_bin("trime"), stage, *stage_args]
    # DS_ENV_FILE points deepspeed at our .deepspeed_env (it exports it on every node of a multi-node run);
    # a one-host run starts ranks locally, so the same variables also go into its own environment.
    return MultiNodePlan(hostfile, env_file, cmd, env={"DS_ENV_FILE": env_file, **node_env}, ranks_here=ranks_here)


def stage_kind_help() -> str:
    """`corpus: one process, prepare: mpiexec, ...`: how `trime launch local` starts each stage."""
    names = {TORCH: "DeepSpeed launcher", MPI: "mpiexec", SINGLE: "one process"}
    return ", ".join(f"{name}: {names[s.runner]}" for name, s in STAGES.items() if s.runner is not None)

