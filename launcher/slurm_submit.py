"""Submit rendered sbatch scripts (a chain with --dependency=afterok), wait for them, and report SLURM's own words."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from typing import Optional

from launcher.slurm import Job

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
# Pending reasons that no amount of waiting fixes (clusters with EnforcePartLimits=NO accept such jobs).
HOPELESS_REASONS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                    "DependencyNeverSatisfied", "InvalidAccount", "InvalidQOS", "AccountNotAllowed",
                    "QOSNotAllowed"}


class SlurmError(RuntimeError):
    """sbatch refused a job, or a job we waited for failed; the message carries SLURM's own words."""


def write_jobs(jobs: list[Job]) -> None:
    """Write each script (executable) and create its logs/ directory: SLURM does not create it."""
    from trime_dist.core.io import atomic_write_text

    for job in jobs:
        os.makedirs(os.path.join(os.path.dirname(job.script_path), "logs"), exist_ok=True)
        atomic_write_text(job.script_path, job.script)
        os.chmod(job.script_path, 0o755)


def sbatch(script_path: str, dependency: Optional[str] = None) -> str:
    """Submit one script; returns its job id. A refusal raises SlurmError with sbatch's message."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    try:
        proc = subprocess.run(cmd + [script_path], capture_output=True, text=True)
    except FileNotFoundError:
        raise SlurmError("sbatch: not found; run this on a SLURM login node (or use --dry-run)") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        err = proc.stderr.strip() or proc.stdout.strip() or "no message"
        raise SlurmError(f"sbatch refused {script_path} (exit {proc.returncode}): {err}")
    return proc.stdout.strip().split(";")[0]


def record_job(job: Job, dependency: Optional[str]) -> None:
    """Append the submission to RUN_DIR/jobs.jsonl (stage, job id, script, the job it waits for)."""
    path = os.path.join(os.path.dirname(job.script_path), "jobs.jsonl")
    row = {"stage": job.stage, "job_id": job.job_id, "script": job.script_path, "after": dependency,
           "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def submit_chain(jobs: list[Job], wait: bool = False) -> list[Job]:
    """Write and submit the scripts in order, each `afterok` on the one before; with wait, block until the
    last one ends and raise SlurmError (naming the first job that did not complete) unless all completed."""
    write_jobs(jobs)
    previous = None
    for job in jobs:
        job.job_id = sbatch(job.script_path, dependency=previous)
        record_job(job, previous)
        after = f" after job {previous}" if previous else ""
        print(f"submitted {job.stage} as job {job.job_id}{after}: {job.script_path}", flush=True)
        previous = job.job_id
    if wait:
        info = wait_job(jobs[-1].job_id)
        if info.get("JobState") != "COMPLETED":
            raise SlurmError(failure_report(jobs))
        print(f"job {jobs[-1].job_id} ({jobs[-1].stage}) completed", flush=True)
    return jobs


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (empty once slurmctld has forgotten the job: MinJobAge)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    return dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)


def wait_job(job_id: str, max_poll_s: float = 10.0) -> dict[str, str]:
    """Poll until the job ends (1 s at first, then slower) or is pending for a reason that never clears."""
    poll, info = 1.0, {}
    while True:
        info = job_info(job_id)
        if not info:
            raise SlurmError(f"job {job_id} is no longer known to slurmctld; look for its log")
        state, reason = info.get("JobState", ""), info.get("Reason", "")
        if state in FINAL_STATES:
            return info
        if state == "PENDING" and reason in HOPELESS_REASONS:
            return info
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll_s)


def failure_report(jobs: list[Job]) -> str:
    """Which job of the chain did not complete, its state and exit code, and the end of its error log."""
    states = []
    first_bad: Optional[tuple[Job, dict]] = None
    for job in jobs:
        info = job_info(job.job_id)
        states.append(f"{job.stage} {job.job_id} {info.get('JobState', 'UNKNOWN')}")
        if first_bad is None and info.get("JobState") != "COMPLETED":
            first_bad = (job, info)
    lines = [f"chain did not complete: {', '.join(states)}"]
    if first_bad is not None:
        job, info = first_bad
        if info.get("JobState") == "PENDING":
            lines.append(f"job {job.job_id} ({job.stage}) cannot start: pending with reason {info.get('Reason')} "
                         f"(SLURM); remove it with `scancel {job.job_id}` and fix the request")
            return "\n".join(lines)
        lines.append(f"job {job.job_id} ({job.stage}) ended {info.get('JobState', 'UNKNOWN')} "
                     f"(exit code {info.get('ExitCode', '?')}, reason {info.get('Reason', '?')}); "
                     f"script {job.script_path}")
        err = info.get("StdErr")
        if err and os.path.isfile(err):
            tail = [ln for ln in open(err, errors="replace").read().splitlines() if ln.strip()][-8:]
            lines.append(f"end of {err}:\n  " + "\n  ".join(tail))
    return "\n".join(lines)
