"""The one reader of the launcher's environment: rank, world size, local rank and rendezvous address.

Understands the DeepSpeed launcher, torchrun, srun and mpiexec (MPICH / Open MPI). No torch here,
so launchers and the MPI stages can use it without paying for the import.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

_PORT_DEFAULT = 29500
# Set by mpiexec (MPICH, Open MPI) or srun --mpi=pmi2/pmix in every rank it starts.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed/torchrun | slurm | mpi | single


def _first_env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return None


def _slurm_master_addr() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        hosts = out.stdout.split()
        return hosts[0] if hosts else None
    except (OSError, subprocess.CalledProcessError):
        return nodelist.split(",")[0]


def discover_env() -> DistEnv:
    """Read rank / world / master from the environment of whichever launcher started us.

    The one place that knows launchers: DeepSpeed's launcher and torchrun set RANK/WORLD_SIZE/
    LOCAL_RANK/MASTER_ADDR; srun sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; mpiexec (MPICH
    or Open MPI) sets PMI_RANK/PMI_SIZE or OMPI_COMM_WORLD_*. Without any, this is one process.

    An MPI launcher sets its variables in each process it starts, so when RANK/WORLD_SIZE or
    SLURM_PROCID/SLURM_NTASKS name another world they were inherited from an enclosing job (a shell
    or test runner that was itself a rank, `mpiexec` inside an sbatch script) and are ignored:
    trusting them made every MPI rank "rank 0 of 1", all writing the same files.
    """
    env = _torch_launcher_env() or _slurm_env()
    mpi = _mpi_env()
    if mpi is None:
        return env or DistEnv(0, 1, 0, "127.0.0.1", _PORT_DEFAULT, "single")
    if env is not None and (env.rank, env.world_size) == (mpi.rank, mpi.world_size):
        return env  # srun --mpi=pmi2, or DeepSpeed's MPI runners: one world, the first launcher's master
    if env is not None and (env, mpi) not in _WARNED:  # said once: every stage asks more than once
        _WARNED.add((env, mpi))
        log.warning("ignoring %s rank %d of %d inherited from an enclosing job: mpiexec started this process "
                    "as rank %d of %d", env.launcher, env.rank, env.world_size, mpi.rank, mpi.world_size)
    return mpi


_WARNED: set = set()  # the (inherited, MPI) worlds discover_env has warned about


def _torch_launcher_env() -> DistEnv | None:
    if _first_env("RANK") is None or _first_env("WORLD_SIZE") is None:
        return None
    return DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(_first_env("LOCAL_RANK") or 0),
        master_addr=_first_env("MASTER_ADDR") or "127.0.0.1",
        master_port=int(_first_env("MASTER_PORT") or _PORT_DEFAULT),
        launcher="deepspeed/torchrun",
    )


def _slurm_env() -> DistEnv | None:
    if _first_env("SLURM_PROCID") is None or _first_env("SLURM_NTASKS") is None or \
            int(os.environ["SLURM_NTASKS"]) <= 1:
        return None
    return DistEnv(
        rank=int(os.environ["SLURM_PROCID"]),
        world_size=int(os.environ["SLURM_NTASKS"]),
        local_rank=int(_first_env("SLURM_LOCALID") or 0),
        master_addr=_first_env("MASTER_ADDR") or _slurm_master_addr() or "127.0.0.1",
        master_port=int(_first_env("MASTER_PORT") or _PORT_DEFAULT),
        launcher="slurm",
    )


def _mpi_env() -> DistEnv | None:
    mpi_rank = _first_env("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
    mpi_size = _first_env("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    if mpi_rank is None or mpi_size is None:
        return None
    return DistEnv(
        rank=int(mpi_rank),
        world_size=int(mpi_size),
        local_rank=int(_first_env("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK") or 0),
        master_addr=_first_env("MASTER_ADDR") or "127.0.0.1",
        master_port=int(_first_env("MASTER_PORT") or _PORT_DEFAULT),
        launcher="mpi",
    )


def export_env(env: DistEnv) -> None:
    """Write the discovered values back as RANK/WORLD_SIZE/... so DeepSpeed and torch agree."""
    os.environ.update({
        "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
    })


def master_host(env: DistEnv) -> str:
    """The host of rank 0's rendezvous store: MASTER_ADDR, or this host's name when that is a loopback address."""
    return socket.gethostname() if env.master_addr in ("127.0.0.1", "localhost") else env.master_addr


def rank_on_host(rank: int, host: Optional[str] = None) -> str:
    """"rank 1 on node002" (this host unless `host`): who says an error line, in every line a rank of a
    multi-host job prints."""
    return f"rank {rank} on {host or socket.gethostname()}"


def where(env: DistEnv) -> str:
    """rank_on_host of this process."""
    return rank_on_host(env.rank)


def apply_net_interface(name: str, key: str = "run.net_interface") -> None:
    """Make gloo and NCCL use the network interface `name` (config key `key`) by setting GLOO_SOCKET_IFNAME and
    NCCL_SOCKET_IFNAME, before the process group exists. An interface this host lacks is refused at once (not
    after a rendezvous that can never complete); an explicit GLOO_/NCCL_SOCKET_IFNAME that names another one is
    an error naming both. Empty `name`: the environment is left as it is."""
    if not name:
        return
    have = sorted(i for _, i in socket.if_nameindex())
    if name not in have:
        raise ValueError(f"{key}={name}: no such network interface on {socket.gethostname()} "
                         f"(it has: {', '.join(have)})")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        given = os.environ.get(var)
        if given not in (None, "", name):
            raise ValueError(f"{key}={name} but {var}={given} is set in the environment: "
                             f"unset one, or make them name the same interface")
        os.environ[var] = name


def job_key(env: DistEnv) -> str:
    """The same string on every rank of one job, another for any job running at the same time: the SLURM
    job and step, and the rendezvous address (a loopback one named by this host: a one-node job)."""
    host = master_host(env)
    slurm = ".".join(filter(None, (os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID"))))
    return f"{slurm + '/' if slurm else ''}{host}:{env.master_port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started_by_deepspeed_launcher() -> bool:
    """DeepSpeed's launch.py (the per-node process the `deepspeed` runner starts) sets CROSS_RANK, CROSS_SIZE and
    LOCAL_SIZE in every rank it spawns; torchrun, srun and mpiexec do not."""
    return _first_env("RANK") is not None and all(_first_env(n) is not None
                                                   for n in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"))


def launched_by_mpi() -> bool:
    if os.environ.get("TRIME_USE_MPI") == "1" or any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # Every task would otherwise think it is rank 0 of 1 and write the same files.
        raise ValueError("started by srun with several tasks but without MPI: use `srun --mpi=pmi2` "
                         "(or pmix), or mpiexec")
    return False
