"""Many 2-node MPI_Init's on the two-node test cluster (tests/helpers/two_hosts.py): does a SLURM step of mpi4py +
pip MPICH start, fail or hang?  One sbatch job per try, `--nodes=2 --ntasks-per-node=1`, the step run the way
given by --how, each under `timeout` (a hang counts as one).  Prints the counts and slurmstepd's PMI errors.

    flock /work/wt/cpu.lock python benchmarks/pmi_loop.py --tries 40 --how pmi2
    flock /work/wt/cpu.lock python benchmarks/pmi_loop.py --tries 40 --how pmi2 --env MPIR_CVAR_PMI_VERSION=2

--first-job-id sets the cluster's FirstJobId (the job id is part of every PMI request: kvsname=JOB.STEP).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers"))
import two_hosts  # noqa: E402

PROG = ("from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(1); "
        "print('RANKOK', c.rank, c.size, MPI.Get_processor_name(), s)")
# The same after filling freed heap with non-zero bytes: MPICH all-gathers a buffer over PMI whose unused part is
# whatever malloc returns (in a big process such as `trime group`: text, pointers), hex-encoded with zero runs
# shortened, so the length of its PMI requests depends on the heap. A heap of freed 0x55 bytes makes every
# 511-byte segment encode to 1022 characters.
PREFILL = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
           "junk = [bytes([0x55]) * n for n in range(600, 20000, 7)]; del junk; MPI.Init(); "
           "c = MPI.COMM_WORLD; s = c.allreduce(1); print('RANKOK', c.rank, c.size, MPI.Get_processor_name(), s)")


def step_command(how: str, prefill: bool, imports: str) -> str:
    prog = PREFILL if prefill else PROG
    if imports:  # what the stage's process holds before MPI_Init (its heap differs), e.g. data_pipeline.group
        prog = f"import {imports}; {prog}"
    py = shlex.join([sys.executable, "-c", prog])
    if how == "mpiexec":  # hydra inside the allocation: its own PMI server, proxies started with srun
        return f"{two_hosts.BIN}/mpiexec -launcher slurm -n $SLURM_NTASKS {py}"
    return f"srun --mpi={how} --kill-on-bad-exit=1 {py}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tries", type=int, default=20)
    p.add_argument("--how", default="pmi2", help="pmi2 | pmix | mpiexec (hydra with -launcher slurm)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE exported in the job")
    p.add_argument("--first-job-id", type=int, default=0)
    p.add_argument("--timeout", type=int, default=40)
    p.add_argument("--prefill", action="store_true", help="non-zero bytes in the freed heap before MPI_Init")
    p.add_argument("--imports", default="", help="modules imported before mpi4py, e.g. data_pipeline.group")
    p.add_argument("--debug", action="store_true", help="SlurmdDebug=debug3 (every PMI request in slurmd's log)")
    args = p.parse_args()
    conf = two_hosts.slurm_conf

    def patched(root, sock, cpus):
        text = conf(root, sock, cpus)
        if args.first_job_id:
            text = re.sub(r"FirstJobId=\d+", f"FirstJobId={args.first_job_id}", text)
        return text + ("SlurmdDebug=debug3\n" if args.debug else "")

    two_hosts.slurm_conf = patched
    root = tempfile.mkdtemp(prefix="pmi_loop-")
    cluster = two_hosts.TwoHosts(root).start()
    counts = collections.Counter()
    try:
        work = os.path.join(root, "work")
        os.makedirs(work)
        env = dict(two_hosts.NODE_ENV, **dict(kv.split("=", 1) for kv in args.env))
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        script = (f"#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1 --time=2\n"
                  f"export {exports}\ntimeout {args.timeout} {step_command(args.how, args.prefill, args.imports)}\n")
        with open(os.path.join(work, "job.sbatch"), "w") as f:
            f.write(script)
        print(script)
        t0 = time.monotonic()
        for i in range(args.tries):
            proc = cluster.run("nodeA", ["sbatch", "--parsable", "--wait", "-o", f"{work}/%j.out", "job.sbatch"],
                               cwd=work, timeout=args.timeout + 60)
            job = proc.stdout.strip().split(";")[0]
            out = open(f"{work}/{job}.out", errors="replace").read() if job else proc.stderr
            oks = out.count("RANKOK")
            # sbatch --wait exits with the job's status: 124 is `timeout` ending a step that hung
            kind = "ok" if oks == 2 and proc.returncode == 0 else ("hang" if proc.returncode == 124 else "fail")
            counts[kind] += 1
            print(f"try {i + 1} job {job}: {kind} (rc {proc.returncode})", flush=True)
            if kind != "ok":
                print("   ", out[-600:].replace("\n", "\n    "))
        print(f"\n{args.how} {' '.join(args.env)}{' prefill' if args.prefill else ''}: {dict(counts)} of {args.tries} in {time.monotonic() - t0:.0f}s")
        for node in two_hosts.NODES:
            log = open(os.path.join(root, f"slurmd-{node}.log"), errors="replace").read()
            errs = [line for line in log.splitlines() if "mpi/pmi2" in line and "error" in line]
            print(f"slurmd-{node}.log: {len(errs)} pmi2 error lines", *errs[:6], sep="\n  ")
            # with --debug every PMI-1 request is logged: the longest per job (slurmstepd reads 1024 bytes at once)
            longest = collections.defaultdict(int)
            for m in re.finditer(r"\[(\d+)\.\d+\] debug3: mpi/pmi2: _handle_pmi1_cmd_buf: mpi/pmi2: got client "
                                 r"request: (.*)", log):
                longest[m.group(1)] = max(longest[m.group(1)], len(m.group(2)) + 1)  # + its newline
            if longest:
                print(f"  longest PMI-1 request per job on {node}:", sorted(longest.values()))
            # PMI-2 wire protocol: a 6-character length, then that many bytes (slurmstepd reads them all)
            longest2 = collections.defaultdict(int)
            for m in re.finditer(r"\[(\d+)\.\d+\] debug2: mpi/pmi2: handle_pmi2_cmd: mpi/pmi2: got client request: "
                                 r"(\d+) ", log):
                longest2[m.group(1)] = max(longest2[m.group(1)], int(m.group(2)))
            if longest2:
                print(f"  longest PMI-2 request per job on {node}:", sorted(longest2.values()))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
