"""A real one-node SLURM on localhost for the tests: munged, slurmctld and slurmd run as root.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives in one temporary
directory; the daemons run in the foreground as our children and are stopped by pid.
Client commands find the cluster through SLURM_CONF (set in `env` and, while running, os.environ).
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import time
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "scontrol", "squeue")


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def unavailable_reason() -> Optional[str]:
    """Why a one-node SLURM cannot be started here (None when it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian packages slurm-wlm and munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: str, host: str, cpus: int, munge_socket: str) -> str:
    """slurm.conf of a one-node cluster: node `host` at 127.0.0.1, partition `debug`, no cgroups."""
    ctld_port, slurmd_port = _free_port(), _free_port()
    return f"""\
ClusterName=trimetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=120
SlurmctldTimeout=120
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is os.environ plus SLURM_CONF."""

    def __init__(self, root: str, cpus: Optional[int] = None):
        self.root = os.path.abspath(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: dict[str, subprocess.Popen] = {}
        self._old_conf = os.environ.get("SLURM_CONF")

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=self.conf)

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout_s: float = 60.0) -> "SlurmCluster":
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        open(os.path.join(self.root, "plugstack.conf"), "w").close()
        with open(self.conf, "w") as f:
            f.write(slurm_conf(self.root, self.host, self.cpus, self.munge_socket))
        try:
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", self.host])
            atexit.register(self.stop)  # never leave daemons behind, even if the caller forgets
            os.environ["SLURM_CONF"] = self.conf
            self.wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        d = os.path.join(self.root, "munge")
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                               f"--seed-file={d}/munged.seed", "--num-threads=2"])
        self._wait(lambda: os.path.exists(self.munge_socket), 20, "munged socket")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def stop(self) -> None:
        """Stop the daemons this object started (by pid), newest first."""
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if os.environ.get("SLURM_CONF") == self.conf:
            if self._old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._old_conf

    # ------------------------------------------------------------------ status

    def node_state(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env,
                             timeout=30)
        return out.stdout.strip() if out.returncode == 0 else f"sinfo failed: {out.stderr.strip()}"

    def wait_idle(self, timeout_s: float) -> None:
        self._wait(lambda: self.node_state() == "idle", timeout_s, "node idle in sinfo")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for name in ("munged.out", "munge/munged.log", "slurmctld.out", "slurmctld.log", "slurmd.out",
                     "slurmd.log"):
            path = os.path.join(self.root, name)
            if os.path.isfile(path):
                text = open(path, errors="replace").read()[-tail:]
                if text.strip():
                    parts.append(f"--- {name}\n{text}")
        return "\n".join(parts)
