"""Fault injection through the `trime` command line: kills and hangs of the stages, and bad inputs.

    python benchmarks/faults.py --work /tmp/trime_faults --out benchmarks/faults_table.md

Each fault runs a stage, interrupts it (a test hook that exits without cleanup like kill -9, a real
SIGKILL/SIGSTOP/SIGUSR1), reruns or resumes it, and compares the outputs with an uninterrupted run
(bytes for shards and datastores, torch.equal for weights, metrics rows). Each bad input runs one CLI
command that must fail with exit status 2 (4 for a lost rank) and one error line, no traceback.
Prints two markdown tables (and writes them to --out).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = os.path.join(REPO, "configs", "tiny.yaml")
KILL_HOOK = 17  # exit status of the test hooks (train/kill_hook.py, datastore/parts.py)


# ----------------------------------------------------------------------------- running the CLI

def command(args: list, ranks: int = 1, launcher: str = "deepspeed", port: int | None = None) -> list[str]:
    args = [str(a) for a in args]
    if ranks == 1:
        return [sys.executable, "-m", "trime_dist.cli", *args]
    if launcher == "mpi":
        return [f"{BIN}/mpiexec", "-n", str(ranks), sys.executable, "-m", "trime_dist.cli", *args]
    return [f"{BIN}/deepspeed", "--num_gpus", str(ranks), "--master_port", str(port or free_port()),
            f"{BIN}/trime", *args]


def free_port() -> int:
    from trime_dist.core.launch_env import free_port as pick

    return pick()


def run(args: list, ranks: int = 1, launcher: str = "deepspeed", env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args, ranks, launcher), check=False, capture_output=True, text=True, cwd=REPO,
                          timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                                   MASTER_PORT=str(free_port()), **(env or {})))
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command(args, ranks, launcher))} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def start(args: list, ranks: int, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(args, ranks), cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {})))


def rank_pid(proc: subprocess.Popen, rank: int) -> int:
    import psutil

    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if f"--local_rank={rank}" in p.cmdline()]
    return ranks[0].pid


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def proc_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the run ended or stalled before the fault ({proc.returncode})")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- comparing outputs

def tree_digest(root: str, skip=("datastore.json", "build.json", "train.log")) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest), JSON files with paths/times left out."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            if name not in skip:
                path = os.path.join(d, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def same_weights(run_a: str, run_b: str) -> bool:
    import torch

    from trime_dist.model.export import load_model

    a, b = load_model(run_a)[0].state_dict(), load_model(run_b)[0].state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rows]


def same_run(run_a: str, run_b: str) -> bool:
    return same_weights(run_a, run_b) and metric_rows(run_a) == metric_rows(run_b)


# ----------------------------------------------------------------------------- data

def make_data(work: str) -> dict[str, str]:
    corpus, data = os.path.join(work, "corpus"), os.path.join(work, "data")
    run(["corpus", "--out", corpus, "--scale", "0.05"])
    run(["prepare", "--input", f"{corpus}/train", "--output", f"{data}/train", "--seq-len", "32",
         "--tokenizer-kind", "byte"])
    run(["prepare", "--input", f"{corpus}/valid", "--output", f"{data}/valid", "--seq-len", "32",
         "--tokenizer", f"{data}/train/tokenizer.json"])
    return {"train": f"{data}/train", "valid": f"{data}/valid", "corpus": corpus}


def train_args(data: dict, out: str, zero: int, steps: int = 8, *extra) -> list:
    return ["train", "--config", TINY, f"data.train={data['train']}", "data.valid=", f"run.out_dir={out}",
            f"run.max_steps={steps}", "model.max_seq_len=32", "model.dropout=0.1", f"deepspeed.zero_stage={zero}",
            "data.global_batch_size=8", "data.micro_batch_size=2", "optim.warmup_steps=2", "run.save_every=3",
            "run.log_every=1", *extra]


def resume_args(args: list) -> list:
    return ["train", "--auto-resume", *args[1:]]


# ----------------------------------------------------------------------------- faults

def fault_train_hook(work, data, ranks, zero):
    """Simulated kill -9 (os._exit) after step 5, --resume from the step-3 checkpoint."""
    ref, out = f"{work}/train_r{ranks}z{zero}_ref", f"{work}/train_r{ranks}z{zero}_hook"
    run(train_args(data, ref, zero), ranks)
    killed = run(train_args(data, out, zero), ranks, env={"TRIME_TRAIN_EXIT_AFTER_STEP": "5"}, check=False)
    run(resume_args(train_args(data, out, zero)), ranks)
    return ((f"`trime train`, {ranks} rank(s), ZeRO {zero}: exit without cleanup after step 5 "
            f"(TRIME_TRAIN_EXIT_AFTER_STEP=5, status {killed.returncode}), `--auto-resume` from step 3"),
            same_run(ref, out), "weights (torch.equal), metrics.jsonl rows")


def fault_train_sigkill(work, data):
    """A real SIGKILL of the launcher and both ranks once step 4 is logged; --auto-resume."""
    ref, out = f"{work}/train_r2z2_40steps_ref", f"{work}/train_r2z2_sigkill"
    args = train_args(data, out, 2, 40, "run.save_every=5")
    run(train_args(data, ref, 2, 40, "run.save_every=5"), 2)
    proc = start(args, 2)
    wait_for(lambda: os.path.isfile(f"{out}/checkpoints/latest"), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = read_text(f"{out}/checkpoints/latest").strip()
    run(resume_args(args), 2)
    return ((f"`trime train`, 2 ranks, ZeRO 2, 40 steps: SIGKILL to launcher and ranks (process group) after "
            f"the first checkpoint ({step}), `--auto-resume`"), same_run(ref, out),
            "weights (torch.equal), metrics.jsonl rows")


def fault_train_sigusr1(work, data):
    """SIGUSR1 to rank 1 (SLURM's time-limit warning): step finished, checkpoint, exit 3, --auto-resume."""
    ref, out = f"{work}/train_r2z2_40steps_ref", f"{work}/train_r2z2_usr1"  # (made by fault_train_sigkill)
    args = train_args(data, out, 2, 40, "run.save_every=5")
    proc = start(args, 2)
    wait_for(lambda: os.path.isfile(f"{out}/metrics.jsonl") and
             len(read_text(f"{out}/metrics.jsonl").splitlines()) >= 2, proc)
    os.kill(rank_pid(proc, 1), signal.SIGUSR1)
    proc.communicate(timeout=300)
    step = read_text(f"{out}/checkpoints/latest").strip()
    run(resume_args(args), 2)
    return ((f"`trime train`, 2 ranks, ZeRO 2: SIGUSR1 to rank 1, both stop after one step with a checkpoint "
            f"({step}, exit status {proc.returncode}), `--auto-resume`"), same_run(ref, out),
            "weights (torch.equal), metrics.jsonl rows")


def fault_lost_rank(work, data, victim, sig, extra=()):
    """One rank SIGKILLed or SIGSTOPped: how long until the job ends, and the survivor's line."""
    out = f"{work}/lost_{victim}_{sig.name}"
    proc = start(train_args(data, out, 2, 100000, "run.save_every=100000", *extra), 2)
    wait_for(lambda: os.path.isfile(f"{out}/metrics.jsonl") and
             len(read_text(f"{out}/metrics.jsonl").splitlines()) >= 3, proc)
    pid = rank_pid(proc, victim)
    hit = time.monotonic()
    os.kill(pid, sig)
    _, stderr = proc.communicate(timeout=300)
    seconds = time.monotonic() - hit
    if proc_alive(pid):  # a stopped rank the launcher could not end
        os.kill(pid, signal.SIGKILL)
    line = next((ln[ln.index("trime train: error:"):] for ln in stderr.splitlines() if "trime train: error:" in ln),
                "(no error line)")
    return (f"`trime train`, 2 ranks: {sig.name} to rank {victim}{' (' + ' '.join(extra) + ')' if extra else ''}",
            None, f"job ended {seconds:.0f} s later, status {proc.returncode}: {line}")


def fault_datastore(work, data, model, hook):
    """2 MPI ranks, killed by the datastore hook, rerun; the store equals an uninterrupted build's."""
    ref, out = f"{work}/ds_ref", f"{work}/ds_{hook.replace(':', '')}"
    args = ["datastore", "build", "--model", model, "--data", data["train"], "--factory", "IVF16,PQ4x4",
            "--part-segments", "400", "--batch-size", "16", "--threads", "1"]
    if not os.path.isdir(ref):
        run([*args, "--out", ref], 2, "mpi")
    killed = run([*args, "--out", out], 2, "mpi", env={"TRIME_DATASTORE_EXIT_AFTER": hook}, check=False)
    leftovers = [n for n in os.listdir(f"{out}/parts") if n.endswith(".tmp")] if os.path.isdir(f"{out}/parts") else []
    run([*args, "--out", out], 2, "mpi")
    after = [n for n in os.listdir(f"{out}/parts") if n.endswith(".tmp")]
    return ((f"`trime datastore build`, 2 MPI ranks, IVF16,PQ4x4: killed after {hook} (status {killed.returncode}, "
            f"{len(leftovers)} temp files), rerun"), tree_digest(ref) == tree_digest(out) and not after,
            "sha256 of every part, index part and index.faiss; no temp files left")


def fault_group(work, data):
    """BM25 grouping stopped by its hook after 2 blocks on one of 2 MPI ranks; the rerun equals a clean run."""
    args = ["group", "--input", data["train"], "--method", "bm25", "--group-size", "4", "--query-block", "256"]
    ref, out = f"{work}/group_ref", f"{work}/group_stopped"
    run([*args, "--output", ref], 2, "mpi")
    stopped = run([*args, "--output", out], 2, "mpi", env={"TRIME_GROUP_STOP_AFTER_BLOCKS": "2"}, check=False)
    run([*args, "--output", out], 2, "mpi")
    return ((f"`trime group --method bm25`, 2 MPI ranks: stopped after 2 blocks (status {stopped.returncode}), "
            "rerun"), tree_digest(ref, skip=("manifest.json",)) == tree_digest(out, skip=("manifest.json",)),
            "sha256 of every shard")


# ----------------------------------------------------------------------------- bad inputs

def bad_inputs(work, data, model, store):
    """(what, command args, ranks, launcher); each must end with exit 2 and one error line."""
    bad = os.path.join(work, "bad")
    os.makedirs(bad, exist_ok=True)
    with open(f"{bad}/empty.txt", "w"):
        pass
    with open(f"{bad}/latin1.txt", "wb") as f:
        f.write(b"fine line\ncaf\xe9 au lait\n")
    with open(f"{bad}/a_file", "w") as f:
        f.write("not a directory\n")
    broken = f"{bad}/store_truncated_index"
    shutil.copytree(store, broken, dirs_exist_ok=True)
    with open(f"{broken}/index.faiss", "r+b") as f:
        f.truncate(os.path.getsize(f"{broken}/index.faiss") // 2)
    npy = f"{bad}/store_truncated_keys"
    shutil.copytree(store, npy, dirs_exist_ok=True)
    keys = f"{npy}/parts/keys-p00000.npy"
    with open(keys, "r+b") as f:
        f.truncate(os.path.getsize(keys) - 7)
    tr = ["train", "--config", TINY, f"data.train={data['train']}", "data.valid=", "model.max_seq_len=32",
          "run.max_steps=2"]
    ds = ["datastore", "build", "--model", model, "--data", data["train"], "--threads", "1"]
    ev = ["eval", "--model", model, "--data", data["valid"], "--memory", "external", "--k", "4", "--nprobe", "1",
          "--max-segments", "2"]
    return [
        ("prepare: empty input file", ["prepare", "--input", f"{bad}/empty.txt", "--output", f"{bad}/o1"]),
        ("prepare: non-UTF-8 input", ["prepare", "--input", f"{bad}/latin1.txt", "--output", f"{bad}/o2",
                                      "--tokenizer-kind", "byte"]),
        ("prepare: missing input", ["prepare", "--input", f"{bad}/missing.txt", "--output", f"{bad}/o3"]),
        ("group: --output is a file", ["group", "--input", data["train"], "--output", f"{bad}/a_file",
                                       "--group-size", "2"]),
        ("train: unknown config key", [*tr, f"run.out_dir={bad}/t1", "model.n_layerz=2"]),
        ("train: wrong type", [*tr, f"run.out_dir={bad}/t2", "run.max_steps=many"]),
        ("train: data.train missing", [*tr, f"run.out_dir={bad}/t0", f"data.train={bad}/no_train"]),
        ("train: --resume without a checkpoint", ["train", "--resume", *tr[1:], f"run.out_dir={bad}/t3"]),
        ("train: missing data.valid", [*tr, f"run.out_dir={bad}/t4", f"data.valid={bad}/no_valid"]),
        ("train: trime_ext on ungrouped data", [*tr, f"run.out_dir={bad}/t5", "objective.name=trime_ext"]),
        ("train: data longer than the model", [*tr[:-2], "model.max_seq_len=16", f"run.out_dir={bad}/t6"]),
        ("datastore: index needs more keys than exist", [*ds, "--out", f"{bad}/d1", "--factory", "IVF262144,Flat"]),
        ("datastore: --out is a file", [*ds, "--out", f"{bad}/a_file"]),
        ("datastore: model directory missing", ["datastore", "build", "--model", f"{bad}/no_model", "--data",
                                                data["train"], "--out", f"{bad}/d2"]),
        ("datastore info: not a datastore", ["datastore", "info", bad]),
        ("eval: truncated index.faiss", [*ev, "--datastore", broken]),
        ("eval: truncated keys .npy part", [*ev, "--datastore", npy]),
        ("eval: datastore of another model", [*ev[:2], f"{work}/train_r2z2_ref", *ev[3:], "--datastore", store]),
    ]


def run_bad_input(args: list) -> tuple[int, int, bool, str]:
    """(exit status, number of error lines, traceback?, the error line)."""
    proc = run(args, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    return proc.returncode, len(lines), "Traceback" in proc.stderr, lines[-1] if lines else proc.stderr[-300:]


# ----------------------------------------------------------------------------- tables

def md_cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/trime_faults", help="scratch directory (emptied first)")
    p.add_argument("--out", default="", help="also write the tables (markdown) here")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    t0 = time.time()
    data = make_data(args.work)
    faults = [fault_train_hook(args.work, data, 1, 0), fault_train_hook(args.work, data, 2, 2),
              fault_train_hook(args.work, data, 2, 3)]
    model = f"{args.work}/train_r1z0_ref"
    faults += [fault_train_sigkill(args.work, data), fault_train_sigusr1(args.work, data),
               fault_datastore(args.work, data, model, "encode:1"), fault_datastore(args.work, data, model, "add:1"),
               fault_group(args.work, data),
               fault_lost_rank(args.work, data, 1, signal.SIGKILL), fault_lost_rank(args.work, data, 0, signal.SIGKILL),
               fault_lost_rank(args.work, data, 1, signal.SIGSTOP, ("run.dist_timeout_s=10",))]
    bad = [(what, *run_bad_input(cmd)) for what, cmd in bad_inputs(args.work, data, model, f"{args.work}/ds_ref")]

    table = ["| fault | outputs identical to an uninterrupted run | compared / observed |", "|---|---|---|"]
    for what, same, compared in faults:
        verdict = "n/a" if same is None else ("**yes**" if same else "**NO**")
        table.append(f"| {md_cell(what)} | {verdict} | {md_cell(compared)} |")
    table += ["", "| bad input | exit | error lines | traceback | the error line |", "|---|---|---|---|---|"]
    for what, status, n_lines, traceback, line in bad:
        table.append(f"| {what} | {status} | {n_lines} | {'yes' if traceback else 'no'} | `{md_cell(line, 300)}` |")
    table.append("")
    table.append(f"({len(faults)} faults, {len(bad)} bad inputs in {time.time() - t0:.0f} s)")
    text = "\n".join(table)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(s is not False for _, s, _ in faults) and all(b[1] == 2 and b[2] == 1 and not b[3]
                                                                   for b in bad) else 1


if __name__ == "__main__":
    sys.exit(main())
