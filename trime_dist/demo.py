"""`trime demo`: the whole pipeline on the built-in corpus, on CPU with 2 ranks, ending in a table.

Every stage runs as the command a user would type (printed before it runs), so the demo doubles
as a worked example. Stages whose outputs are complete are skipped, so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from trime_dist.core.config import opt
from trime_dist.core.io import atomic_write_json
from trime_dist.core.stages import env_bin


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "directory for the corpus, shards, runs and results")
    ranks: int = opt(2, "ranks for every distributed stage")
    steps: int = opt(300, "optimizer steps per training run")
    config: Optional[str] = opt(None, "training config (default: configs/tiny.yaml of the repo)", metavar="FILE")
    seed: int = opt(1234, "corpus and training seed")
    scale: float = opt(1.0, "corpus size multiplier")
    fresh: bool = opt(False, "delete --out first instead of resuming")
    factory: str = opt("IVF256,PQ32", "faiss index of the demo datastores")
    k: int = opt(256, "neighbours retrieved per token in external memory")
    corpus: str = opt("", "a folder with train/, valid/ and test/ text files to use instead of the built-in corpus "
                      "(benchmarks/quality runs the pipeline on real text this way)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.core.flags import add_dataclass_flags

    add_dataclass_flags(parser, DemoConfig, config_file=False)  # --config here is the training config


def run_stage(title: str, cmd: list[str], done_marker: str | None = None, env: dict | None = None) -> float:
    """Print and run one stage's command; skip it when its completion marker exists."""
    if done_marker and os.path.exists(done_marker):
        print(f"\n== {title}: done already ({done_marker})", flush=True)
        return 0.0
    prefix = "".join(f"{k}={v} " for k, v in (env or {}).items())
    print(f"\n== {title}\n$ {prefix}{shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    full_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    TOKENIZERS_PARALLELISM="false", **(env or {}))
    subprocess.run(cmd, check=True, env=full_env)
    return time.perf_counter() - start


def default_config() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "configs", "tiny.yaml")


def train_cmd(cfg: DemoConfig, name: str, objective: str, train_dir: str, extra: list[str] = ()) -> list[str]:
    out = os.path.join(cfg.out, "runs", name)
    overrides = [f"objective.name={objective}", f"data.train={train_dir}",
                 f"data.valid={os.path.join(cfg.out, 'data', 'valid')}", f"run.out_dir={out}",
                 f"run.max_steps={cfg.steps}", f"run.seed={cfg.seed}", *extra]
    return [env_bin("deepspeed"), "--num_gpus", str(cfg.ranks), "--master_port", str(_port()),
            env_bin("trime"), "train", "--config", cfg.config or default_config(), *overrides]


def _port() -> int:
    from trime_dist.core.launch_env import free_port

    return free_port()


