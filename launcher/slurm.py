"""SLURM batch jobs: render a readable, re-runnable sbatch script per stage (submitting: launcher.slurm_submit).

MPI stages run under MPICH's `mpiexec` (hydra) inside the job, or `srun --mpi=PLUGIN`; torch stages run one
task per GPU (CPU rank when there are no GPUs) and take their rank from SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS (trime_dist.core.launch_env).
"""
from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from launcher.slurm_config import SlurmConfig, resources_for
from trime_dist.core.constants import EXIT_STOPPED_BY_SIGNAL, STOPPED_MARKER_ENV
from trime_dist.core.rank_logs import LOG_DIR_ENV
from trime_dist.core.stages import MPI, SINGLE, env_bin, runner_for, split_stage


@dataclass
class Job:
    stage: str
    script_path: str
    script: str
    job_id: Optional[str] = None


# ----------------------------------------------------------------------------- rendering

def sbatch_header(cfg: SlurmConfig, stage: str, log_dir: str) -> list[str]:
    res = resources_for(cfg, stage)
    kind = runner_for(stage)
    nodes, tasks, gpus = (res.nodes, res.tasks_per_node, res.gpus_per_node)
    if kind == SINGLE:  # one process: one node, one task, at most one GPU
        nodes, tasks, gpus = 1, 1, min(gpus, 1)
    opts = [f"--job-name={cfg.job_name}-{stage}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}",
            f"--cpus-per-task={res.cpus_per_task}"]
    if gpus > 0:
        opts.append(f"--gpus-per-node={gpus}")
    if res.mem:
        opts.append(f"--mem={res.mem}")
    opts.append(f"--time={res.time}")
    for name, value in (("partition", res.partition), ("account", cfg.account), ("qos", cfg.qos)):
        if value:
            opts.append(f"--{name}={value}")
    opts += [f"--output={log_dir}/%x-%j.out", f"--error={log_dir}/%x-%j.err"]
    if stage == "train" and cfg.requeue:
        # A requeued job reruns this script: the log is appended to and training resumes (see below).
        # --signal without "B:" goes to the job steps, i.e. to every rank under srun (each stops after the
        # same step and saves); "B:" would signal only this batch shell, which would have to trap and forward it.
        opts += ["--requeue", "--open-mode=append", f"--signal=USR1@{cfg.signal_before_limit_s}"]
    opts += list(cfg.sbatch_options)
    return [f"#SBATCH {o}" for o in opts]


def script_body(cfg: SlurmConfig, stage: str, stage_args: list[str], workdir: str, log_dir: str) -> list[str]:
    kind = runner_for(stage)
    trime = [env_bin("trime"), stage]
    lines = ["set -euo pipefail", f"cd {shlex.quote(workdir)}"]
    if cfg.setup:  # module / activate scripts often read unset variables: nounset is off while they run
        lines += ["set +u", *cfg.setup, "set -u"]
    env = dict(cfg.env)
    env.setdefault("OMP_NUM_THREADS", str(resources_for(cfg, stage).cpus_per_task))
    env.setdefault(LOG_DIR_ENV, os.path.abspath(log_dir))  # every rank's own log: STAGE-JOB-HOST-rankR.log
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    lines.append('echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS:-1} task(s), '
                 'restart ${SLURM_RESTART_COUNT:-0}, $(date -u +%FT%TZ)"')
    if kind == SINGLE:
        return lines + [shlex.join(trime + stage_args)]
    # srun of SLURM 22.05-23.02 does not inherit --cpus-per-task from sbatch: pass it again.
    srun_opts = ["--kill-on-bad-exit=1", f"--cpus-per-task={resources_for(cfg, stage).cpus_per_task}"]
    if kind == MPI:
        return lines + mpi_lines(cfg, stage, trime + stage_args, srun_opts)
    port = str(cfg.master_port) if cfg.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    lines += ["", "# torch.distributed rendezvous on the first node; every task reads its rank from",
              "# SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (trime_dist.core.launch_env.discover_env).",
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              f"export MASTER_PORT={port}"]
    srun = ["srun", *srun_opts, *trime]
    if stage != "train":
        return lines + [shlex.join(srun + stage_args)]
    if "--resume" not in stage_args and "--auto-resume" not in stage_args:
        lines += ["", "# Requeue-friendly: a rerun of this script continues from the run's latest checkpoint."]
        stage_args = ["--auto-resume", *stage_args]
    return lines + (requeue_on_signal(shlex.join(srun + stage_args), log_dir) if cfg.requeue else
                    [shlex.join(srun + stage_args)])


