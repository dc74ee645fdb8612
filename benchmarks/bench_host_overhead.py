"""Host (CPU) time per optimizer step: `trime train`'s step against a bare torch loop (issue 21).

The 247M config's parameter layout (configs/wt103_247m.yaml: 16 blocks, 196 tensors of the same roles)
at width 64 with 16-token segments, one rank, CE: the compute is negligible, so what is timed is the
Python / DeepSpeed work per step that sets the pace on a GPU. For each ZeRO stage, precision and
gradient accumulation, `train_step` (trime_dist/train/loop.py) with the engine built as
trime_dist/train/engine.py builds it, against a bare loop over the same model: torch AdamW, clipping,
the loss ÷ accumulation, no DeepSpeed. All variants run in interleaved rounds (noisy machines) and
each reports the median over its timed steps; ratio = trime ÷ bare on process CPU time (wall in JSON).
Each ZeRO stage runs in a process of its own with its own bare loop (--one-process: all in one): a ZeRO-3
engine changes the whole process (torch.nn.functional.linear, ~15% on every other model in it).
ZeRO-3 partitions the tensors the real width partitions (--no-scaled-persistence: DeepSpeed's default): its
stage3_param_persistence_threshold (1e5 elements: a smaller tensor stays gathered on every rank) scaled by
(64 / the config's d_model)^2, so the block matrices and embeddings are partitioned and the vectors persistent,
as at d 1024; at width 64 with the default every tensor would be persistent (nothing gathered or released).

    python benchmarks/bench_host_overhead.py [--stages 0,1,2,3] [--precisions fp32,bf16_autocast] \
        [--accums 1,6] [--rounds 5] [--steps 10] [--stock] [--out runs/benchmarks/host_overhead.json]

Batches are pre-built tensors (the same for both), so the loader is not in either number. On a GPU
machine both run on the GPU (benchmarks/gpu/check.sh runs it there), each step ends with a synchronize
(so wall time is the step's) and the host's share is the CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trime_dist.core.config import load_config  # noqa: E402
from trime_dist.core.constants import IGNORE_INDEX  # noqa: E402
from trime_dist.core.device import bf16_autocast  # noqa: E402
from trime_dist.model.transformer import build_model  # noqa: E402
from trime_dist.train.batch import Batch  # noqa: E402
from trime_dist.train import deepspeed_fastpath  # noqa: E402
from trime_dist.train.config import TrainConfig  # noqa: E402
from trime_dist.train.engine import build_engine, build_optimizer, init_deepspeed_distributed, param_groups  # noqa: E402
from trime_dist.train.loop import TrainState, train_step  # noqa: E402
from trime_dist.train.loss import build_loss_spec  # noqa: E402

SEQ, VOCAB, N_BATCHES, WIDTH = 16, 256, 8, 64
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (0.19.8)
# the 247M layout, narrow: 16 blocks, d 64, FFN 4 x d, segments of 16 tokens
SHAPE = [f"model.d_model={WIDTH}", "model.n_heads=8", "model.d_ffn=256", f"model.max_seq_len={SEQ}",
         f"model.vocab_size={VOCAB}", "data.micro_batch_size=1", "objective.name=ce", "data.train=unused",
         "data.valid=", "run.max_steps=1000000", "optim.warmup_steps=1"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs/wt103_247m.yaml"))
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--precisions", default="fp32,bf16_autocast")
    p.add_argument("--accums", default="1,6")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the rounds")
    p.add_argument("--out", default=os.path.join(REPO, "runs/benchmarks/host_overhead.json"))
    p.add_argument("--stock", action="store_true", help="also time each ZeRO stage with DeepSpeed's own methods "
                   "(train/deepspeed_fastpath.py uninstalled), interleaved: before/after side by side")
    p.add_argument("--ds-extra", default="{}", help="JSON merged into every engine's DeepSpeed config "
                   "(deepspeed.extra), e.g. to try ZeRO settings")
    p.add_argument("--one-process", action="store_true", help="every stage in this process (default: one "
                   "process per ZeRO stage, each with its own bare loop: a ZeRO-3 engine changes the process "
                   "for every model in it, torch.nn.functional.linear included)")
    p.add_argument("--no-scaled-persistence", dest="scaled_persistence", action="store_false",
                   help="ZeRO-3 with DeepSpeed's default persistence threshold (at width 64: every tensor "
                   "persistent, nothing partitioned) instead of the threshold scaled to the real width's layout")
    p.add_argument("overrides", nargs="*", help="more a.b=c config overrides (for every variant)")
    return p.parse_args()


def make_cfg(args, stage: int, precision: str, accum: int) -> TrainConfig:
    cfg = load_config(TrainConfig, args.config, [*SHAPE, f"data.global_batch_size={accum}",
                                                 f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                                                 *args.overrides])
    if stage == 3 and args.scaled_persistence:
        cfg.deepspeed.extra["zero_optimization"] = {"stage3_param_persistence_threshold": scaled_threshold(args)}
    cfg.deepspeed.extra = _merge(cfg.deepspeed.extra, json.loads(args.ds_extra))
    return cfg


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def real_width(args) -> int:
    return load_config(TrainConfig, args.config, ["data.train=unused", *args.overrides]).model.d_model


def scaled_threshold(args) -> int:
    """The persistence threshold for width 64 that keeps the same tensors persistent as the default does at
    the config's width: a matrix's numel scales with the width squared, a vector's with the width."""
    return int(PERSISTENCE_THRESHOLD * (WIDTH / real_width(args)) ** 2)


