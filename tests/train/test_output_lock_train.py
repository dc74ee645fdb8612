"""`trime train` holds run.out_dir for the whole job: a second job on it is refused with one line naming the
holder while the first finishes untouched; a lock left by a dead process is taken over, one of another host
and a corrupt one are refused."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from trime_dist.core.output_lock import LOCK_NAME

from cli_runner import REPO, run_trime, trime_command
from lock_helpers import in_use_line, wait_for_lock
from shard_fixtures import write_pattern_splits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock_data")
    write_pattern_splits(root)
    return root


def train_args(data, out, steps=4, *extra):
    return ["train", "--auto-resume", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
            f"data.train={data}/train", f"data.valid={data}/valid", f"run.out_dir={out}", f"run.max_steps={steps}",
            "model.max_seq_len=32", "run.save_every=2", *extra]


def steps_done(out):
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def refusal_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: output" in line]


def test_a_second_job_on_the_same_run_is_refused_while_the_first_finishes(data, tmp_path):
    out = tmp_path / "run"
    from trime_dist.core.launch_env import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(free_port()))
    first = subprocess.Popen(trime_command(train_args(data, out, 6), ranks=2), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    holder = wait_for_lock(first, out / LOCK_NAME)
    os.kill(holder["pid"], signal.SIGSTOP)  # rank 0 of job 1 pauses: it holds the lock for sure meanwhile
    try:
        second = run_trime(train_args(data, out, 6), ranks=2, check=False)
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode != 0
    lines = refusal_lines(second.stderr)
    assert len(lines) == 1, second.stderr[-3000:]
    assert lines[0] == in_use_line("train", out, holder, out / LOCK_NAME)
    assert holder["command"].startswith("trime train --auto-resume")
    # job 1 ran its course undisturbed, and let go of the lock
    assert steps_done(out) == [1, 2, 3, 4, 5, 6]
    assert json.load(open(out / "summary.json"))["steps"] == 6
    assert not os.path.exists(out / LOCK_NAME)


def write_lock(out, **fields):
    os.makedirs(out, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": 0, "started": "2026-01-01 10:00:00 UTC",
              "command": "trime train old", "token": "old", **fields}
    (out / LOCK_NAME).write_text(json.dumps(holder))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_of_a_dead_job_is_taken_over(data, tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid=pid)
    proc = run_trime(train_args(data, out, 2))
    assert f"taking over the lock of {out} left by a job that is gone" in proc.stderr
    assert f"pid {pid} is not running" in proc.stderr
    assert steps_done(out) == [1, 2] and not os.path.exists(out / LOCK_NAME)


def test_a_lock_of_another_host_or_a_corrupt_one_is_refused(data, tmp_path):
    out = tmp_path / "run"
    write_lock(out, host="node-elsewhere", pid=dead_pid())
    proc = run_trime(train_args(data, out, 2), check=False)
    assert proc.returncode == 2
    assert refusal_lines(proc.stderr) == [
        f"trime train: error: output {out} is in use by a job on another host (host node-elsewhere, pid "
        f"{json.load(open(out / LOCK_NAME))['pid']}, started 2026-01-01 10:00:00 UTC: trime train old); it cannot "
        f"be checked from here: if that job is dead, delete {out / LOCK_NAME} and rerun"]
    assert os.listdir(out) == [LOCK_NAME]  # nothing was written
    (out / LOCK_NAME).write_text("garbage")
    proc = run_trime(train_args(data, out, 2), check=False)
    assert proc.returncode == 2
    assert f"trime train: error: lock file {out / LOCK_NAME} is not a trime lock" in proc.stderr
    assert os.listdir(out) == [LOCK_NAME]