def mpi_lines(cfg: SlurmConfig, stage: str, command: list[str], srun_opts: list[str]) -> list[str]:
    """An MPI stage's ranks: hydra's mpiexec (mpi=mpiexec) or srun with a PMI plugin (mpi=pmi2, pmix)."""
    if cfg.mpi != "mpiexec":
        return ["", "# MPI ranks: srun starts one rank per task and hands them PMI (mpi4py + MPICH).",
                shlex.join(["srun", f"--mpi={cfg.mpi}", *srun_opts, *command])]
    res = resources_for(cfg, stage)
    # Hydra serves PMI itself and starts one proxy per node with srun (-launcher slurm); each proxy forks
    # that node's ranks, so the proxy's step gets every CPU the node's tasks have (srun reads
    # SRUN_CPUS_PER_TASK). Hydra ends the other ranks when one exits with an error (its default; what srun's
    # --kill-on-bad-exit did) and exits with a failing rank's status.
    # Not `srun --mpi=pmi2`: SLURM's PMI-1 server reads each request with one 1024-byte read(), and
    # MPICH 5 sends its business cards in 511-byte segments, hex-encoded: up to ~1080 bytes a request. A cut
    # request is rejected without an answer and MPI_Init hangs (benchmarks/pmi_loop.py: 3 of 40 two-node
    # steps; benchmarks/RESULTS.md "MPI_Init under srun --mpi=pmi2").
    return ["", "# MPI ranks: MPICH's mpiexec (hydra) in the job, its proxies started by srun, one per node.",
            f"export SRUN_CPUS_PER_TASK={res.tasks_per_node * res.cpus_per_task}",
            f"{shlex.quote(env_bin('mpiexec'))} -launcher slurm -n \"$SLURM_NTASKS\" -ppn {res.tasks_per_node} "
            f"{shlex.join(command)}"]


def requeue_on_signal(command: str, log_dir: str) -> list[str]:
    """Run `command`; when training stopped by SLURM's --signal with a checkpoint (exit status
    EXIT_STOPPED_BY_SIGNAL, or the marker rank 0 then writes: srun --kill-on-bad-exit may end the other
    ranks first and report their status) this job is requeued and resumes; any other status is the job's."""
    code = EXIT_STOPPED_BY_SIGNAL
    marker = os.path.join(os.path.abspath(log_dir), ".stopped-by-signal-${SLURM_JOB_ID}")
    return ["", f"# Exit status {code} (or rank 0's marker file): training stopped by a signal (the time limit is near)",
            "# after saving a checkpoint. Requeue the job: it reruns this script and continues from that checkpoint.",
            f'export {STOPPED_MARKER_ENV}="{marker}"', f'rm -f "${STOPPED_MARKER_ENV}"',
            "status=0", f"{command} || status=$?",
            f'if [ "$status" -eq {code} ] || [ -f "${STOPPED_MARKER_ENV}" ]; then',
            f'  rm -f "${STOPPED_MARKER_ENV}"',
            '  echo "training stopped by a signal with a checkpoint: requeueing job ${SLURM_JOB_ID}"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
            'exit "$status"']


def check_train_args(stage_args: list[str], workdir: str) -> None:
    """Load the train step's config now (`trime train --print-config`, run in `workdir`), so an unknown key
    or a wrong type is reported at submission, not after the job waited in the queue."""
    cmd = [sys.executable, "-m", "trime_dist.cli", "train", "--print-config", *stage_args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ValueError(f"the train step's arguments do not load: {last}")


def render_script(argv: list[str], cfg: SlurmConfig, workdir: str, script_path: str) -> Job:
    """The sbatch script for `trime STAGE ARGS` (logs go to RUN_DIR/logs)."""
    stage, stage_args = split_stage(argv)
    if stage == "train":
        check_train_args(stage_args, workdir)
    run_dir = os.path.dirname(script_path)
    log_dir = os.path.join(run_dir, "logs")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["#!/bin/bash",
             f"# trime {stage}: written by `trime launch slurm` on {when}.",
             f"# Submit again with: sbatch {shlex.quote(script_path)}",
             *sbatch_header(cfg, stage, log_dir), "",
             *script_body(cfg, stage, stage_args, workdir, log_dir)]
    return Job(stage, script_path, "\n".join(lines) + "\n")


def plan_jobs(steps: list[list[str]], cfg: SlurmConfig, workdir: str, numbered: bool) -> list[Job]:
    """One Job per step; scripts go to RUN_DIR/STAGE.sbatch (or NN-STAGE.sbatch in a chain)."""
    if not steps:
        raise ValueError("no steps to submit: give a stage after `--`, or `chain:` in the config / --step")
    run_dir = os.path.join(workdir, cfg.run_dir)
    jobs = []
    for i, argv in enumerate(steps, start=1):
        stage, _ = split_stage(argv)
        name = f"{i:02d}-{stage}.sbatch" if numbered else f"{stage}.sbatch"
        jobs.append(render_script(argv, cfg, workdir, os.path.join(run_dir, name)))
    return jobs


def dry_run_text(jobs: list[Job], chained: bool) -> str:
    parts = []
    for i, job in enumerate(jobs):
        dep = f" --dependency=afterok:<job id of {jobs[i - 1].stage}> --kill-on-invalid-dep=yes" \
            if chained and i > 0 else ""
        parts.append(f"# ===== {job.script_path}  (would run: sbatch --parsable{dep} {job.script_path})\n{job.script}")
    return "\n".join(parts)
