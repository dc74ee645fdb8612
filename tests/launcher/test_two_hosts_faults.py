"""Faults across two real nodes (tests/helpers/two_hosts.py), `trime launch deepspeed --hosts nodeA:1,nodeB:1`
started on nodeA, rank 0 on nodeA and rank 1 on nodeB, gloo on the veth chosen by `run.net_interface=tr0`
(no GLOO_SOCKET_IFNAME in the environment):

- node B's link goes down mid-training: rank 0 says, in one line, that rank 1 on nodeB stopped answering, and
  the rank on nodeB (which cannot reach rank 0's store) ends too; the same command with --auto-resume on a
  healthy cluster resumes from the last checkpoint to the weights of an uninterrupted run;
- the rank on node B is SIGKILLed: the survivor's one line names rank 1 and nodeB.

The seconds from the fault to the error line are printed at the end (benchmarks/RESULTS.md, the fault table).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from cli_runner import run_trime
from two_hosts import NODE_ENV, TRIME, assert_same_weights, train_args

pytestmark = pytest.mark.two_hosts

STEPS = 40
TIMEOUT_S = 10  # run.dist_timeout_s: how long a rank waits for the other before it names it and stops
FAULT_ARGS = (f"run.dist_timeout_s={TIMEOUT_S}", "run.save_every=4", "data.valid=")
MARKER = "trime train: error:"
FAULTS: dict[str, tuple[float, str]] = {}  # fault -> (seconds from the fault to the error line, the line)


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    if FAULTS:
        print("\nfault | seconds to the error line | the line\n" + "\n".join(
            f"{fault} | {s:.1f} | {line}" for fault, (s, line) in FAULTS.items()))


class Launch:
    """`trime launch deepspeed --hosts nodeA:1,nodeB:1 -- trime train ...` running on nodeA, its output (pdsh's,
    both nodes' lines prefixed "nodeX: ") in a file."""

    def __init__(self, cluster, work, out: str, *extra: str):
        self.cluster, self.work, self.out = cluster, work, out
        env = {k: v for k, v in NODE_ENV.items() if k != "GLOO_SOCKET_IFNAME"}  # run.net_interface sets it
        args = train_args(out, STEPS, *FAULT_ARGS, "run.net_interface=tr0")
        argv = [TRIME, "launch", "deepspeed", "--hosts", "nodeA:1,nodeB:1", "--run-dir", f"{out}-launch", "--",
                args[0], *extra, *args[1:]]
        self.log_path = work / f"{os.path.basename(out)}.{int(time.time() * 1000)}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cluster.node_command("nodeA", argv), cwd=str(work), stdout=log,
                                         stderr=subprocess.STDOUT, env=dict(cluster.env, **env),
                                         start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_steps(self, n: int) -> None:
        metrics = self.work / self.out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
            assert self.proc.poll() is None, f"the launcher ended before step {n}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no step {n} in 300 s:\n{self.output()[-4000:]}"
            time.sleep(0.05)

    def error_lines(self) -> list[str]:
        return [line[line.index(MARKER):] for line in self.output().splitlines() if MARKER in line]

    def seconds_to_error_line(self, since: float, limit_s: float = 180) -> float:
        while not self.error_lines():
            assert self.proc.poll() is None, f"the launcher ended without an error line:\n{self.output()[-4000:]}"
            assert time.monotonic() - since < limit_s, f"no error line {limit_s} s after the fault (a hang):\n" \
                                                      f"{self.output()[-4000:]}"
            time.sleep(0.1)
        return time.monotonic() - since

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the launcher did not end {timeout} s after the fault:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def ranks_on(self, node: str) -> list[psutil.Process]:
        """The trime rank processes of this run on `node` (the children DeepSpeed's launch.py starts)."""
        found = []
        for pid in self.cluster.node_pids(node):
            try:
                cmd = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            if any(a.startswith("--local_rank=") for a in cmd) and f"run.out_dir={self.out}" in cmd:
                found.append(psutil.Process(pid))
        return found


def wait_until_gone(procs: list[psutil.Process], limit_s: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=limit_s)
    return not alive


def test_node_b_link_down_then_requeue_resumes_to_the_same_weights(cluster, work):
    # the uninterrupted run, on one host (two nodes give the same weights: test_two_hosts.py)
    run_trime(["launch", "local", "--nproc", "2", "--",
               *train_args("runs/link-ref", STEPS, *FAULT_ARGS, "run.net_interface=lo")], cwd=str(work))
    run = Launch(cluster, work, "runs/link")
    try:
        run.wait_for_steps(6)  # a checkpoint at step 4 is written
        on_b = run.ranks_on("nodeB")
        assert len(on_b) == 1, run.output()[-3000:]
        cut = time.monotonic()
        cluster.link("nodeB", up=False)
        seconds = run.seconds_to_error_line(cut)
        run.finish()
        # the rank on nodeB, cut off from rank 0's store, ends on its own (its line cannot reach nodeA)
        assert wait_until_gone(on_b, 120), "the rank on nodeB still runs 2 minutes after its link went down"
        seconds_b = time.monotonic() - cut
    finally:
        run.kill()
        cluster.restart()  # nodeB stays DOWN in slurmctld, and its ssh sessions are gone: a fresh cluster
    lines = run.error_lines()
    assert len(lines) == 1, run.output()[-4000:]
    # (from the watchdog, "no progress for 10 s ...", or gloo's own timeout of the default group)
    assert lines[0].startswith("trime train: error: rank 0 on nodeA: "), lines[0]
    assert "rank 1 (nodeB) of 2 died or stopped answering" in lines[0], lines[0]
    FAULTS["node B's link down during training"] = (seconds, lines[0])
    FAULTS["  (the rank on node B ended, no line reaches nodeA)"] = (seconds_b, "")
    assert run.proc.returncode != 0

    rerun = Launch(cluster, work, "runs/link", "--auto-resume")
    try:
        assert rerun.finish(timeout=300) == 0, rerun.output()[-4000:]
    finally:
        rerun.kill()
    assert "resuming from " in rerun.output(), rerun.output()[-3000:]
    assert_same_weights(work / "runs" / "link-ref", work / "runs" / "link")


def test_rank_killed_on_node_b_is_named_by_the_survivor(cluster, work):
    run = Launch(cluster, work, "runs/kill")
    try:
        run.wait_for_steps(3)
        on_b = run.ranks_on("nodeB")
        assert len(on_b) == 1, run.output()[-3000:]
        hit = time.monotonic()
        on_b[0].send_signal(signal.SIGKILL)
        seconds = run.seconds_to_error_line(hit)
        code = run.finish()
    finally:
        run.kill()
    lines = run.error_lines()
    assert code != 0 and len(lines) == 1, run.output()[-4000:]
    assert lines[0].startswith("trime train: error: rank 0 on nodeA: rank 1 (nodeB) of 2 died or stopped answering"), \
        lines[0]
    assert "Traceback" not in run.output(), run.output()[-4000:]
    FAULTS["rank 1 on node B SIGKILLed"] = (seconds, lines[0])


# ----------------------------------------------------------------------------- node B dies mid-chain

CHAIN_LINE = "trime launch slurm-chain: "
MPI_START_FLAKE = "internal_Init_thread"  # in a step's .err when MPI_Init failed (see test_slurm.py)


def started_training(proc, metrics, steps: int, limit_s: float = 900) -> bool:
    """Wait until training logged `steps` steps (True) or the chain ended before (False)."""
    deadline = time.monotonic() + limit_s
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no training step {steps} in {limit_s} s"
        time.sleep(0.05)
    return True


def chain_logs(folder) -> str:
    return "".join(open(p, errors="replace").read()
                   for p in glob.glob(str(folder / "runs" / "chain" / "logs" / "*.err")))


@pytest.mark.slow
def test_node_b_dies_mid_chain_then_a_rerun_finishes_like_an_uninterrupted_chain(cluster, work):
    """`trime launch slurm-chain --wait` on 2 nodes x 1 task; while its train step runs (a rank on each node),
    node B dies: its slurmd is killed and everything else on it (the job's slurmstepd and rank) is frozen, as
    on a node that hangs. SLURM marks nodeB DOWN (SlurmdTimeout) and requeues the job; the chain stops with one
    line naming the step, its job, NODE_FAIL and the nodes, and cancels the job and the steps after it. On a
    restarted cluster the same command finishes: prepare and group find their outputs complete, train resumes
    from its last checkpoint, and every output equals that of the chain run without a fault (on one node x 2
    tasks, which equals 2 nodes x 1 task: test_two_hosts.py)."""
    from test_two_hosts import _strip_json, chain_command, chain_folder, chain_steps, same_outputs
    from two_hosts import on_node_a

    steps = chain_steps("runs/chain", 200, "run.save_every=4", "data.valid=")
    ref = chain_folder(work / "chain-ref")
    on_node_a(cluster, ref, chain_command(1, 2, steps), timeout=1800)

    folder = chain_folder(work / "chain-fault")
    argv = chain_command(2, 1, steps)
    log_path = work / "chain-fault.log"

    def output() -> str:
        return log_path.read_text(errors="replace")

    proc = None
    try:
        for attempt in range(3):
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cluster.node_command("nodeA", argv), cwd=str(folder), stdout=log,
                                        stderr=subprocess.STDOUT, env=dict(cluster.env, **NODE_ENV),
                                        start_new_session=True)
            if started_training(proc, folder / "runs" / "chain" / "out" / "metrics.jsonl", 6):  # checkpoint: 4
                break
            # a failed MPI start-up (seen under srun --mpi=pmi2, the launcher's default before hydra's mpiexec:
            # "mpi/pmi2: value not properly terminated in client request") stops the chain on that step with
            # its line, and the same command continues it
            assert MPI_START_FLAKE in chain_logs(folder) and attempt < 2, \
                f"the chain ended before training's step 6:\n{output()[-4000:]}"
            print(f"chain stopped before training (MPI start-up), rerunning it:\n{output()[-1500:]}")
        hit = time.monotonic()
        cluster.procs["slurmd-nodeB"].kill()
        frozen = [pid for pid in cluster.node_pids("nodeB") if pid not in {p.pid for p in cluster.procs.values()}]
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        while CHAIN_LINE not in output():
            assert proc.poll() is None, f"the chain ended without its line:\n{output()[-4000:]}"
            assert time.monotonic() - hit < 300, f"no line 300 s after node B died (a hang):\n{output()[-4000:]}"
            time.sleep(0.1)
        seconds = time.monotonic() - hit
        code = proc.wait(timeout=120)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cluster.restart()  # nodeB stays DOWN in slurmctld: a fresh cluster (its processes are gone with it)
    jobs = [json.loads(line) for line in open(folder / "runs" / "chain" / "jobs.jsonl")][-6:]
    lines = [line[line.index(CHAIN_LINE):] for line in output().splitlines() if CHAIN_LINE in line]
    assert code == 1 and len(lines) == 1, output()[-4000:]
    train = jobs[3]["job_id"]
    assert lines[0].startswith(f"{CHAIN_LINE}step 4 of 6, train (job {train}), ended NODE_FAIL on "), lines[0]
    assert " on nodeA,nodeB " in lines[0] or " on node[A-B] " in lines[0], lines[0]
    assert "(nodeB DOWN" in lines[0] and "SLURM requeues such a job" in lines[0], lines[0]
    assert f"steps after it (jobs {jobs[4]['job_id']}, {jobs[5]['job_id']}) cancelled" in lines[0], lines[0]
    assert not (folder / "runs" / "chain" / "eval.json").exists()
    FAULTS["node B dies during the chain's train step (slurmd killed, the rest frozen)"] = (seconds, lines[0])

    proc = on_node_a(cluster, folder, argv, timeout=1800)  # the same command, on the restarted cluster
    assert "(eval) completed" in proc.stdout, proc.stdout[-3000:]
    rerun = [json.loads(line) for line in open(folder / "runs" / "chain" / "jobs.jsonl")][-6:]
    def logs_of(job) -> str:
        return "".join(open(p, errors="replace").read()
                       for p in glob.glob(str(folder / "runs" / "chain" / "logs" / f"*-{job['job_id']}*")))

    assert [j["stage"] for j in rerun] == [j["stage"] for j in jobs] and rerun[0]["job_id"] != jobs[0]["job_id"]
    assert "already complete" in logs_of(rerun[2]), logs_of(rerun[2])[-2000:]  # group: nothing redone
    assert "resuming from " in logs_of(rerun[3]), logs_of(rerun[3])[-2000:]
    for sub in ("data/train", "data/valid", "data/grouped", "runs/chain/ds"):
        same_outputs(ref, folder, sub)
    assert_same_weights(ref / "runs" / "chain" / "out", folder / "runs" / "chain" / "out")
    rows = _strip_json(folder / "runs" / "chain" / "eval.json")
    assert len(rows) == 2 and rows == _strip_json(ref / "runs" / "chain" / "eval.json")
