"""core/rank_logs.py: the per-rank log file's name carries host, rank (and SLURM job); nothing without
TRIME_LOG_DIR; an unwritable folder is one error naming it. (Two real ranks: tests/data_pipeline/test_prepare.py.)"""
from __future__ import annotations

import logging

import pytest

from trime_dist.core.rank_logs import LOG_DIR_ENV, add_rank_log_file, rank_log_name, short_host


def test_names_carry_host_rank_and_job():
    assert rank_log_name("train", "nodeA", 0) == "train-nodeA-rank0.log"
    assert rank_log_name("prepare", "nodeB", 3, "1234") == "prepare-1234-nodeB-rank3.log"
    assert "." not in short_host()


def test_lines_go_to_the_ranks_file_only_when_the_folder_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(LOG_DIR_ENV, raising=False)
    assert add_rank_log_file("eval", rank=1) is None
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    handler = add_rank_log_file("eval", rank=1)
    try:
        logging.getLogger("trime_dist.test").warning("seen on rank 1")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "logs" / f"eval-77-{short_host()}-rank1.log").read_text()
    assert text.endswith("WARNING trime_dist.test: seen on rank 1\n")


def test_unwritable_folder_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "file" / "logs"))
    with pytest.raises(ValueError, match=f"{LOG_DIR_ENV}=.*file/logs: cannot write the rank's log file"):
        add_rank_log_file("train", rank=0)
