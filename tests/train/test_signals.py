"""SIGTERM / SIGUSR1 (SLURM's time-limit and preemption signals): finish the step, checkpoint, exit 3, resume."""
import json
import os
import signal
import subprocess
import time

import pytest

from trime_dist.core.output_lock import LOCK_NAME
from trime_dist.train.signals import EXIT_STOPPED_BY_SIGNAL, StopFlag

from cli_runner import REPO, run_trime, trime_command
from shard_fixtures import write_pattern_splits


def test_stop_flag_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    flag = StopFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing: the first one is kept
        assert flag.requested and flag.signal_name == "SIGUSR1"
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal_data")
    write_pattern_splits(root)
    return root


def train_args(data, out, *extra):
    # many steps, so the signal lands well before the end; save_every above max_steps: only the stop saves
    return ["train", "--auto-resume", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
            f"data.train={data}/train", f"data.valid={data}/valid", f"run.out_dir={out}", "run.max_steps=60",
            "model.max_seq_len=32", "run.save_every=1000", *extra]


def step_rows(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
    return [r["step"] for r in rows if "loss" in r]


def run_and_signal(args, ranks: int, pick, out, sig=signal.SIGTERM, after_steps: int = 3):
    """Start `trime ARGS`, send `sig` to the processes `pick(proc)` returns once metrics show `after_steps`."""
    from trime_dist.core.launch_env import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(trime_command(args, ranks), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(step_rows(out)) < after_steps and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in (pick(proc) if proc.poll() is None else []):  # (an early exit: its stderr shows why)
        os.kill(pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def check_stopped_then_resume(data, out, rc, stderr, ranks, *extra):
    assert rc == EXIT_STOPPED_BY_SIGNAL, stderr[-3000:]
    assert "stopped by" in stderr and "rerun with --auto-resume" in stderr
    steps = step_rows(out)
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 60
    # the checkpoint is of the last step in metrics.jsonl: the step in flight was finished, then saved
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{steps[-1]:08d}"
    assert not os.path.isfile(out / "summary.json")  # the run is not done
    assert not os.path.exists(out / LOCK_NAME)  # the stopped job let go of run.out_dir: the rerun may take it
    run_trime(train_args(data, out, *extra), ranks=ranks)
    assert step_rows(out) == list(range(1, 61))
    assert json.load(open(out / "summary.json"))["steps"] == 60


def test_sigterm_one_rank_checkpoints_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    rc, _, stderr = run_and_signal(train_args(data, out), 1, lambda proc: [proc.pid], out)
    check_stopped_then_resume(data, out, rc, stderr, 1)


def test_signal_to_one_of_two_deepspeed_ranks_stops_both_at_one_step(data, tmp_path):
    """SIGUSR1 to rank 1 only: rank 0 learns it in the step's all-reduce, both save the same step."""
    import psutil

    def rank1(proc):
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "--local_rank=1" in p.cmdline()]
        assert len(ranks) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
        return [ranks[0].pid]

    out = tmp_path / "run"
    extra = ["deepspeed.zero_stage=2"]
    rc, _, stderr = run_and_signal(train_args(data, out, *extra), 2, rank1, out, sig=signal.SIGUSR1)
    check_stopped_then_resume(data, out, rc, stderr, 2, *extra)


def test_signal_recorded_before_the_loop_is_taken_over():
    from trime_dist.train import signals

    before, before_term = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    signals.catch_early()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # during "start-up": recorded, not fatal
        flag = StopFlag().install()
        assert flag.requested and flag.signal_name == "SIGTERM"
        flag.restore()
        later = StopFlag().install()
        assert not later.requested  # taken over once: a later flag starts clean
        later.restore()
    finally:
        signals.release_early()
    assert signal.getsignal(signal.SIGUSR1) is before and signal.getsignal(signal.SIGTERM) is before_term


def test_in_process_train_leaves_the_signal_handlers_as_it_found_them(tmp_path):
    from trime_dist.cli import main

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    assert main(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), "--print-config"]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def _has_torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False


def test_time_limit_signal_during_start_up_stops_after_the_first_step(data, tmp_path):
    """SLURM's --signal may come up to a minute early, i.e. while the ranks still import torch: each rank
    keeps it, and both stop after step 1 with a checkpoint (exit 3) instead of dying; a rerun finishes."""
    import psutil

    from trime_dist.core.launch_env import free_port

    out = tmp_path / "run"
    marker = tmp_path / "stopped.json"  # what the SLURM script checks besides the exit status
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(free_port()),
               TRIME_STOPPED_MARKER=str(marker))
    proc = subprocess.Popen(trime_command(train_args(data, out), 2, launcher="mpi"), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    ranks = []
    while proc.poll() is None and time.time() < deadline:
        ranks = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                 if "trime_dist.cli" in " ".join(p.cmdline())]
        # torch is imported only after `trime train` set its recorder: the rank is past Python's start-up
        if len(ranks) == 2 and all(_has_torch_loaded(pid) for pid in ranks):
            break
        time.sleep(0.02)
    assert len(ranks) == 2 and not step_rows(out), "the ranks were not caught during start-up"
    for pid in ranks:
        os.kill(pid, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED_BY_SIGNAL, stderr[-3000:]
    assert step_rows(out) == [1]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000001"
    assert json.loads(marker.read_text()) == {"step": 1, "signal": "SIGUSR1"}
    run_trime(train_args(data, out), ranks=2, launcher="mpi")
    assert step_rows(out) == list(range(1, 61))