def check_partitioned_layout(args) -> dict:
    """Which tensors ZeRO-3 partitions: the config's model (on the meta device, default threshold) against
    this benchmark's narrow one (scaled threshold). Raises when they differ."""
    real = load_config(TrainConfig, args.config, ["data.train=unused", f"model.vocab_size={VOCAB}",
                                                  *args.overrides]).model
    narrow = load_config(TrainConfig, args.config, [*SHAPE, *args.overrides]).model
    real.max_seq_len = max(real.max_seq_len, SEQ)
    with torch.device("meta"):
        big = {n for n, p in build_model(real).named_parameters() if p.numel() > PERSISTENCE_THRESHOLD}
    small_model = build_model(narrow, seed=0)
    small = {n for n, p in small_model.named_parameters() if p.numel() > scaled_threshold(args)}
    if big != small:
        raise SystemExit(f"scaled persistence threshold partitions {sorted(small ^ big)} differently")
    return {"partitioned": len(small), "persistent": len(list(small_model.parameters())) - len(small),
            "threshold": scaled_threshold(args)}


def make_batches(cfg: TrainConfig) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(N_BATCHES):
        tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
        z = torch.zeros(1, dtype=torch.long)
        out.append(Batch(tokens[:, :-1], tokens[:, 1:], z, z + i, z, group_tokens=SEQ))
    return out


def cycle(batches):
    while True:
        for b in batches:
            yield b, 0


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Timed:
    """One variant: `run(n)` does n optimizer steps and keeps each one's (cpu_s, wall_s)."""

    def __init__(self):
        self.cpu, self.wall = [], []

    def run(self, steps: int, keep: bool = True) -> None:
        for _ in range(steps):
            c0, w0 = time.process_time(), time.perf_counter()
            self.step()
            synchronize()
            if keep:
                self.cpu.append(time.process_time() - c0)
                self.wall.append(time.perf_counter() - w0)


class TrimeStep(Timed):
    def __init__(self, cfg: TrainConfig, batches, stock: bool = False):
        super().__init__()
        self.cfg, self.spec, self.state = cfg, build_loss_spec(cfg), TrainState()
        self.engine = build_engine(build_model(cfg.model, seed=0), cfg, 1)
        if stock:
            deepspeed_fastpath.uninstall(self.engine.optimizer)
        self.batches = cycle(batches)

    def step(self):
        train_step(self.engine, self.batches, self.cfg, self.spec, self.state, 1, self.engine.device)


