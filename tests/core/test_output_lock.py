"""core.output_lock: one job per output. Taken and released, refused while held (naming the holder), taken
over from a dead or reused pid and from a killed -9 process, never from another host; a corrupt lock file."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from trime_dist.core import output_lock as ol

from cli_runner import REPO


def write_lock(output, **fields):
    """A lock file as another job would have left it."""
    os.makedirs(output, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start_ticks": ol._proc_start_ticks(os.getpid()),
              "boot_id": ol._boot_id(), "started": "2026-01-01 10:00:00 UTC", "command": "trime train x",
              "token": "other", **fields}
    path = ol.lock_path(str(output))
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: nothing runs under it (pids are not reused this soon)


def test_lock_is_taken_released_and_its_folder_left_clean(tmp_path):
    out = tmp_path / "run"
    with ol.output_lock(str(out)):
        holder = json.load(open(out / ol.LOCK_NAME))
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert set(holder) >= {"started", "command", "pid_start_ticks"}
        (out / "result.txt").write_text("x")
    assert os.listdir(out) == ["result.txt"]  # no lock and no temporary file left
    with ol.output_lock(str(tmp_path / "empty")):
        pass
    assert not os.path.exists(tmp_path / "empty")  # a job that wrote nothing leaves no folder


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with ol.output_lock(str(tmp_path)):
            raise RuntimeError("boom")
    assert not os.path.exists(ol.lock_path(str(tmp_path)))
    with ol.output_lock(str(tmp_path)):  # a rerun takes it again
        pass


def test_a_live_holder_is_refused_with_one_line_naming_it(tmp_path):
    path = write_lock(tmp_path)
    with pytest.raises(ol.OutputLocked) as e:
        ol.acquire(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"output {tmp_path} is in use by another job (host {socket.gethostname()}, pid {os.getpid()}, "
                   f"started 2026-01-01 10:00:00 UTC: trime train x); lock file {path}")
    assert json.load(open(path))["token"] == "other"  # untouched


def test_a_dead_pid_is_taken_over_with_a_log_line(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with caplog.at_level("WARNING"):
        mine = ol.acquire(str(tmp_path))
    assert json.load(open(ol.lock_path(str(tmp_path))))["token"] == mine["token"]
    assert f"taking over the lock of {tmp_path}" in caplog.text and f"pid {pid} is not running" in caplog.text
    ol.release(str(tmp_path), mine)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process start times come from /proc")
def test_a_reused_pid_is_taken_over(tmp_path, caplog):
    write_lock(tmp_path, pid_start_ticks=ol._proc_start_ticks(os.getpid()) - 1)  # this pid, another start
    with caplog.at_level("WARNING"):
        mine = ol.acquire(str(tmp_path))
    assert "is now another process" in caplog.text
    ol.release(str(tmp_path), mine)


def test_another_host_is_never_taken_over(tmp_path):
    path = write_lock(tmp_path, host="node-elsewhere", pid=dead_pid())
    with pytest.raises(ol.OutputLocked) as e:
        ol.acquire(str(tmp_path))
    assert str(e.value) == (f"output {tmp_path} is in use by a job on another host (host node-elsewhere, pid "
                            f"{json.load(open(path))['pid']}, started 2026-01-01 10:00:00 UTC: trime train x); it "
                            f"cannot be checked from here: if that job is dead, delete {path} and rerun")
    assert os.path.isfile(path)


def test_an_earlier_run_of_this_slurm_job_is_taken_over_from_any_host(tmp_path, monkeypatch, caplog):
    """A requeued job may land on another node: the run SLURM ended before requeueing it is gone."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, host="node-elsewhere", slurm_job="77", slurm_restart=1)  # this very run: alive
    with pytest.raises(ol.OutputLocked, match="on another host"):
        ol.acquire(str(tmp_path))
    write_lock(tmp_path, host="node-elsewhere", slurm_job="76", slurm_restart=0)  # another job
    with pytest.raises(ol.OutputLocked, match="on another host"):
        ol.acquire(str(tmp_path))
    write_lock(tmp_path, host="node-elsewhere", slurm_job="77", slurm_restart=0)
    with caplog.at_level("WARNING"):
        mine = ol.acquire(str(tmp_path))
    assert "it was run 0 of SLURM job 77, now requeued as run 1" in caplog.text
    assert mine["slurm_job"] == "77" and mine["slurm_restart"] == 1


