"""The one stage table: runners, the launchable stages, `trime launch` argv splitting, console scripts."""
import os
import sys

import pytest

from trime_dist.core.stages import (
    MPI,
    SINGLE,
    STAGES,
    TORCH,
    env_bin,
    launchable,
    runner_for,
    split_stage,
)


def test_every_stage_has_a_module_and_help():
    import importlib.util

    for name, stage in STAGES.items():
        assert importlib.util.find_spec(stage.module) is not None, name
        assert stage.help and stage.runner in (TORCH, MPI, SINGLE, None)
    assert "launch" not in launchable() and launchable()[:3] == ["corpus", "prepare", "group"]


def test_runner_and_split_stage():
    assert (runner_for("train"), runner_for("prepare"), runner_for("eval"), runner_for("report")) == \
        (TORCH, MPI, TORCH, SINGLE)
    assert split_stage(["--", "trime", "train", "--config", "c.yaml"]) == ("train", ["--config", "c.yaml"])
    with pytest.raises(ValueError, match="unknown stage 'trian'; expected one of: corpus"):
        split_stage(["trian"])
    with pytest.raises(ValueError, match="unknown stage 'launch'"):  # launch does not launch itself
        runner_for("launch")
    with pytest.raises(ValueError, match="no stage given"):
        split_stage(["--"])


def test_env_bin_prefers_this_environment():
    assert env_bin("trime") == os.path.join(os.path.dirname(sys.executable), "trime")
    assert env_bin("no-such-tool-here") == "no-such-tool-here"
