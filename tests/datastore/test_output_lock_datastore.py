"""`trime datastore build` on 2 MPI ranks holds --out for the job: a second build on it (2 ranks) is refused
with one line, both of its ranks at once, while the first completes the store."""
from __future__ import annotations

import json
import os
import signal
import subprocess

from trime_dist.core.launch_env import free_port
from trime_dist.core.output_lock import LOCK_NAME
from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model
from trime_dist.model.transformer import build_model

from cli_runner import REPO, run_trime, trime_command
from lock_helpers import in_use_line, wait_for_lock
from shard_fixtures import write_segment_dir


def build_args(root, out):
    return ["datastore", "build", "--model", root / "run", "--data", root / "train", "--out", out,
            "--factory", "Flat", "--part-segments", "12", "--batch-size", "5", "--threads", "1"]


def test_a_second_build_on_the_same_store_is_refused_while_the_first_finishes(tmp_path):
    root = tmp_path
    write_segment_dir(str(root / "train"), [130] * 3, seq_len=16, vocab_size=40, per_shard=7)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(root / "run"),
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 16})
    out = root / "ds"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))
    first = subprocess.Popen(trime_command(build_args(root, out), 2, launcher="mpi"), cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    holder = wait_for_lock(first, out / LOCK_NAME)
    os.kill(holder["pid"], signal.SIGSTOP)  # rank 0 of job 1 pauses while holding the lock
    try:
        second = run_trime(build_args(root, out), 2, launcher="mpi", check=False, timeout=120)
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if "error:" in line]
    assert lines == [in_use_line("datastore", out, holder, out / LOCK_NAME)], second.stderr[-3000:]
    meta = json.load(open(out / "datastore.json"))  # written last: the store is complete
    assert meta["count"] > 0 and os.path.isfile(out / "index.faiss")
    assert not os.path.exists(out / LOCK_NAME)
