"""A real two-node cluster on one machine for the tests: nodeA and nodeB.

Each node is a network namespace (joined to the other by a veth pair, 10.231.0.1/24 and 10.231.0.2/24 on an
interface named `tr0` in both) entered with `nsenter --net=/run/netns/NS` + `unshare --uts --mount`: its own
hostname, and, inside that view only, a private hosts file bind-mounted over /etc/hosts, a private ssh client
config over /etc/ssh/ssh_config and a per-node folder over /dev/shm (the real ones stay untouched). Per node:
sshd on its own address (a generated host and user key, a private tmpfs /run) so pdsh/ssh/hydra reach the
other node, and `slurmd -N NODE`; slurmctld runs on node A; one munged in the root namespace serves both (its
socket path crosses namespaces).

Only the namespaces' own addresses and 127.0.0.1 are used: the namespaces have no route anywhere else.
Everything started is stopped by pid (and whatever still runs inside a namespace, by `ip netns pids`), the
namespaces are deleted; atexit guards it. `node_command(node, argv)` is the argv that runs a command on a node.
At the end: what the two-node tests share (the environment every rank gets, `trime train` arguments, weights).
"""
from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import time
from typing import Optional

from cli_runner import BIN, REPO

NODES = ("nodeA", "nodeB")
SUBNET = "10.231.0"
ADDRS = {"nodeA": f"{SUBNET}.1", "nodeB": f"{SUBNET}.2"}
IFNAME = "tr0"   # the veth end inside each namespace (GLOO_SOCKET_IFNAME, UCX_NET_DEVICES)
TOOLS = ("ip", "nsenter", "unshare", "mount", "sshd", "ssh", "ssh-keygen", "pdsh", "munged", "slurmctld",
         "slurmd", "sbatch", "srun", "sinfo", "scontrol")


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _netns_pids(ns: str) -> list[int]:
    out = subprocess.run([_which("ip"), "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def unavailable_reason() -> Optional[str]:
    """Why a two-node cluster cannot be started here (None when it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces, sshd and the SLURM daemons need root"
    missing = [n for n in TOOLS if _which(n) is None]
    if missing:
        return (f"not installed: {', '.join(missing)} (Debian packages iproute2, util-linux, openssh-server, "
                f"openssh-client, pdsh, slurm-wlm, munge; .ci/install-system-packages)")
    if not os.path.isfile("/etc/ssh/ssh_config"):
        return "/etc/ssh/ssh_config missing (openssh-client)"
    return None


def slurm_conf(root: str, munge_socket: str, cpus: int) -> str:
    # Job ids that no other cluster on this machine used: MPICH names its /dev/shm segment after the PMI job id
    # ("JOB.STEP" under srun --mpi=pmi2), and a segment a killed rank left behind for the same id would be opened
    # by a later job of another cluster (every fresh cluster numbers its jobs from 1).
    first_job_id = 1000 + (os.getpid() * 7919 + int(time.time())) % 900000
    nodes = "\n".join(f"NodeName={n} NodeAddr={ADDRS[n]} NodeHostname={n} CPUs={cpus} RealMemory=1024 "
                      f"State=UNKNOWN" for n in NODES)
    return f"""\
ClusterName=trimetwo
FirstJobId={first_job_id}
SlurmctldHost=nodeA({ADDRS['nodeA']})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
SlurmdTimeout=30
SlurmctldTimeout=120
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class TwoHosts:
    """`start()` / `stop()`; `run(node, argv)` runs a command on a node; `env` has SLURM_CONF."""

    def __init__(self, root: str, cpus: int = 2):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        tag = f"{os.getpid() % 100000}"
        self.netns = {n: f"trime{tag}{n[-1]}" for n in NODES}
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: dict[str, subprocess.Popen] = {}
        self._made_netns: list[str] = []
        self._atexit = False

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=self.conf)

    # ------------------------------------------------------------------ entering a node

    def node_command(self, node: str, argv: list[str]) -> list[str]:
        """argv that runs `argv` on `node`: its network namespace, its hostname, its /etc/hosts and ssh config."""
        d = os.path.join(self.root, node)
        # /sys stays the machine's (slurmd needs its cgroup tree; `ip netns exec` would remount all of it), but
        # its network folders come from a sysfs mounted in the node's namespace: UCX and gloo check an
        # interface there and would find only the machine's own (not tr0) otherwise.
        # /dev/shm is the node's own folder, as on separate machines: MPICH and UCX put shared-memory segments
        # there, named after the PMI job id, and the two nodes (and the one-node test SLURM) must not meet there.
        setup = (f"hostname {node} && mount --bind {d}/hosts /etc/hosts && mount --bind {d}/shm /dev/shm && "
                 f"mount --bind {self.root}/ssh_config /etc/ssh/ssh_config && "
                 f"mount -t sysfs sysfs {d}/sys && mount --bind {d}/sys/class/net /sys/class/net && "
                 f"mount --bind {d}/sys/devices/virtual/net /sys/devices/virtual/net && exec \"$@\"")
        return [_which("nsenter"), f"--net=/run/netns/{self.netns[node]}", "--",
                _which("unshare"), "--uts", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", setup, "on-" + node, *[str(a) for a in argv]]

    def run(self, node: str, argv, *, check: bool = False, timeout: float = 600, env: Optional[dict] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.node_command(node, argv), capture_output=True, text=True, timeout=timeout,
                              env=dict(self.env, **(env or {})), cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"on {node}: {shlex.join(map(str, argv))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def shell(self, node: str, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(node, ["/bin/bash", "-c", script], **kw)

    # ------------------------------------------------------------------ start / stop

    def start(self, timeout_s: float = 60.0) -> "TwoHosts":
        if not self._atexit:
            atexit.register(self.stop)  # never leave namespaces or daemons behind
            self._atexit = True
        try:
            self._files()
            self._network()
            self._start_munged()
            for node in NODES:
                self._start_sshd(node)
            self._spawn("slurmctld", "nodeA", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            for node in NODES:
                self._spawn(f"slurmd-{node}", node, [_which("slurmd"), "-D", "-f", self.conf, "-N", node])
            self._wait(self._ssh_ready, timeout_s, "ssh nodeA -> nodeB")
            self._wait(lambda: self.node_states() == {n: "idle" for n in NODES}, timeout_s, "both nodes idle")
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self) -> "TwoHosts":
        """A fresh cluster (after a fault: a node whose link went down stays DOWN in slurmctld)."""
        self.stop()
        shutil.rmtree(os.path.join(self.root, "state"), ignore_errors=True)
        return self.start()

    def _files(self) -> None:
        for sub in ("state", "munge", "ssh"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o755)  # slurmd in both views reaches the socket
        open(os.path.join(self.root, "plugstack.conf"), "w").close()
        with open(self.conf, "w") as f:
            f.write(slurm_conf(self.root, self.munge_socket, self.cpus))
        ssh = os.path.join(self.root, "ssh")
        for key in ("host_key", "id_key"):
            if not os.path.exists(os.path.join(ssh, key)):
                subprocess.run([_which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f",
                                os.path.join(ssh, key)], check=True)
        shutil.copy(os.path.join(ssh, "id_key.pub"), os.path.join(ssh, "authorized_keys"))
        with open(os.path.join(self.root, "ssh_config"), "w") as f:
            f.write(f"Host {' '.join(NODES)} {' '.join(ADDRS.values())}\n"
                    f"  IdentityFile {ssh}/id_key\n  User root\n  StrictHostKeyChecking no\n"
                    f"  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
                    # a node that drops off the network ends its ssh session (and pdsh) in ~6 s, not hours later
                    f"  ServerAliveInterval 2\n  ServerAliveCountMax 3\n"
                    f"Host *\n  BatchMode yes\n")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ADDRS[n]} {n}\n" for n in NODES)
        for node in NODES:
            d = os.path.join(self.root, node)
            os.makedirs(os.path.join(d, "sys"), exist_ok=True)
            os.makedirs(os.path.join(d, "shm"), exist_ok=True)
            os.chmod(os.path.join(d, "shm"), 0o1777)
            with open(os.path.join(d, "hosts"), "w") as f:
                f.write(hosts)
            with open(os.path.join(d, "sshd_config"), "w") as f:
                f.write(f"ListenAddress {ADDRS[node]}:22\nHostKey {ssh}/host_key\nPidFile {d}/sshd.pid\n"
                        f"AuthorizedKeysFile {ssh}/authorized_keys\nPermitRootLogin prohibit-password\n"
                        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                        f"StrictModes no\nAcceptEnv *\nPermitUserEnvironment no\nMaxStartups 100\n"
                        f"MaxSessions 100\nUseDNS no\nPrintMotd no\nSubsystem sftp internal-sftp\n")

    def _ip(self, *args: str) -> None:
        subprocess.run([_which("ip"), *args], check=True, capture_output=True, text=True)

    def _network(self) -> None:
        a, b = (self.netns[n] for n in NODES)
        for ns in (a, b):
            if os.path.exists(f"/run/netns/{ns}"):
                self._delete_netns(ns)
            self._ip("netns", "add", ns)
            self._made_netns.append(ns)
        tmp_a, tmp_b = f"{a}v", f"{b}v"
        self._ip("link", "add", tmp_a, "netns", a, "type", "veth", "peer", "name", tmp_b, "netns", b)
        for node, ns, tmp in (("nodeA", a, tmp_a), ("nodeB", b, tmp_b)):
            self._ip("-n", ns, "link", "set", tmp, "name", IFNAME)
            self._ip("-n", ns, "addr", "add", f"{ADDRS[node]}/24", "dev", IFNAME)
            self._ip("-n", ns, "link", "set", IFNAME, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def link(self, node: str, up: bool) -> None:
        """Take a node's end of the veth down (a node dropping off the network) or up again."""
        self._ip("-n", self.netns[node], "link", "set", IFNAME, "up" if up else "down")

    def _start_munged(self) -> None:
        d = os.path.join(self.root, "munge")
        key = os.path.join(d, "munge.key")
        if not os.path.exists(key):
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
            os.chmod(key, 0o400)
        self.procs["munged"] = self._popen("munged", [
            _which("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed",
            "--num-threads=2"])
        self._wait(lambda: os.path.exists(self.munge_socket), 20, "munged socket")

    def _start_sshd(self, node: str) -> None:
        d = os.path.join(self.root, node)
        # a private /run: sshd wants /run/sshd; nothing of the machine's /run is seen or changed
        self._spawn(f"sshd-{node}", node, ["/bin/sh", "-c", f"mount -t tmpfs -o mode=755 tmpfs /run && "
                                                            f"mkdir -p /run/sshd && exec {_which('sshd')} -D -e "
                                                            f"-f {d}/sshd_config"])

    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(os.path.join(self.root, f"{name}.out"), "w") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def _spawn(self, name: str, node: str, cmd: list[str]) -> None:
        self.procs[name] = self._popen(name, self.node_command(node, cmd))

    def stop(self) -> None:
        """Stop every daemon by pid (newest first), then whatever still runs in the namespaces; delete them."""
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for ns in list(self._made_netns):
            self._delete_netns(ns)
            self._made_netns.remove(ns)

    def node_pids(self, node: str) -> list[int]:
        """Every process running in the node's network namespace."""
        return _netns_pids(self.netns[node])

    def _delete_netns(self, ns: str) -> None:
        for sig in ("TERM", "KILL"):
            pids = _netns_pids(ns)
            for pid in pids:
                try:
                    os.kill(pid, 15 if sig == "TERM" else 9)
                except (ProcessLookupError, ValueError):
                    pass
            if not pids:
                break
            time.sleep(0.5)
        subprocess.run([_which("ip"), "netns", "delete", ns], capture_output=True)

    # ------------------------------------------------------------------ status

    def _ssh_ready(self) -> bool:
        return self.run("nodeA", ["ssh", "nodeB", "hostname"], timeout=20).stdout.strip() == "nodeB"

    def node_states(self) -> dict:
        out = self.run("nodeA", ["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
        return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if name.endswith((".out", ".log")) and os.path.isfile(path):
                text = open(path, errors="replace").read()[-tail:]
                if text.strip():
                    parts.append(f"--- {name}\n{text}")
        return "\n".join(parts)


# ----------------------------------------------------------------------------- what the two-node tests share

TINY = os.path.join(REPO, "configs", "tiny.yaml")
TRIME = os.path.join(BIN, "trime")
# every rank, on either node, gets the checkout's code and one thread; MPI (UCX) and gloo use the veth, so the
# traffic between the nodes really crosses it (UCX would see one machine and use shared memory otherwise)
NODE_ENV = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": IFNAME, "GLOO_SOCKET_IFNAME": IFNAME}
TIMES: dict[str, dict[str, float]] = {}  # printed when the cluster fixture ends


def timed(key: str, which: str, fn):
    t = time.monotonic()
    out = fn()
    TIMES.setdefault(key, {})[which] = time.monotonic() - t
    return out


def on_node_a(cluster, work, argv, timeout=600):
    proc = cluster.run("nodeA", argv, cwd=str(work), env=NODE_ENV, timeout=timeout)
    assert proc.returncode == 0, (f"on nodeA: {shlex.join(map(str, argv))} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n{cluster.logs()}")
    return proc


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def assert_same_weights(a, b):
    import torch

    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def train_args(out: str, steps: int = 3, *extra: str) -> list[str]:
    return ["train", "--config", TINY, "data.train=data/train", "data.valid=data/valid", f"run.out_dir={out}",
            f"run.max_steps={steps}", "model.max_seq_len=32", "run.log_every=1", *extra]