def run(args: argparse.Namespace) -> int:
    from trime_dist.core.flags import dataclass_from_flags

    cfg = dataclass_from_flags(DemoConfig, args)
    if cfg.fresh and os.path.isdir(cfg.out):
        import shutil

        shutil.rmtree(cfg.out)
    data = os.path.join(cfg.out, "data")
    corpus = os.path.join(cfg.out, "corpus")
    mpi = [env_bin("mpiexec"), "-n", str(cfg.ranks)]
    if cfg.corpus:
        corpus = cfg.corpus
        missing = [s for s in ("train", "valid", "test") if not os.path.isdir(os.path.join(corpus, s))]
        if missing:
            raise ValueError(f"--corpus {corpus}: expected folders train/, valid/ and test/ (missing: {', '.join(missing)})")
    else:
        run_stage("built-in corpus", [env_bin("trime"), "corpus", "--out", corpus, "--seed", str(cfg.seed),
                                      "--scale", str(cfg.scale)], os.path.join(corpus, "corpus.json"))
    run_stage("prepare train split (BPE tokenizer trained here)",
              mpi + [env_bin("trime"), "prepare", "--input", os.path.join(corpus, "train"), "--output",
                     os.path.join(data, "train"), "--seq-len", "128", "--vocab-size", "2000"],
              os.path.join(data, "train", "manifest.json"))
    for split in ("valid", "test"):
        run_stage(f"prepare {split} split (same tokenizer)",
                  mpi + [env_bin("trime"), "prepare", "--input", os.path.join(corpus, split), "--output",
                         os.path.join(data, split), "--seq-len", "128",
                         "--tokenizer", os.path.join(data, "train", "tokenizer.json")],
                  os.path.join(data, split, "manifest.json"))
    group_size = str(cfg.ranks * 8)  # ranks x data.micro_batch_size of configs/tiny.yaml
    run_stage("group train segments by BM25 similarity (external memory batches)",
              mpi + [env_bin("trime"), "group", "--input", os.path.join(data, "train"), "--output",
                     os.path.join(data, "train_bm25"), "--method", "bm25", "--group-size", group_size],
              os.path.join(data, "train_bm25", "manifest.json"))
    runs = {
        "ce": train_cmd(cfg, "ce", "ce", os.path.join(data, "train")),
        "trime_local": train_cmd(cfg, "trime_local", "trime_local", os.path.join(data, "train")),
        # prepared shards are in stream order, so each group holds consecutive segments
        "trime_long": train_cmd(cfg, "trime_long", "trime_long", os.path.join(data, "train"),
                                ["data.placement=interleaved", "data.shuffle_shards=false"]),
        "trime_ext": train_cmd(cfg, "trime_ext", "trime_ext", os.path.join(data, "train_bm25")),
    }
    for name, cmd in runs.items():
        run_stage(f"train {name} with {cfg.ranks} DeepSpeed ranks", cmd,
                  os.path.join(cfg.out, "runs", name, "summary.json"))
    print_training_table(cfg.out, list(runs))
    hf_dir = os.path.join(cfg.out, "exports", "trime_ext_hf")
    run_stage("export the TrimeLM_ext model as a Hugging Face folder (AutoModelForCausalLM loads it)",
              [env_bin("trime"), "export", os.path.join(cfg.out, "runs", "trime_ext"), "--format", "hf",
               "--out", hf_dir], os.path.join(hf_dir, "config.json"))
    # The kNN-LM baseline needs keys from the CE model: a datastore is tied to the model that built it.
    for name in ("trime_ext", "ce"):
        store = os.path.join(cfg.out, "datastore", name)
        run_stage(f"datastore of the {name} model over the training set ({cfg.ranks} ranks)",
                  mpi + [env_bin("trime"), "datastore", "build", "--model", os.path.join(cfg.out, "runs", name),
                         "--data", os.path.join(data, "train"), "--out", store, "--factory", cfg.factory,
                         "--threads", "1"],
                  os.path.join(store, "datastore.json"), env={"MASTER_PORT": str(_port())})
    run_stage("evaluate every model and memory setting on the held-out test documents", eval_cmd(cfg, data),
              os.path.join(cfg.out, "eval.json"))
    print_eval_table(os.path.join(cfg.out, "eval.json"))
    sweep = os.path.join(cfg.out, "sweep.json")
    run_stage("TrimeLM_long's test perplexity against its long-memory size (one pass, --sweep)",
              [env_bin("trime"), "eval", "--model", os.path.join(cfg.out, "runs", "trime_long"), "--data",
               os.path.join(data, "test"), "--setting", "name=TrimeLM_long,memory=long",
               "--sweep", "mem_size=0,128,512,2048", "--threads", "1", "--out", sweep], sweep)
    report = os.path.join(cfg.out, "report")
    run_stage("a report: result tables, training curves, perplexity against memory size and tau",
              [env_bin("trime"), "report", os.path.join(cfg.out, "runs"), os.path.join(cfg.out, "eval.json"), sweep,
               "--out", report], os.path.join(report, "report.md"))
    print(f"\nreport: {os.path.join(report, 'report.md')} (open it in a Markdown viewer; figures beside it)")
    return 0