def test_a_corrupt_lock_file_is_named(tmp_path):
    path = ol.lock_path(str(tmp_path))
    open(path, "w").write("not json{")
    with pytest.raises(ValueError, match=f"lock file {path} is not a trime lock .*delete it and rerun"):
        ol.acquire(str(tmp_path))
    assert open(path).read() == "not json{"


def test_a_file_output_is_locked_beside_it(tmp_path):
    out = tmp_path / "rows.json"
    with ol.output_lock(str(out), inside=False):
        assert os.path.isfile(tmp_path / ".rows.json.trime-lock")
        with pytest.raises(ol.OutputLocked, match=f"output {out} is in use"):
            ol.acquire(str(out), inside=False)
    assert os.listdir(tmp_path) == []


def test_only_rank_0_takes_the_lock_the_others_check_it(tmp_path):
    from trime_dist.core.launch_env import discover_env, job_key

    with ol.output_lock(str(tmp_path), rank=1):
        assert not os.path.exists(ol.lock_path(str(tmp_path)))
    write_lock(tmp_path, job=job_key(discover_env()))
    with ol.output_lock(str(tmp_path), rank=1):  # another rank of the holding job: not refused
        pass
    write_lock(tmp_path, job="another job")
    with pytest.raises(ol.OutputLocked, match="is in use by another job") as e:
        with ol.output_lock(str(tmp_path), rank=1):
            pass
    assert e.value.all_ranks  # every rank of the job has it: only rank 0 prints it (trime_dist.cli)
    write_lock(tmp_path, job="another job", pid=dead_pid())
    with ol.output_lock(str(tmp_path), rank=1):  # a dead job's: rank 0 takes it over
        pass


def test_another_hosts_lock_waits_for_rank_0_to_take_it_over(tmp_path, monkeypatch):
    """Rank 1 on nodeB cannot judge a lock left on nodeA (a killed job's): it waits for rank 0 of its own job,
    which may be on nodeA and take it over, and refuses only when the lock stays another job's."""
    import threading

    from trime_dist.core.launch_env import discover_env, job_key

    write_lock(tmp_path, host="node-elsewhere", job="a killed job", pid=dead_pid())
    ours = threading.Timer(0.5, lambda: write_lock(tmp_path, job=job_key(discover_env())))  # rank 0's takeover
    ours.start()
    try:
        with ol.output_lock(str(tmp_path), rank=1):
            pass
    finally:
        ours.join()
    monkeypatch.setattr(ol, "OTHER_HOST_WAIT_S", 0.5)
    write_lock(tmp_path, host="node-elsewhere", job="a killed job", pid=dead_pid())
    with pytest.raises(ol.OutputLocked, match="is in use by a job on another host") as e:
        with ol.output_lock(str(tmp_path), rank=1):
            pass
    assert e.value.all_ranks


def test_a_lock_taken_over_meanwhile_is_not_removed(tmp_path, caplog):
    mine = ol.acquire(str(tmp_path))
    os.remove(ol.lock_path(str(tmp_path)))
    path = write_lock(tmp_path)  # another job judged us gone
    with caplog.at_level("WARNING"):
        ol.release(str(tmp_path), mine)
    assert json.load(open(path))["token"] == "other" and "no longer ours" in caplog.text


HOLD = """
import sys, time
from trime_dist.core.output_lock import acquire
acquire(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_job_leaves_a_lock_that_is_taken_over(tmp_path, caplog):
    """kill -9: no exit handler runs, the lock file stays; the next job takes it over."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(ol.OutputLocked, match=f"pid {proc.pid}"):
        ol.acquire(str(tmp_path))
    proc.kill()
    proc.wait()
    assert json.load(open(ol.lock_path(str(tmp_path))))["pid"] == proc.pid
    with caplog.at_level("WARNING"):
        mine = ol.acquire(str(tmp_path))
    assert f"pid {proc.pid} is not running" in caplog.text
    ol.release(str(tmp_path), mine)


def test_racing_takeovers_leave_one_holder(tmp_path):
    """Of two jobs taking over the same stale lock, the second sees the first's lock as live."""
    write_lock(tmp_path, pid=dead_pid())
    first = ol.acquire(str(tmp_path))
    st = os.stat(ol.lock_path(str(tmp_path)))
    # the second job judged the old file stale, but the lock is now the first job's: it is put back
    ol._remove_if_same(ol.lock_path(str(tmp_path)), (st.st_dev, st.st_ino + 1), "second")
    assert json.load(open(ol.lock_path(str(tmp_path))))["token"] == first["token"]
    assert sorted(os.listdir(tmp_path)) == [ol.LOCK_NAME]
    with pytest.raises(ol.OutputLocked):
        ol.acquire(str(tmp_path))
