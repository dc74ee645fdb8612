"""`trime launch`: stage -> runner table, local runs (mpiexec, DeepSpeed), multi-node DeepSpeed plans and a
real `localhost slots=2` hostfile run, hostfile errors, and SLURM script rendering (no SLURM needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launcher.hostfile import parse_hostfile_text, parse_hosts_arg, read_hostfile
from launcher.local import collect_env, deepspeed_multinode_plan, local_command
from launcher.slurm import dry_run_text, plan_jobs
from launcher.slurm_config import load_slurm_config, resources_for
from trime_dist.core.config import ConfigError
from trime_dist.core.stages import split_stage

from cli_runner import BIN, REPO, run_trime  # noqa: E402
from shard_fixtures import write_pattern_splits

TINY = os.path.join(REPO, "configs", "tiny.yaml")
EXAMPLE = os.path.join(REPO, "configs", "slurm_example.yaml")


def trime_launch(*args, cwd=REPO, check=True):
    return run_trime(["launch", *args], cwd=str(cwd), check=check)


# ----------------------------------------------------------------------------- hostfiles

def test_hostfile_parsing_and_errors_name_the_line(tmp_path):
    text = "# cluster\n\nnode001 slots=8\nnode002   slots=8  # second\n"
    assert parse_hostfile_text(text) == {"node001": 8, "node002": 8}
    bad = tmp_path / "hostfile"
    bad.write_text("node001 slots=8\n# ok\nnode002 slot=8\n")
    with pytest.raises(ValueError, match=r"hostfile:3: malformed line 'node002 slot=8'"):
        read_hostfile(str(bad))
    with pytest.raises(ValueError, match=r":2: host node001 is listed again \(first on line 1\)"):
        parse_hostfile_text("node001 slots=8\nnode001 slots=4\n")
    with pytest.raises(ValueError, match=r":1: node001 has slots=0"):
        parse_hostfile_text("node001 slots=0\n")
    with pytest.raises(ValueError, match="no hosts"):
        parse_hostfile_text("# empty\n")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_hostfile(str(tmp_path / "nope"))
    assert parse_hosts_arg("node1:8, node2:4") == {"node1": 8, "node2": 4}
    with pytest.raises(ValueError, match=r"--hosts item 2 'node2'"):
        parse_hosts_arg("node1:8,node2")


def test_malformed_hostfile_refused_by_the_cli(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\nlocalhost\n")
    proc = trime_launch("deepspeed", "--hostfile", str(hostfile), "--run-dir", str(tmp_path / "run"), "--",
                        "train", "--config", TINY, check=False)
    assert proc.returncode == 2
    assert f"{hostfile}:2: malformed line 'localhost'" in proc.stderr


def test_launch_modes_flags_and_help():
    proc = trime_launch("deepspeed", "--", "train", check=False)
    assert proc.returncode == 2 and "give one of --hosts HOST:SLOTS,... or --hostfile FILE" in proc.stderr
    proc = trime_launch("deepspeed", "--hosts", "a:1", "--hostfile", "h", "--", "train", check=False)
    assert proc.returncode == 2 and "give one of --hosts" in proc.stderr
    proc = trime_launch("deepspeed", "--hosts", "a:1", "--launcher", "ssh", "--", "train", check=False)
    assert proc.returncode == 2 and "invalid choice: 'ssh'" in proc.stderr
    text = " ".join(trime_launch("slurm-chain", "--help").stdout.split())
    assert "--step 'STAGE ARGS'" in text and "--set KEY=VALUE" in text
    assert "requeue (bool, default True): --requeue: a requeued training job resumes" in text  # SlurmConfig keys


# ----------------------------------------------------------------------------- command lines

def test_stage_table_picks_the_runner():
    ds = local_command(["--", "train", "--config", TINY], nproc=2, master_port=29511)
    assert os.path.basename(ds[0]) == "deepspeed" and ds[1:5] == ["--num_gpus", "2", "--master_port", "29511"]
    assert os.path.basename(ds[5]) == "trime" and ds[6:] == ["train", "--config", TINY]
    mpi = local_command(["prepare", "--input", "a", "--output", "b"], nproc=3)
    assert os.path.basename(mpi[0]) == "mpiexec" and mpi[1:3] == ["-n", "3"] and mpi[4:] == ["prepare", "--input",
                                                                                              "a", "--output", "b"]
    store = local_command(["datastore", "build", "--model", "m"], nproc=2, master_port=1)
    assert os.path.basename(store[0]) == "deepspeed" and store[-4:] == ["datastore", "build", "--model", "m"]
    single = local_command(["corpus", "--out", "c"], nproc=1)
    assert os.path.basename(single[0]) == "trime" and single[1:] == ["corpus", "--out", "c"]
    evaluate = local_command(["eval", "--data", "d"], nproc=2, master_port=1)   # eval runs on R ranks too
    assert os.path.basename(evaluate[0]) == "deepspeed" and evaluate[-3:] == ["eval", "--data", "d"]
    with pytest.raises(ValueError, match="runs as one process"):
        local_command(["report", "runs"], nproc=2)
    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        split_stage(["trian"])
    with pytest.raises(ValueError, match="no stage given"):
        split_stage(["--"])


def test_multinode_plan_hostfile_env_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    hosts = parse_hosts_arg("node1:8,node2:8")
    plan = deepspeed_multinode_plan(["train", "--config", TINY], hosts, str(tmp_path), master_port=29600,
                                    env_names=["NCCL_SOCKET_IFNAME", "NCCL_IB_HCA=mlx5_0,mlx5_1"])
    assert open(plan.hostfile).read() == "node1 slots=8\nnode2 slots=8\n"
    env_lines = open(plan.env_file).read().splitlines()
    assert env_lines == ["PYTHONPATH=/opt/extra", "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "1"),
                         *(["TOKENIZERS_PARALLELISM=" + os.environ["TOKENIZERS_PARALLELISM"]]
                           if os.environ.get("TOKENIZERS_PARALLELISM") else []),
                         "NCCL_SOCKET_IFNAME=ib0", "NCCL_IB_HCA=mlx5_0,mlx5_1", f"TRIME_LOG_DIR={tmp_path}/logs"]
    cmd = plan.command
    flag = {cmd[i]: cmd[i + 1] for i in range(1, cmd.index("--launcher") + 2, 2)}
    assert flag == {"--hostfile": plan.hostfile, "--master_addr": "node1", "--master_port": "29600",
                    "--launcher": "pdsh"}
    assert cmd[cmd.index("--num_nodes") + 1] == "2" and "--no_ssh_check" not in cmd
    assert plan.env["DS_ENV_FILE"] == plan.env_file
    filtered = deepspeed_multinode_plan(["train"], hosts, str(tmp_path), include="node1:0,1@node2",
                                        master_addr="10.0.0.1").command
    assert filtered[filtered.index("--include") + 1] == "node1:0,1@node2" and "--num_nodes" not in filtered
    assert filtered[filtered.index("--master_addr") + 1] == "10.0.0.1"
    # launched from the first host of several: its own name is local, but the others must reach it by that
    # name, not 127.0.0.1 (which the other nodes' ranks would dial on their own loopback)
    import socket

    here = socket.gethostname()
    from_first = deepspeed_multinode_plan(["train"], {here: 1, "node2": 1}, str(tmp_path)).command
    assert from_first[from_first.index("--master_addr") + 1] == here
    alone = deepspeed_multinode_plan(["train"], {here: 2}, str(tmp_path)).command
    assert alone[alone.index("--master_addr") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="cannot be combined"):
        deepspeed_multinode_plan(["train"], hosts, str(tmp_path), include="node1", exclude="node2")
    with pytest.raises(ValueError, match="does not run under DeepSpeed"):
        deepspeed_multinode_plan(["prepare"], hosts, str(tmp_path))
    with pytest.raises(ValueError, match="not a valid environment variable name"):
        collect_env(["BAD-NAME=1"])
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE: not set"):
        collect_env(["NOT_SET_ANYWHERE"])


# ----------------------------------------------------------------------------- real runs on this machine

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_data")
    write_pattern_splits(root)
    return root


def train_args(data, out, steps=3):
    return ["train", "--config", TINY, f"data.train={data}/train", f"data.valid={data}/valid", f"run.out_dir={out}",
            f"run.max_steps={steps}", "model.max_seq_len=32"]


def test_local_mpi_stage_runs_two_ranks(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 23}" for j in range(400)) + "\n")
    out = tmp_path / "prepared"
    proc = trime_launch("local", "--nproc", "2", "--", "prepare", "--input", str(text), "--output", str(out),
                        "--seq-len", "16", "--vocab-size", "300")
    assert "mpiexec -n 2" in proc.stdout.splitlines()[0]  # the command is printed first
    manifest = json.load(open(out / "manifest.json"))
    assert sorted({s["path"].split("-")[1] for s in manifest["shards"]}) == ["r000", "r001"]


@pytest.mark.slow
def test_local_training_two_ranks(shards, tmp_path):
    out = tmp_path / "run"
    proc = trime_launch("local", "--nproc", "2", "--", *train_args(shards, out))
    assert proc.stdout.startswith("$ ") and "deepspeed --num_gpus 2" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 3


@pytest.mark.slow
def test_hostfile_localhost_through_the_real_deepspeed_launcher(shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine\nlocalhost slots=2\n")
    out = tmp_path / "run"
    proc = trime_launch("deepspeed", "--hostfile", str(hostfile), "--run-dir", str(tmp_path / "launch"),
                        "--master-port", str(_free_port()), "--env", "TRIME_LAUNCH_TEST=1", "--",
                        *train_args(shards, out))
    cmd_line = next(line for line in proc.stdout.splitlines() if line.startswith("$ "))
    assert f"--hostfile {tmp_path}/launch/hostfile" in cmd_line and "--num_nodes 1" in cmd_line
    assert "TRIME_LAUNCH_TEST=1" in open(tmp_path / "launch" / ".deepspeed_env").read().splitlines()
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 3


def _free_port() -> int:
    from trime_dist.core.launch_env import free_port

    return free_port()


# ----------------------------------------------------------------------------- SLURM scripts (rendering only)

def test_slurm_scripts_for_a_two_node_gpu_cluster(tmp_path):
    cfg = load_slurm_config(EXAMPLE, [f"run_dir={tmp_path}/slurm", "account=proj42"])
    steps = [s.split() for s in cfg.chain]
    jobs = plan_jobs(steps, cfg, REPO, numbered=True)  # the chain's paths are relative to the repository
    assert [j.stage for j in jobs] == ["prepare", "prepare", "prepare", "group", "train", "datastore", "eval"]
    by_stage = {j.stage: j.script for j in jobs}
    train = by_stage["train"]
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj42", "#SBATCH --requeue", "source .venv/bin/activate",
                 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 f"cd {REPO}"):
        assert line in train.splitlines(), line
    # a requeued job reruns the script: `trime train --auto-resume` continues from the run's latest checkpoint
    assert (f"srun --kill-on-bad-exit=1 --cpus-per-task=6 {BIN}/trime train --auto-resume --config "
            "configs/wt103_247m.yaml objective.name=trime_ext") in train
    assert "--gpus-per-node" not in by_stage["group"] and "#SBATCH --ntasks-per-node=16" in by_stage["group"]
    # MPI stages: hydra's mpiexec in the job, one proxy per node started by srun with all of the node's CPUs
    group = by_stage["group"].splitlines()
    assert "export SRUN_CPUS_PER_TASK=32" in group  # 16 tasks x 2 CPUs
    assert any(line.startswith(f'{BIN}/mpiexec -launcher slurm -n "$SLURM_NTASKS" -ppn 16 {BIN}/trime group ')
               for line in group), by_stage["group"]
    # mpi=pmi2 (or pmix) is still there for a cluster that wants srun's PMI
    pmi2 = plan_jobs([["group", "--input", "a", "--output", "b"]], load_slurm_config(
        EXAMPLE, [f"run_dir={tmp_path}/slurm", "mpi=pmi2"]), REPO, numbered=True)[0].script
    assert "srun --mpi=pmi2 --kill-on-bad-exit=1 --cpus-per-task=2 " in pmi2 and "mpiexec" not in pmi2
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=6 " in train
    # eval: one task per GPU of one node (the streams dealt to the 8 ranks)
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert line in by_stage["eval"].splitlines(), line
    assert f"srun --kill-on-bad-exit=1 --cpus-per-task=6 {BIN}/trime eval " in by_stage["eval"]
    assert "--requeue" not in by_stage["datastore"]
    # SIGUSR1 to every rank 120 s before the time limit; exit status 3 (stopped, checkpoint saved) -> requeue
    assert "#SBATCH --signal=USR1@120" in train.splitlines() and "--signal" not in by_stage["datastore"]
    assert 'if [ "$status" -eq 3 ] || [ -f "$TRIME_STOPPED_MARKER" ]; then' in train and '  scontrol requeue "$SLURM_JOB_ID"' in train.splitlines()
    assert train.rstrip().endswith('exit "$status"') and "|| status=$?" in train
    assert "scontrol requeue" not in by_stage["datastore"]
    assert all(j.script_path.startswith(f"{tmp_path}/slurm/0") for j in jobs)
    for job in jobs:  # every script is valid bash
        path = tmp_path / os.path.basename(job.script_path)
        path.write_text(job.script)
        subprocess.run(["bash", "-n", str(path)], check=True)
    text = dry_run_text(jobs, chained=True)
    assert "--dependency=afterok:<job id of group>" in text and text.count("# ===== ") == 7


def test_slurm_cli_dry_run_writes_nothing(tmp_path):
    proc = trime_launch("slurm", "--dry-run", "--set", "tasks_per_node=2", "--set", "run_dir=out", "--",
                        "prepare", "--input", "a", "--output", "b", cwd=tmp_path)
    assert '/mpiexec -launcher slurm -n "$SLURM_NTASKS" -ppn 2 ' in proc.stdout
    assert "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert not os.path.exists(tmp_path / "out")
    proc = trime_launch("slurm", "--write-only", "--set", "run_dir=out", "--", "train", "--config", TINY,
                        "run.out_dir=r", cwd=tmp_path)
    script = (tmp_path / "out" / "train.sbatch").read_text()
    assert f"train --auto-resume --config {TINY} run.out_dir=r" in script and os.path.isdir(tmp_path / "out" / "logs")
    assert f"export TRIME_LOG_DIR={tmp_path}/out/logs\n" in script  # every rank's own log file, named by host
    proc = trime_launch("slurm", "--dry-run", "--", "train", "--resume", "--config", TINY, cwd=tmp_path)
    assert f"train --resume --config {TINY}" in proc.stdout and "--auto-resume" not in proc.stdout


def test_slurm_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="partiton"):
        load_slurm_config(None, ["partiton=gpu"])
    with pytest.raises(ConfigError, match="stages.trian: unknown stage"):
        load_slurm_config(None, ["stages.trian.nodes=2"])
    with pytest.raises(ConfigError, match="time='2 hours'"):
        load_slurm_config(None, ["time=2 hours"])
    cfg = load_slurm_config(None, ["gpus_per_node=4", "stages.train.tasks_per_node=2"])
    with pytest.raises(ConfigError, match="one task per GPU"):
        resources_for(cfg, "train")
    assert resources_for(cfg, "prepare").tasks_per_node == 1 and resources_for(cfg, "datastore").tasks_per_node == 4
    proc = trime_launch("slurm", "--dry-run", "--", "train", "--config", TINY, "model.n_layerz=2", check=False)
    assert proc.returncode == 2 and "model.n_layerz" in proc.stderr  # the train config is checked at render time
    assert "(on the command line)" in proc.stderr


# ----------------------------------------------------------------------------- one rank discovery for every launcher

RANK_PROBE = """\
import json, os, torch
from trime_dist.core.distributed import all_reduce_sum, init_distributed
env = init_distributed()
total = all_reduce_sum(torch.tensor([env.rank + 1.0]))  # a real collective over the discovered world
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{env.rank}.json"), "w") as f:
    json.dump({"rank": env.rank, "world": env.world_size, "local": env.local_rank, "launcher": env.launcher,
               "sum": float(total)}, f)
