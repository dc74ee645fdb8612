"""Every stage that writes an output refuses a locked one at once, with one line, writing nothing: train,
prepare, group, datastore build, eval --out, export --out (a lock of another host, which is never taken over)."""
from __future__ import annotations

import json
import os

import pytest

from trime_dist.core.output_lock import lock_path

from cli_runner import run_trime

HOLDER = {"host": "node-elsewhere", "pid": 4242, "started": "2026-01-01 10:00:00 UTC", "command": "trime x",
          "token": "t"}


def stage_args(stage: str, tmp_path) -> tuple[list, str, bool]:
    """(the command line, its output, whether the lock is inside it): the inputs need not exist, the lock
    is checked before them."""
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing")
    return {
        "train": (["train", f"run.out_dir={out}", f"data.train={missing}"], out, True),
        "prepare": (["prepare", "--input", missing, "--output", out], out, True),
        "group": (["group", "--input", missing, "--output", out], out, True),
        "datastore": (["datastore", "build", "--model", missing, "--data", missing, "--out", out], out, True),
        "eval": (["eval", "--model", missing, "--data", missing, "--out", out + ".json"], out + ".json", False),
        "export": (["export", missing, "--format", "safetensors", "--out", out], out, False),
    }[stage]


@pytest.mark.parametrize("stage", ["train", "prepare", "group", "datastore", "eval", "export"])
def test_a_locked_output_is_refused_with_one_line(stage, tmp_path):
    args, out, inside = stage_args(stage, tmp_path)
    path = lock_path(out, inside)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(HOLDER, f)
    before = sorted(os.listdir(tmp_path))
    proc = run_trime(args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"trime {stage}: error: output {out} is in use by a job on another host (host node-elsewhere, pid 4242, "
        f"started 2026-01-01 10:00:00 UTC: trime x); it cannot be checked from here: if that job is dead, "
        f"delete {path} and rerun")
    assert sorted(os.listdir(tmp_path)) == before and json.load(open(path)) == HOLDER  # nothing touched
