"""core/progress.py: rank 0 only; in a log file a line every N seconds (a fake clock, no sleeps) and a final
line; a tqdm bar on a terminal; the job estimate from rank 0's share; TRIME_PROGRESS_EVERY_S checked."""
from __future__ import annotations

import io
import re

import pytest

from trime_dist.core.progress import EVERY_ENV, Progress, every_s_from_env, show_progress, track


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines_bar(total, every_s=30.0, **kwargs):
    clock, out = Clock(), []
    bar = show_progress(total, "prepare", "block", rank=0, tty=False, every_s=every_s, clock=clock,
                        write=out.append, **kwargs)
    return bar, clock, out


def test_log_file_mode_prints_a_line_every_n_seconds_and_a_final_line():
    bar, clock, out = lines_bar(100)
    for _ in range(10):          # 10 items in 20 s: under 30 s, no line yet
        clock.now += 2
        bar.update(1)
    assert out == []
    clock.now += 10              # 30 s since the start: the first line, 11 of 100 at 11 / 30 s per s
    bar.update(1)
    assert out == ["prepare: 11/100 block (11%), 0.367 block/s, ETA 04:03"]
    clock.now += 29
    bar.update(1)                # 29 s after the last line: nothing
    assert len(out) == 1
    clock.now += 1
    bar.set_postfix(loss="3.210")
    bar.update(8)                # 30 s after it: the second line, with the postfix
    assert out[1] == "prepare: 20/100 block (20%), 0.333 block/s, ETA 04:00, loss 3.210"
    clock.now += 5
    bar.close()
    bar.close()                  # once only
    assert out[2] == "prepare: 20/100 block (20%), 0.308 block/s, elapsed 01:05, loss 3.210"
    assert len(out) == 3 and not any("\r" in line for line in out)


def test_every_0_prints_each_update_and_unknown_total_has_no_eta():
    bar, clock, out = lines_bar(None, every_s=0)
    for _ in range(3):
        clock.now += 1
        bar.update(2)
    assert out == [f"prepare: {n} block, 2 block/s" for n in (2, 4, 6)]


def test_rank_0_share_scaled_to_the_job_and_bytes_in_si_units():
    # rank 0 holds 1/4 of the job's bytes: 1 MB of its 2 MB done reads as 4 MB of the job's 8 MB
    clock, out = Clock(), []
    bar = show_progress(2_000_000, "prepare", "B", rank=0, unit_scale=True, scale=4.0, tty=False, every_s=30,
                        clock=clock, write=out.append)
    clock.now += 40
    bar.update(1_000_000)
    assert out == ["prepare (job, est. from rank 0): 4.00MB/8.00MB (50%), 100kB/s, ETA 00:40"]


def test_other_ranks_show_nothing(capsys, caplog):
    for rank in (1, 3):
        bar = show_progress(10, "train", "step", rank=rank, tty=False, every_s=0, write=pytest.fail)
        assert type(bar) is Progress
        for _ in range(10):
            bar.update(1)
        bar.set_postfix(loss=1)
        bar.close()
        assert list(track(range(3), "eval", rank=rank, tty=True)) == [0, 1, 2]
    assert capsys.readouterr() == ("", "") and caplog.records == []


def test_default_writes_log_lines_not_tqdm(caplog):
    caplog.set_level("INFO", logger="trime_dist.core.progress")
    assert list(track(range(4), "eval", "batch", rank=0, tty=False, every_s=1e9)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records if r.name == "trime_dist.core.progress"]
    assert len(lines) == 1 and re.fullmatch(r"eval: 4/4 batch \(100%\), \S+ batch/s, elapsed 00:00", lines[0])


def test_terminal_mode_is_a_tqdm_bar_showing_the_scaled_counts(monkeypatch):
    import tqdm

    stream = io.StringIO()
    real = tqdm.tqdm
    monkeypatch.setattr(tqdm, "tqdm", lambda *a, **k: real(*a, file=stream, mininterval=0, **k))
    with show_progress(10, "group", "block", rank=0, tty=True, scale=2.0) as bar:
        for _ in range(3):
            bar.update(1)
        assert (bar.bar.n, bar.bar.total) == (6, 20)
    assert "group (job, est. from rank 0)" in stream.getvalue() and "\r" in stream.getvalue()


def test_every_s_from_env(monkeypatch):
    monkeypatch.delenv(EVERY_ENV, raising=False)
    assert every_s_from_env() == 30.0
    monkeypatch.setenv(EVERY_ENV, "2.5")
    assert every_s_from_env() == 2.5
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(EVERY_ENV, bad)
        with pytest.raises(ValueError, match=f"{EVERY_ENV}='{bad}'"):
            every_s_from_env()


def test_an_error_ends_the_lines_without_a_final_line():
    bar, clock, out = lines_bar(10, every_s=0)
    with pytest.raises(RuntimeError):
        with bar:
            clock.now += 2
            bar.update(1)
            raise RuntimeError("stage failed")
    bar.close()
    assert out == ["prepare: 1/10 block (10%), 0.5 block/s, ETA 00:18"]
