"""No silent hangs: when one of two DeepSpeed ranks is killed (or hangs) mid-training, the other one ends
within a bound with one error line naming the lost rank, and the launcher exits non-zero."""
import os
import signal
import socket
import subprocess
import time

import psutil
import pytest
from cli_runner import REPO, trime_command
from shard_fixtures import write_pattern_splits

from trime_dist.core.constants import EXIT_RANK_LOST


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lost_rank_data")
    write_pattern_splits(root, valid=False)
    return root


def run_and_hit_rank(data, out, victim: int, sig, *extra, ranks: int = 2) -> tuple[subprocess.CompletedProcess, float]:
    """Start `trime train` on `ranks` ranks, send `sig` to rank `victim` after 3 steps; (result, seconds until
    the launcher exited after the signal)."""
    args = ["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={data}/train",
            "data.valid=", f"run.out_dir={out}", "run.max_steps=100000", "model.max_seq_len=32",
            "run.save_every=100000", *extra]
    proc = subprocess.Popen(trime_command(args, ranks), cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and proc.poll() is None:
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if f"--local_rank={victim}" in p.cmdline()]
    assert len(ranks) == 1, proc.stderr.read() if proc.poll() is not None else "rank not found"
    hit = time.monotonic()
    os.kill(ranks[0].pid, sig)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        for p in ranks:  # a stopped rank the launcher could not end
            if p.is_running():
                p.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - hit


def error_lines(stderr: str) -> list[str]:
    """The error lines (rank 0's progress bar, redrawn with \\r, may precede one on its line)."""
    marker = "trime train: error:"
    return [line[line.index(marker):] for line in stderr.splitlines() if marker in line]


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_is_named_by_the_survivor(data, tmp_path, victim):
    result, seconds = run_and_hit_rank(data, tmp_path / "run", victim, signal.SIGKILL)
    survivor = 1 - victim
    assert result.returncode != 0
    assert seconds < 60, result.stderr[-3000:]  # gloo sees the closed connection, 5 s check-in, launcher poll
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    host = socket.gethostname()  # every rank ran here (rank 0's host: the store's, 127.0.0.1 named by this host)
    assert lines[0].startswith(f"trime train: error: rank {survivor} on {host}: rank {victim} ({host}) of 2 died "
                               f"or stopped answering")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_hung_rank_is_named_after_the_timeout(data, tmp_path):
    """SIGSTOP: rank 1 keeps its connections open, so only run.dist_timeout_s ends rank 0's wait: the default
    group's timeout, or the progress watchdog (ZeRO's own process group has torch's 30-minute timeout)."""
    result, seconds = run_and_hit_rank(data, tmp_path / "run", 1, signal.SIGSTOP, "run.dist_timeout_s=5")
    assert result.returncode == EXIT_RANK_LOST, result.stderr[-3000:]  # rank 0's status, passed on by the launcher
    # 5 s timeout + 5 s check-in, then the launcher's SIGTERM, 30 s wait and SIGKILL of the stopped rank
    assert seconds < 90, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    # from the gloo timeout of the default group, or the watchdog when waiting in ZeRO's group
    assert lines[0].startswith(f"trime train: error: rank 0 on {socket.gethostname()}: ")
    assert f"rank 1 ({socket.gethostname()}) of 2 died or stopped answering" in lines[0]
    assert "Timed out waiting 5000ms" in lines[0] or "no progress for " in lines[0]


@pytest.mark.slow
def test_three_ranks_name_only_the_killed_one(data, tmp_path):
    """With 3 ranks a survivor can stay blocked in a collective (waiting on the other survivor) and hear of
    the failure only when that one exits: it must not then name the survivor that left. Every line names
    rank 1 alone: the first verdict is shared through the store, and heartbeats end blocked ranks with it."""
    result, seconds = run_and_hit_rank(data, tmp_path / "run", 1, signal.SIGKILL, "data.global_batch_size=24",
                                       ranks=3)
    assert result.returncode != 0
    assert seconds < 60, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert 1 <= len(lines) <= 2, result.stderr[-3000:]
    for line in lines:
        assert f"rank 1 ({socket.gethostname()}) of 3 died or stopped answering" in line, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