def eval_cmd(cfg: DemoConfig, data: str) -> list[str]:
    """One `trime eval` with a row per (model, memory) setting; τ, and the interpolation's λ and kNN temperature,
    tuned on the validation split."""
    run, store = (lambda n: os.path.join(cfg.out, "runs", n)), (lambda n: os.path.join(cfg.out, "datastore", n))
    settings = [
        f"name=CE,model={run('ce')},memory=none",
        f"name=kNN-LM,model={run('ce')},memory=none,datastore={store('ce')},knn_lambda=0.25",
        f"name=TrimeLM,model={run('trime_local')},memory=local",
        f"name=TrimeLM_long,model={run('trime_long')},memory=long",
        f"name=TrimeLM_ext,model={run('trime_ext')},memory=external,datastore={store('trime_ext')}",
        f"name=TrimeLM_ext+kNN,model={run('trime_ext')},memory=external,datastore={store('trime_ext')},"
        "knn_lambda=0.25",
        # the store through the interpolation only: at this scale its neighbours in the softmax hurt (RESULTS.md,
        # "External memory must help"), while the separately calibrated kNN distribution helps
        f"name=TrimeLM_ext long+kNN,model={run('trime_ext')},memory=long,datastore={store('trime_ext')},"
        "knn_lambda=0.25",
    ]
    return [env_bin("trime"), "eval", "--data", os.path.join(data, "test"), "--valid", os.path.join(data, "valid"),
            "--tau-search", "1.0,1.25,1.5", "--lambda-search", "0.1,0.25,0.5,0.75",
            "--knn-temperature-search", "1,3,10,30", "--k", str(cfg.k), "--nprobe", "16", "--mem-size", "1024",
            "--threads", "1", "--out", os.path.join(cfg.out, "eval.json"),
            *[a for s in settings for a in ("--setting", s)]]


def print_training_table(out: str, names: list[str]) -> None:
    """Validation perplexity at the start and the end of each run; written to results.json too."""
    rows = []
    for name in names:
        with open(os.path.join(out, "runs", name, "summary.json")) as f:
            summary = json.load(f)
        start, final = summary.get("start") or {}, summary["final"]
        rows.append({"run": name, "steps": summary["steps"],
                     "start_ppl": start.get("valid_ce_ppl"), "final_ce_ppl": final["valid_ce_ppl"],
                     "final_memory_ppl": final["valid_memory_ppl"]})
    atomic_write_json(os.path.join(out, "results.json"), rows)
    print("\nValidation perplexity (built-in corpus, held-out documents)")
    print(f"{'run':<14}{'steps':>7}{'start':>10}{'no memory':>12}{'with memory':>13}")
    for r in rows:
        print(f"{r['run']:<14}{r['steps']:>7}{r['start_ppl'] or float('nan'):>10.2f}"
              f"{r['final_ce_ppl']:>12.2f}{r['final_memory_ppl']:>13.2f}")
    print(f"\n(written to {os.path.join(out, 'results.json')})")


def print_eval_table(eval_json: str) -> int:
    """The final table: test perplexity of each model under its memory setting."""
    with open(eval_json) as f:
        rows = json.load(f)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    print("\nTest perplexity (built-in corpus, held-out documents)")
    print(f"{'setting':<24}{'memory':<10}{'ppl':>9}{'tau':>7}{'k':>6}{'lambda':>8}")
    for r in rows:
        print(f"{r['name']:<24}{r['memory']:<10}{r['ppl']:>9.2f}{r.get('temperature', 1.0):>7.2f}"
              f"{r.get('k') or '-':>6}{r.get('knn_lambda') or '-':>8}")
    print(f"\n(written to {eval_json})")
    return 0