torch.distributed.destroy_process_group()  # without it a gloo rank may abort at exit under torchrun
"""


def probe_results(probe_dir) -> list[dict]:
    return [json.load(open(os.path.join(probe_dir, name))) for name in sorted(os.listdir(probe_dir))]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpiexec"])
def test_rank_discovery_under_each_launcher(launcher, tmp_path):
    """trime_dist.core.launch_env.discover_env() gives the same 2-rank world under each launcher (srun: test_slurm)."""
    script = tmp_path / "probe.py"
    script.write_text(RANK_PROBE)
    port = str(_free_port())
    bin_dir = os.path.dirname(sys.executable)
    cmd = {"deepspeed": [f"{bin_dir}/deepspeed", "--num_gpus", "2", "--master_port", port, str(script)],
           "torchrun": [f"{bin_dir}/torchrun", "--nproc_per_node", "2", "--master_port", port, str(script)],
           "mpiexec": [f"{bin_dir}/mpiexec", "-n", "2", sys.executable, str(script)]}[launcher]
    (tmp_path / "out").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=port, PYTHONPATH=REPO, PROBE_DIR=str(tmp_path / "out"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = probe_results(tmp_path / "out")
    expected = {"deepspeed": "deepspeed/torchrun", "torchrun": "deepspeed/torchrun", "mpiexec": "mpi"}[launcher]
    assert rows == [{"rank": r, "world": 2, "local": r, "launcher": expected, "sum": 3.0} for r in (0, 1)]


def test_mpiexec_ranks_ignore_a_world_inherited_from_an_enclosing_job(tmp_path):
    """RANK/WORLD_SIZE and SLURM_PROCID/SLURM_NTASKS left by a parent job (a shell or test runner that was a
    rank, mpiexec inside sbatch) do not make every mpiexec rank "rank 0 of 1" (it made a 2-rank datastore
    build's ranks delete each other's temporary files)."""
    script = tmp_path / "probe.py"
    script.write_text(RANK_PROBE)
    (tmp_path / "out").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()), PYTHONPATH=REPO,
               PROBE_DIR=str(tmp_path / "out"), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", SLURM_PROCID="0",
               SLURM_NTASKS="4")
    cmd = [f"{os.path.dirname(sys.executable)}/mpiexec", "-n", "2", sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert probe_results(tmp_path / "out") == [{"rank": r, "world": 2, "local": r, "launcher": "mpi", "sum": 3.0}
                                               for r in (0, 1)]
    assert "ignoring deepspeed/torchrun rank 0 of 1 inherited from an enclosing job" in proc.stderr


@pytest.mark.parametrize("status,marker,requeued", [(3, False, True), (0, False, False), (1, False, False),
                                                    (143, True, True), (1, "stale", False)])
def test_requeue_on_signal_runs_scontrol_only_for_a_stopped_training(tmp_path, status, marker, requeued):
    """Status 3, or rank 0's marker with another status (srun --kill-on-bad-exit ended rank 1 while it
    left: 143), requeue; a marker left by an earlier run is removed before training starts."""
    from launcher.slurm import requeue_on_signal

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    (fake_bin / "scontrol").chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    if marker == "stale":
        (logs / ".stopped-by-signal-42").write_text("{}")
    write = 'echo {} > "$TRIME_STOPPED_MARKER"; ' if marker is True else ""
    script = tmp_path / "job.sh"
    script.write_text("\n".join(["set -euo pipefail", *requeue_on_signal(f"sh -c '{write}exit {status}'", str(logs))])
                      + "\n")
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="42")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == status
    assert os.path.isfile(tmp_path / "scontrol.args") == requeued
    assert not (logs / ".stopped-by-signal-42").exists()
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]
        assert "requeueing job 42" in proc.stdout
