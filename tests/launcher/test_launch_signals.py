"""A stop signal to any launcher ends in a checkpoint and no rank left: SIGTERM to `trime launch local` alone (then
--auto-resume finishes the run), to its process group (and a second signal), to every process at once, Ctrl-C
while the ranks start, SIGUSR1 to `trime launch deepspeed` on one host: exit 3 each time. SIGKILL to `trime
launch local`, or SIGTERM to a bare `deepspeed` runner (it dies of it, 143): the ranks notice and stop with a
checkpoint. An MPI command gets the signal passed on.

Real processes: 2 DeepSpeed ranks on CPU, the tiny config of tests/train/test_signals.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from launcher.supervise import is_stage_process
from trime_dist.core.constants import EXIT_STOPPED_BY_SIGNAL
from trime_dist.core.launch_env import free_port

from cli_runner import BIN, REPO, run_trime, trime_command
from shard_fixtures import write_pattern_splits

MAX_STEPS = 150


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_signal_data")
    write_pattern_splits(root)
    return root


def train_args(data, out):
    # many steps, so the signal lands well before the end; save_every above max_steps: only the stop saves
    return ["train", "--auto-resume", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
            f"data.train={data}/train", f"data.valid={data}/valid", f"run.out_dir={out}",
            f"run.max_steps={MAX_STEPS}", "model.max_seq_len=32", "run.save_every=1000"]


def launch_local(data, out):
    return [f"{BIN}/trime", "launch", "local", "--nproc", "2", "--master-port", str(free_port()), "--",
            *train_args(data, out)]


def launch_deepspeed_localhost(data, out):
    return [f"{BIN}/trime", "launch", "deepspeed", "--hosts", "localhost:2", "--run-dir", str(out) + "-launch",
            "--master-port", str(free_port()), "--", *train_args(data, out)]


def step_rows(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
    return [r["step"] for r in rows if "loss" in r]


def start(cmd, **env):
    """`cmd` as the leader of a new process group (as a shell starts a job), output in a file."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
    log = open(os.path.join(env.get("LOG_DIR", "/tmp"), f"launch-signals-{os.getpid()}-{time.time_ns()}.log"),
               "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def wait_for_training(proc, out, steps: int = 3, timeout: float = 300) -> None:
    """Until metrics.jsonl shows `steps` steps (training has started on both ranks)."""
    deadline = time.time() + timeout
    while len(step_rows(out)) < steps:
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{output(proc)[-3000:]}"
        assert time.time() < deadline, f"no {steps} steps in {timeout} s:\n{output(proc)[-3000:]}"
        time.sleep(0.1)


def rank_processes(out) -> list[psutil.Process]:
    """Every live process of this run: the ranks' command lines name its out_dir (orphans too)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = p.info["cmdline"] or []
        if p.info["status"] != psutil.STATUS_ZOMBIE and is_stage_process(cmdline) and \
                f"run.out_dir={out}" in cmdline:
            found.append(p)
    return found


def wait_gone(procs, timeout: float) -> list[psutil.Process]:
    """The processes still alive after up to `timeout` s."""
    deadline = time.time() + timeout
    alive = list(procs)
    while alive and time.time() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.fixture
def cleanup():
    """Kill whatever a test leaves running (its processes and the run's ranks), whatever happened."""
    started, runs = [], []
    yield started, runs
    leftovers = [psutil.Process(p.pid) for p in started if p.poll() is None]
    for out in runs:
        leftovers += rank_processes(out)
    for p in leftovers:
        try:
            p.kill()
        except psutil.Error:
            pass
    for p in started:
        p.wait(timeout=30)
        p.log.close()


def check_stopped(out, proc):
    steps = step_rows(out)
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < MAX_STEPS, output(proc)[-3000:]
    # the checkpoint is of the last step in metrics.jsonl: the step in flight was finished, then saved
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{steps[-1]:08d}"
    assert not (out / "summary.json").exists()
    assert rank_processes(out) == [], "a rank outlived its launcher"


def stop_launch_local(data, tmp_path, cleanup, send, command=launch_local) -> tuple:
    started, runs = cleanup
    out = tmp_path / "run"
    runs.append(out)
    proc = start(command(data, out), LOG_DIR=str(tmp_path))
    started.append(proc)
    wait_for_training(proc, out)
    send(proc)
    t0 = time.time()
    rc = proc.wait(timeout=300)
    return out, proc, rc, time.time() - t0


@pytest.mark.slow  # a stop and a resume to the end: about a minute
def test_sigterm_to_launch_local_alone_checkpoints_exits_3_and_resumes(data, tmp_path, cleanup):
    out, proc, rc, _ = stop_launch_local(data, tmp_path, cleanup, lambda proc: os.kill(proc.pid, signal.SIGTERM))
    assert rc == EXIT_STOPPED_BY_SIGNAL, output(proc)[-3000:]
    assert "asking the ranks to save a checkpoint and stop" in output(proc)
    check_stopped(out, proc)
    # --auto-resume continues from the checkpoint to the end
    run_trime(train_args(data, out), ranks=2)
    assert step_rows(out) == list(range(1, MAX_STEPS + 1))
    assert json.load(open(out / "summary.json"))["steps"] == MAX_STEPS


def test_sigterm_to_the_process_group_and_a_second_signal(data, tmp_path, cleanup):
    """kill -TERM -PGID (a scheduler, or Ctrl-C's SIGINT) reaches only the launcher: the runner runs in a group
    of its own; a second signal while the ranks save changes nothing."""
    def send(proc):
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)

    out, proc, rc, _ = stop_launch_local(data, tmp_path, cleanup, send)
    assert rc == EXIT_STOPPED_BY_SIGNAL, output(proc)[-3000:]
    assert "already stopping" in output(proc)
    check_stopped(out, proc)


def test_sigusr1_to_launch_deepspeed_on_one_host(data, tmp_path, cleanup):
    """`trime launch deepspeed` with one local host takes the same path; SIGUSR1 reaches the ranks as SIGUSR1."""
    out, proc, rc, _ = stop_launch_local(data, tmp_path, cleanup, lambda proc: os.kill(proc.pid, signal.SIGUSR1),
                                         command=launch_deepspeed_localhost)
    assert rc == EXIT_STOPPED_BY_SIGNAL, output(proc)[-3000:]
    assert "stopped by SIGUSR1 after step" in output(proc)
    check_stopped(out, proc)


def test_sigterm_to_every_process_at_once(data, tmp_path, cleanup):
    """As systemd stops a unit: the runner dies of it at once (143) and launch.py signals its ranks; the launcher
    waits for the ranks' checkpoint and exits 3, not with the runner's 143."""
    def send(proc):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(rank_processes(out)) == 2
        for p in tree:
            p.send_signal(signal.SIGTERM)

    out = tmp_path / "run"
    out, proc, rc, _ = stop_launch_local(data, tmp_path, cleanup, send)
    assert rc == EXIT_STOPPED_BY_SIGNAL, output(proc)[-3000:]
    assert "the runner's own status: 143" in output(proc)
    check_stopped(out, proc)


def test_sigterm_to_a_bare_deepspeed_runner_stops_its_ranks(data, tmp_path, cleanup):
    """DeepSpeed's runner has no handler on one node: it dies of SIGTERM (143, DeepSpeed's doing), and its ranks,
    which would train on as orphans, see it gone and stop after the same step with a checkpoint."""
    started, runs = cleanup
    out = tmp_path / "run"
    runs.append(out)
    marker = tmp_path / "stopped.json"
    proc = start(trime_command(train_args(data, out), 2), LOG_DIR=str(tmp_path), TRIME_STOPPED_MARKER=str(marker))
    started.append(proc)
    wait_for_training(proc, out)
    ranks = rank_processes(out)
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the shell's 143
    assert wait_gone(ranks, timeout=120) == [], "ranks kept training after their runner died"
    check_stopped(out, proc)
    stopped = json.loads(marker.read_text())
    assert stopped["step"] == step_rows(out)[-1] and "the deepspeed runner" in stopped["signal"]


def test_ctrl_c_while_the_ranks_start_stops_after_step_1(data, tmp_path, cleanup):
    """SIGINT (Ctrl-C) before any rank trains: each rank gets SIGTERM once it catches it, trains step 1, saves."""
    started, runs = cleanup
    out = tmp_path / "run"
    runs.append(out)
    proc = start(launch_local(data, out), LOG_DIR=str(tmp_path))
    started.append(proc)
    deadline = time.time() + 60
    while not rank_processes(out) and time.time() < deadline:  # the runner has started launch.py's ranks
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == EXIT_STOPPED_BY_SIGNAL, output(proc)[-3000:]
    assert step_rows(out) == [1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000001"
    assert rank_processes(out) == []


def test_sigkill_to_launch_local_leaves_no_rank_training(data, tmp_path, cleanup):
    """Nothing can catch SIGKILL: the runner gets SIGTERM as its parent dies (PR_SET_PDEATHSIG) and dies of it,
    and the ranks see their runner gone and stop with a checkpoint."""
    started, runs = cleanup
    out = tmp_path / "run"
    runs.append(out)
    proc = start(launch_local(data, out), LOG_DIR=str(tmp_path))
    started.append(proc)
    wait_for_training(proc, out)
    ranks = rank_processes(out)
    assert len(ranks) == 2
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert wait_gone(ranks, timeout=120) == [], "ranks kept training after their launcher was killed"
    check_stopped(out, proc)


def test_a_signal_for_an_mpi_command_is_passed_on_to_mpiexec(tmp_path, cleanup):
    """MPI stages: the launcher passes the signal to mpiexec (hydra passes it to its ranks) and waits."""
    started, _ = cleanup
    code = ("import os, sys; from launcher.supervise import run_supervised; "
            f"sys.exit(run_supervised([{os.path.join(BIN, 'mpiexec')!r}, '-n', '2', 'sleep', '120'], "
            "dict(os.environ), None, signal_ranks=False))")
    proc = start([sys.executable, "-c", code], LOG_DIR=str(tmp_path))
    started.append(proc)
    deadline = time.time() + 30
    sleepers = []
    while len(sleepers) < 2 and time.time() < deadline:
        sleepers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "sleep"]
        time.sleep(0.1)
    assert len(sleepers) == 2, output(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert "SIGTERM: passing it on to" in output(proc)
    assert wait_gone(sleepers, timeout=5) == []


def test_launcher_watch_sees_a_dead_runner_or_a_new_parent():
    from trime_dist.train.signals import LauncherWatch

    runner = subprocess.Popen(["sleep", "60"])
    watch = LauncherWatch(os.getppid(), psutil.Process(runner.pid))
    assert watch.gone() is None
    runner.kill()
    time.sleep(0.2)  # a zombie until waited for: dead all the same
    assert watch.gone() is None  # checked at most once a second
    watch._next_check = 0.0
    assert f"the deepspeed runner, pid {runner.pid}" in watch.gone()
    runner.wait()
    assert "launch.py" in LauncherWatch(os.getppid() + 1).gone()  # re-parented: launch.py is gone
    assert LauncherWatch.of_this_rank() is None  # pytest was not started by DeepSpeed's launcher


def test_is_stage_process_tells_ranks_from_runners():
    py = sys.executable
    assert is_stage_process([py, "-u", f"{BIN}/trime", "--local_rank=0", "train", "--config", "c.yaml"])
    assert is_stage_process([py, "-m", "trime_dist.cli", "train"])
    assert not is_stage_process([py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", f"{BIN}/trime"])
    assert not is_stage_process([py, f"{BIN}/deepspeed", "--num_gpus", "2", f"{BIN}/trime", "train"])
    assert not is_stage_process([f"{BIN}/mpiexec", "-n", "2", f"{BIN}/trime", "prepare"])
    assert not is_stage_process([py, f"{BIN}/trime", "launch", "local", "--", "train"])
