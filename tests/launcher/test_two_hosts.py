"""Every launcher across two real nodes (tests/helpers/two_hosts.py: nodeA and nodeB, each a network namespace
with its own hostname, sshd and slurmd, joined by a veth), each compared with the one-host run of the same
command: `trime launch deepspeed --hosts nodeA:1,nodeB:1` (pdsh over ssh), `mpiexec` over both hosts for
prepare and group, and `trime launch slurm-chain` on 2 nodes.

Where the cluster cannot be started these tests skip with the reason; in CI (CI=true) that is a failure.
"""
from __future__ import annotations

import json
import os

import pytest

from cli_runner import BIN, REPO, run_trime
from two_hosts import IFNAME, NODE_ENV, TRIME, assert_same_weights, on_node_a, timed, train_args

pytestmark = pytest.mark.two_hosts


# ----------------------------------------------------------------------------- DeepSpeed over pdsh

def test_deepspeed_pdsh_two_hosts_equals_one_host(cluster, work):
    """`trime launch deepspeed --hosts nodeA:1,nodeB:1` started on nodeA: pdsh reaches both nodes over ssh,
    .deepspeed_env carries PYTHONPATH and GLOO_SOCKET_IFNAME to nodeB, the rendezvous is nodeA (not
    127.0.0.1, which nodeB's rank would dial on its own loopback); the final weights equal a 2-rank run on one
    host bit for bit."""
    timed("train (DeepSpeed, 2 ranks)", "one", lambda: run_trime(
        ["launch", "local", "--nproc", "2", "--", *train_args("runs/one")], cwd=str(work)))
    proc = timed("train (DeepSpeed, 2 ranks)", "two", lambda: on_node_a(cluster, work, [
        TRIME, "launch", "deepspeed", "--hosts", "nodeA:1,nodeB:1", "--run-dir", "runs/two-launch",
        "--env", f"GLOO_SOCKET_IFNAME={IFNAME}", "--", *train_args("runs/two")]))
    out = proc.stdout + proc.stderr
    assert "--master_addr nodeA" in out and "pdsh -S -f 1024 -w nodeA,nodeB" in out, out[-3000:]
    env_file = open(work / "runs" / "two-launch" / ".deepspeed_env").read()
    assert f"GLOO_SOCKET_IFNAME={IFNAME}\n" in env_file and f"PYTHONPATH={REPO}\n" in env_file
    assert f"export GLOO_SOCKET_IFNAME={IFNAME};" in out  # what pdsh ran on each node
    # rank 1 ran on nodeB (pdsh prefixes each line with the node it came from)
    assert any(line.startswith("nodeB: ") and "rank 1/2" in line for line in out.splitlines()), out[-3000:]
    # each rank's own log in the shared run folder, named by its host (TRIME_LOG_DIR in .deepspeed_env)
    logs = work / "runs" / "two-launch" / "logs"
    assert sorted(os.listdir(logs)) == ["train-nodeA-rank0.log", "train-nodeB-rank1.log"]
    assert "rank 1/2" in (logs / "train-nodeB-rank1.log").read_text()
    summary = json.load(open(work / "runs" / "two" / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert_same_weights(work / "runs" / "one", work / "runs" / "two")


# ----------------------------------------------------------------------------- mpiexec (hydra over ssh)

def mpiexec_two_hosts(args) -> list[str]:
    """hydra's ssh launcher from nodeA: one rank on each node; the ranks' environment goes with -genv."""
    genv = [x for k, v in NODE_ENV.items() for x in ("-genv", k, v)]
    return [os.path.join(BIN, "mpiexec"), "-launcher", "ssh", "-hosts", "nodeA:1,nodeB:1", "-n", "2", *genv,
            TRIME, *map(str, args)]


def manifest_of(folder) -> dict:
    """The manifest without its timings (`seconds`, `cpu_seconds_per_rank`, ...): everything else must match."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if "seconds" not in k}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.load(open(os.path.join(folder, "manifest.json"))))


def shard_bytes(folder) -> dict:
    """sha256 of every shard file"""
    import hashlib

    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.endswith(".tar")}  # not the ranks' timing records


def test_mpiexec_prepare_and_group_two_hosts_equal_one_host(cluster, work):
    """`trime prepare` and `trime group` as 2 MPI ranks: one on each node (hydra over ssh, UCX over tcp on the
    veth) writes the same shards and manifest, byte for byte, as 2 ranks on one host."""
    prep = ["prepare", "--input", "corpus/train", "--output", "{out}", "--seq-len", "32", "--vocab-size", "300"]
    group = ["group", "--input", "{inp}", "--output", "{out}", "--method", "bm25", "--group-size", "16"]

    def fill(args, **kw):
        return [a.format(**kw) for a in args]

    timed("prepare (MPI, 2 ranks)", "one", lambda: run_trime(fill(prep, out="mpi/one/train"), ranks=2,
                                                               launcher="mpi", cwd=str(work)))
    proc = timed("prepare (MPI, 2 ranks)", "two", lambda: on_node_a(
        cluster, work, mpiexec_two_hosts(fill(prep, out="mpi/two/train"))))
    assert "over 2 ranks" in proc.stdout + proc.stderr
    # one progress source for the job (rank 0, on nodeA), in lines, not redraws (the output is not a terminal)
    bars = [line for line in (proc.stdout + proc.stderr).splitlines() if "trime_dist.core.progress" in line]
    assert all("prepare (job, est. from rank 0): " in line for line in bars), bars
    assert sum(", elapsed " in line for line in bars) == 1 and ", elapsed " in bars[-1], bars  # one final line
    assert "\r" not in proc.stdout + proc.stderr
    timed("group (MPI, 2 ranks)", "one", lambda: run_trime(fill(group, inp="mpi/one/train", out="mpi/one/grouped"),
                                                             ranks=2, launcher="mpi", cwd=str(work)))
    timed("group (MPI, 2 ranks)", "two", lambda: on_node_a(
        cluster, work, mpiexec_two_hosts(fill(group, inp="mpi/two/train", out="mpi/two/grouped"))))
    for stage in ("train", "grouped"):
        one, two = work / "mpi" / "one" / stage, work / "mpi" / "two" / stage
        assert shard_bytes(one) == shard_bytes(two), stage
        m1, m2 = manifest_of(one), manifest_of(two)
        assert json.dumps(m1, sort_keys=True).replace("mpi/one", "mpi/X") == \
            json.dumps(m2, sort_keys=True).replace("mpi/two", "mpi/X"), stage
    shards = manifest_of(work / "mpi" / "two" / "train")["shards"]
    assert [s["path"].split("-")[1] for s in shards] == ["r000", "r001"]  # both nodes wrote a share


# ----------------------------------------------------------------------------- trime launch slurm-chain

CHAIN_STEP_MINUTES = 5  # --time of every step: a step that hangs ends TIMEOUT, and the chain stops with its line


def chain_steps(run: str, train_steps: int = 3, *train_extra: str) -> list[str]:
    return [
        "prepare --input corpus/train --output data/train --seq-len 32 --vocab-size 300",
        "prepare --input corpus/valid --output data/valid --seq-len 32 --tokenizer data/train/tokenizer.json",
        "group --input data/train --output data/grouped --method bm25 --group-size 16",
        " ".join(train_args(f"{run}/out", train_steps, "objective.name=trime_ext", *train_extra)).replace(
            "data.train=data/train", "data.train=data/grouped"),
        f"datastore build --model {run}/out --data data/train --out {run}/ds",
        f"eval --model {run}/out --data data/valid --memory local external --datastore {run}/ds --k 16 "
        f"--out {run}/eval.json",
    ]


def chain_command(nodes: int, tasks_per_node: int, steps: list[str]) -> list[str]:
    return [TRIME, "launch", "slurm-chain", "--wait", "--set", f"nodes={nodes}", "--set",
            f"tasks_per_node={tasks_per_node}", "--set", "run_dir=runs/chain", "--set", f"time={CHAIN_STEP_MINUTES}",
            *[x for s in steps for x in ("--step", s)]]


def chain_folder(folder):
    """`folder` with the corpus in it (a link to the work folder's)"""
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(folder / "corpus"):
        os.symlink(folder.parent / "corpus", folder / "corpus")
    return folder


def slurm_chain(cluster, folder, nodes: int, tasks_per_node: int, steps=None):
    return on_node_a(cluster, chain_folder(folder), chain_command(nodes, tasks_per_node,
                                                                  steps or chain_steps("runs/chain")), timeout=1800)


def file_digests(folder) -> dict:
    """Every file under `folder`: json without its timings, anything else by sha256 (logs and figures left out)."""
    import hashlib

    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if name.startswith(".") or name.endswith((".log", ".png", ".jsonl")) or "tensorboard" in rel:
                continue
            if name.endswith(".json"):
                out[rel] = _strip_json(path)
            else:
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# A manifest names its inputs by absolute path (chain1/ vs chain2/ here) and holds its timings, so the hashes
# of manifests (and the datastore id made from one) differ between two folders even for identical data; every
# file they describe is compared by its bytes instead.
_PATH_HASHES = ("source_manifest_sha256", "data_manifest_sha256", "datastore_id")


def _strip_json(path):
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in _PATH_HASHES and not any(t in k for t in ("seconds", "tok_s", "per_s", "time"))}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.load(open(path)))


def same_outputs(one, two, sub) -> None:
    """file_digests of one/sub and two/sub, the folders' own names (chain1, chain2) made one."""
    a = json.dumps(file_digests(one / sub), sort_keys=True).replace(one.name, "CHAIN")
    b = json.dumps(file_digests(two / sub), sort_keys=True).replace(two.name, "CHAIN")
    assert a == b, f"{sub}: {a[:1500]}\n!=\n{b[:1500]}"


def test_slurm_chain_on_two_nodes_equals_one_node(cluster, work):
    """The whole pipeline as a `trime launch slurm-chain` on 2 nodes x 1 task (prepare and group: MPICH's mpiexec
    in the job, its proxies started by srun on both nodes; train: one rank per node, rendezvous at the first node
    of SLURM_JOB_NODELIST; datastore build; eval) gives the same shards, groups, weights, datastore and eval table as 1 node x 2 tasks."""
    one, two = work / "chain1", work / "chain2"
    timed("slurm-chain (6 steps)", "one", lambda: slurm_chain(cluster, one, nodes=1, tasks_per_node=2))
    proc = timed("slurm-chain (6 steps)", "two", lambda: slurm_chain(cluster, two, nodes=2, tasks_per_node=1))
    assert "(eval) completed" in proc.stdout, proc.stdout[-3000:]
    jobs = [json.loads(line) for line in open(two / "runs" / "chain" / "jobs.jsonl")]
    train_log = open(two / "runs" / "chain" / "logs" / f"trime-train-{jobs[3]['job_id']}.out").read()
    assert "on nodeA,nodeB" in train_log or "on node[A-B]" in train_log, train_log[-2000:]
    summary = json.load(open(two / "runs" / "chain" / "out" / "summary.json"))
    assert summary["world_size"] == 2 and summary["steps"] == 3
    for sub in ("data/train", "data/valid", "data/grouped", "runs/chain/ds"):
        same_outputs(one, two, sub)
    assert_same_weights(one / "runs" / "chain" / "out", two / "runs" / "chain" / "out")
    rows = _strip_json(two / "runs" / "chain" / "eval.json")
    assert len(rows) == 2 and rows == _strip_json(one / "runs" / "chain" / "eval.json")