class BareStep(Timed):
    """What a user writes without the framework (nanoGPT's loop): forward, CE ÷ accum, backward, clip, AdamW."""

    def __init__(self, cfg: TrainConfig, batches):
        super().__init__()
        self.model = build_model(cfg.model, seed=0).to(DEVICE).train()
        self.opt = build_optimizer(param_groups(self.model, cfg.optim.weight_decay), cfg.optim)
        self.accum, self.clip = cfg.data.global_batch_size, cfg.optim.grad_clip
        self.autocast = cfg.deepspeed.precision == "bf16_autocast"
        self.batches = cycle(batches)

    def step(self):
        for _ in range(self.accum):
            batch, _ = next(self.batches)
            batch = batch.to(DEVICE, non_blocking=True)
            with bf16_autocast(DEVICE, self.autocast):
                logits, _ = self.model(batch.input_ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
            (loss / self.accum).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main():
    args = parse_args()
    stages = args.stages.split(",")
    if len(stages) > 1 and not args.one_process:
        return main_process_per_stage(args, stages)
    init_deepspeed_distributed()
    torch.set_num_threads(1)
    stages = [int(s) for s in args.stages.split(",")]
    if 3 in stages and args.scaled_persistence:
        print(f"ZeRO-3 layout: {check_partitioned_layout(args)}", flush=True)
    precisions, accums = args.precisions.split(","), [int(a) for a in args.accums.split(",")]
    variants = {}
    for precision in precisions:
        for accum in accums:
            cfg = make_cfg(args, 0, precision, accum)
            batches = make_batches(cfg)
            variants[("bare", precision, accum)] = BareStep(cfg, batches)
            for stage in stages:
                variants[(stage, precision, accum)] = TrimeStep(make_cfg(args, stage, precision, accum), batches)
                if args.stock and stage > 0:
                    variants[("stock", stage, precision, accum)] = TrimeStep(
                        make_cfg(args, stage, precision, accum), batches, stock=True)
    n_tensors = len(list(next(iter(variants.values())).model.parameters()))
    for v in variants.values():
        v.run(args.warmup, keep=False)
    for r in range(args.rounds):
        # alternate the order each round so that no variant always follows the same one
        for key in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            variants[key].run(args.steps)
    report(args, variants, stages, precisions, accums, n_tensors)


def main_process_per_stage(args, stages: list[str]) -> None:
    """Each ZeRO stage in a process of its own (this script with --stages S --one-process), its rounds
    interleaved with its own bare loop; the rows joined into one table."""
    import subprocess
    import tempfile

    rows, n_tensors = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for stage in stages:
            out = os.path.join(tmp, f"zero{stage}.json")
            # (argparse keeps the last of a repeated option: these override the caller's --stages / --out)
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one-process", "--stages", stage,
                   "--out", out]
            print(f"== ZeRO-{stage}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                result = json.load(f)
            rows += result["rows"]
            n_tensors = result["tensors"]
    order = {p: i for i, p in enumerate(args.precisions.split(","))}
    rows.sort(key=lambda r: (order[r["precision"]], r["accum"], r["zero_stage"]))
    print_table(args, rows, n_tensors, "one process per ZeRO stage, each with its own bare loop")
    write_json(args, rows, n_tensors)


def report(args, variants, stages, precisions, accums, n_tensors):
    med = {k: {"cpu_ms": 1e3 * statistics.median(v.cpu), "wall_ms": 1e3 * statistics.median(v.wall)}
           for k, v in variants.items()}
    rows = []
    for precision in precisions:
        for accum in accums:
            bare = med[("bare", precision, accum)]
            for stage in stages:
                t = med[(stage, precision, accum)]
                rows.append({"zero_stage": stage, "precision": precision, "accum": accum,
                             "bare_cpu_ms": bare["cpu_ms"], "trime_cpu_ms": t["cpu_ms"],
                             "ratio": t["cpu_ms"] / bare["cpu_ms"], "bare_wall_ms": bare["wall_ms"],
                             "trime_wall_ms": t["wall_ms"], "wall_ratio": t["wall_ms"] / bare["wall_ms"]})
                stock = med.get(("stock", stage, precision, accum))
                if stock is not None:
                    rows[-1].update(stock_cpu_ms=stock["cpu_ms"], stock_ratio=stock["cpu_ms"] / bare["cpu_ms"])
    print_table(args, rows, n_tensors, "all stages in one process")
    write_json(args, rows, n_tensors)


def print_table(args, rows: list[dict], n_tensors: int, how: str) -> None:
    print(f"\nHost time per optimizer step, {n_tensors} tensors (16 blocks, d 64, {SEQ}-token segments, CE, one "
          f"rank); median of {args.rounds} interleaved rounds x {args.steps} steps after {args.warmup} warm-up; "
          f"{how}; process CPU time (wall in the last column's ratio). ZeRO-3 persistence threshold: "
          f"{scaled_threshold(args) if args.scaled_persistence else PERSISTENCE_THRESHOLD}"
          f"{' (scaled: the real width layout)' if args.scaled_persistence else ' (default: all persistent at d 64)'}. "
          f"Target: ratio <= 1.10\n")
    stock_cols = ("| stock DeepSpeed ms | stock ratio ", "|---:|---:") if args.stock else ("", "")
    print(f"| ZeRO | precision | accum | bare ms {stock_cols[0]}| trime ms | ratio | wall ratio |")
    print(f"|---:|---|---:|---:{stock_cols[1]}|---:|---:|---:|")
    for row in rows:
        stock = ""
        if args.stock:
            stock = (f"{row['stock_cpu_ms']:.1f} | {row['stock_ratio']:.2f} | " if "stock_cpu_ms" in row else
                     "- | - | ")
        print(f"| {row['zero_stage']} | {row['precision']} | {row['accum']} | {row['bare_cpu_ms']:.1f} | {stock}"
              f"{row['trime_cpu_ms']:.1f} | {row['ratio']:.2f} | {row['wall_ratio']:.2f} |")


def write_json(args, rows: list[dict], n_tensors: int) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "rounds": args.rounds, "scaled_persistence": args.scaled_persistence, "steps": args.steps, "warmup": args.warmup,
                   "tensors": n_tensors, "torch": torch.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count(), "load": os.getloadavg(),
                   "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"}, f, indent=2)
    print(f"\n{args.out}")


if __name__ == "__main__":
    main()
