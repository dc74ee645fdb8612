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
    """Write and submit the scripts in order, each `afterok` on the one before; with wait, follow the chain
    step by step and raise SlurmError (one line naming the step that did not complete) unless all completed."""
    write_jobs(jobs)
    previous = None
    for job in jobs:
        job.job_id = sbatch(job.script_path, dependency=previous)
        record_job(job, previous)
        after = f" after job {previous}" if previous else ""
        print(f"submitted {job.stage} as job {job.job_id}{after}: {job.script_path}", flush=True)
        previous = job.job_id
    if wait:
        failure = wait_chain(jobs)
        if failure:
            raise SlurmError(failure)
        print(f"job {jobs[-1].job_id} ({jobs[-1].stage}) completed", flush=True)
    return jobs


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (empty once slurmctld has forgotten the job: MinJobAge)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    return dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w)


def down_nodes(nodelist: str) -> list[str]:
    """'NODE STATE (reason)' for each node of `nodelist` that SLURM holds DOWN, NOT_RESPONDING or FAIL."""
    if not nodelist:
        return []
    proc = subprocess.run(["scontrol", "show", "node", "-o", nodelist], capture_output=True, text=True)
    bad = []
    for line in proc.stdout.splitlines():
        name, state = line.split("NodeName=", 1)[-1].split()[0], ""
        if " State=" in line:
            state = line.split(" State=", 1)[1].split()[0]
        if any(s in state for s in ("DOWN", "NOT_RESPONDING", "FAIL")):
            reason = line.split(" Reason=", 1)[1].split(" [")[0] if " Reason=" in line else ""
            bad.append(f"{name} {state}" + (f" ({reason})" if reason else ""))
    return bad


def _nodes_of(info: dict[str, str]) -> str:
    nodes = info.get("NodeList", "")
    return "" if nodes in ("", "(null)", "None") else nodes


def wait_chain(jobs: list[Job], poll_s: float = 2.0) -> Optional[str]:
    """Follow the chain one step at a time. None once the last step completed; otherwise the rest of the chain
    is cancelled and the one line saying which step (stage, job id) did not complete, its state and nodes is
    returned (with the end of its error log below it). A step stops the chain when it ends in any state but
    COMPLETED, waits for a reason that never clears, or is requeued after a node failure (SLURM requeues batch
    jobs whose node died; the node stays DOWN). A train step that requeues itself near its time limit (the job
    script, launcher.slurm.requeue_on_signal) is waited for: its nodes are up."""
    for i, job in enumerate(jobs):
        nodes, restarts, announced = "", None, False
        while True:
            info = job_info(job.job_id)
            if not info:
                return _stop(jobs, i, "UNKNOWN", nodes, "no longer known to slurmctld (MinJobAge); look for its log")
            state, reason = info.get("JobState", ""), info.get("Reason", "")
            if state == "RUNNING":  # the run's nodes: after a node failure SLURM drops the failed node from
                nodes = _nodes_of(info) or nodes  # NodeList while the job completes, and empties it on requeue
            runs = int(info.get("Restarts", 0) or 0)
            restarts = runs if restarts is None else restarts
            if state == "RUNNING" and not announced:
                print(f"step {i + 1} of {len(jobs)}, {job.stage} (job {job.job_id}), running on {nodes}", flush=True)
                announced = True
            if state == "COMPLETED":
                break
            if state in FINAL_STATES:
                return _stop(jobs, i, state, nodes or _nodes_of(info), f"exit code {info.get('ExitCode', '?')}, reason {reason}",
                             info.get("StdErr"))
            if state == "PENDING" and reason in HOPELESS_REASONS:
                return _stop(jobs, i, "PENDING", nodes, f"cannot start: pending with reason {reason} (SLURM); "
                                                        f"fix the request")
            if nodes and (state != "RUNNING" or runs > restarts):
                # it ran and is not running now: requeued (or being), by SLURM after a node failure, or by its
                # own script near the time limit; a node of its last run that SLURM holds down tells which
                down = down_nodes(nodes)
                if down:
                    return _stop(jobs, i, "NODE_FAIL", nodes, f"{', '.join(down)}; SLURM requeues such a job",
                                 info.get("StdErr"))
            restarts = runs
            time.sleep(poll_s)
    return None


def _stop(jobs: list[Job], i: int, state: str, nodes: str, detail: str, err: Optional[str] = None) -> str:
    """Cancel steps i.. that have not ended; the one line (and the end of the step's error log below it)."""
    job = jobs[i]
    live = [j.job_id for j in jobs[i:] if job_info(j.job_id).get("JobState") not in FINAL_STATES | {"COMPLETED"}]
    if live:
        subprocess.run(["scancel", *live], capture_output=True, text=True)
    after = [j.job_id for j in jobs[i + 1:]]
    rest = f"; steps after it (jobs {', '.join(after)}) cancelled" if after else ""
    where = f"on {nodes}" if nodes else "on no node (it never started)"
    line = (f"step {i + 1} of {len(jobs)}, {job.stage} (job {job.job_id}), ended {state} {where} ({detail}){rest}; "
            f"rerun the same command to continue (steps whose output is complete skip their work); script {job.script_path}")
    if err and os.path.isfile(err):
        tail = [ln for ln in open(err, errors="replace").read().splitlines() if ln.strip()][-8:]
        if tail:
            line += f"\n  end of {err}:\n    " + "\n    ".join(tail)
    return line
