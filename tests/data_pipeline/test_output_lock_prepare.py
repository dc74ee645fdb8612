"""`trime prepare` on 2 MPI ranks holds --output for the job: a second job on it (2 ranks) is refused with
one line while the first finishes with a complete output; a dead job's lock is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from data_pipeline import corpus
from trime_dist.core import shards
from trime_dist.core.output_lock import LOCK_NAME

from cli_runner import REPO, run_trime, trime_command
from lock_helpers import in_use_line, wait_for_lock


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.write_corpus(corpus.CorpusConfig(out=str(out), seed=5, scale=0.04, train_files=4, doc_words=300))
    return out


def prepare_args(src, out):
    return ["prepare", "--input", src / "train", "--output", out, "--seq-len", "32", "--vocab-size", "400",
            "--shard-segments", "40"]


def check_complete(out):
    manifest = shards.read_manifest(str(out))
    for entry in manifest["shards"]:
        shards.verify_shard(entry, str(out))
    return manifest


def test_a_second_job_on_the_same_output_is_refused_while_the_first_finishes(small_corpus, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(trime_command(prepare_args(small_corpus, out), ranks=2, launcher="mpi"), cwd=REPO,
                             env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    holder = wait_for_lock(first, out / LOCK_NAME)
    os.kill(holder["pid"], signal.SIGSTOP)  # rank 0 of job 1 pauses: it holds the lock for sure meanwhile
    try:
        second = run_trime(prepare_args(small_corpus, out), ranks=2, launcher="mpi", check=False, timeout=120)
        listing = sorted(os.listdir(out))
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if "error:" in line]
    assert lines == [in_use_line("prepare", out, holder, out / LOCK_NAME)], second.stderr[-3000:]
    assert LOCK_NAME in listing
    assert check_complete(out)["world_size"] == 2 and not os.path.exists(out / LOCK_NAME)


def test_a_dead_jobs_lock_is_taken_over(small_corpus, tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then",
                                             "command": "trime prepare", "token": "old"}))
    proc = run_trime(prepare_args(small_corpus, out), launcher="mpi")
    assert f"taking over the lock of {out} left by a job that is gone" in proc.stderr
    assert check_complete(out)["segments"] > 0 and not os.path.exists(out / LOCK_NAME)
