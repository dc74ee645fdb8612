"""Training-step throughput: TRIME objectives vs plain CE, and `trime train`'s step vs a bare DeepSpeed loop.

Run under the DeepSpeed launcher so the numbers are for real ranks:

    deepspeed --num_gpus 2 benchmarks/bench_train.py --data runs/demo/data/train

All variants are measured in one run, in interleaved rounds (machines are noisy), with the same
model size, micro-batch, ZeRO stage and data. Prints a table (rank 0) and writes JSON next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trime_dist.core.config import load_config  # noqa: E402
from trime_dist.core.constants import IGNORE_INDEX  # noqa: E402
from trime_dist.core.distributed import get_rank, get_world_size  # noqa: E402
from trime_dist.model.transformer import build_model  # noqa: E402
from trime_dist.train.config import TrainConfig  # noqa: E402
from trime_dist.train.engine import build_engine, init_deepspeed_distributed  # noqa: E402
from trime_dist.train.loader import RankLoader, ShardDataset  # noqa: E402
from trime_dist.train.loop import TrainState, train_step  # noqa: E402
from trime_dist.train.loss import build_loss_spec  # noqa: E402

VARIANTS = {  # name -> config overrides
    "ce": ["objective.name=ce"],
    "trime_local": ["objective.name=trime_local"],
    "trime_long (interleaved, gathered)": ["objective.name=trime_long", "data.placement=interleaved"],
    "trime_long (contiguous, no comm)": ["objective.name=trime_long", "data.placement=contiguous"],
    "trime_ext (gathered)": ["objective.name=trime_ext", "objective.cross_sent_ratio=0.9"],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=os.path.join(REPO, "runs/demo/data/train"))
    p.add_argument("--config", default=os.path.join(REPO, "configs/tiny.yaml"))
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=os.path.join(REPO, "runs/benchmarks/train.json"))
    p.add_argument("overrides", nargs="*")
    args, _ = p.parse_known_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    return args


def make_cfg(args, extra) -> TrainConfig:
    cfg = load_config(TrainConfig, args.config, [f"data.train={args.data}", "data.valid=", "run.max_steps=100000",
                                                 "optim.warmup_steps=1", *args.overrides, *extra])
    return cfg


class Variant:
    """An engine + loader for one configuration; `run(n)` times n optimizer steps."""

    def __init__(self, cfg: TrainConfig, bare: bool = False):
        world = get_world_size()
        data = ShardDataset(cfg.data.train, world * cfg.data.micro_batch_size, shuffle_shards=False)
        cfg.model.vocab_size = cfg.model.vocab_size or int(data.manifest["tokenizer"]["vocab_size"])
        self.cfg, self.bare = cfg, bare
        self.spec = build_loss_spec(cfg)
        self.engine = build_engine(build_model(cfg.model, seed=0), cfg, world)
        self.batches = iter(RankLoader(data, get_rank(), world, cfg.data.placement))
        self.state = TrainState()
        # the bare loop trains on pre-loaded tensors: no loader, no objective plumbing, no metrics
        self.fixed = [next(self.batches)[0] for _ in range(4)] if bare else None

    def run(self, steps: int) -> float:
        """Tokens per second (all ranks) over `steps` optimizer steps."""
        torch.distributed.barrier()
        start, tokens = time.perf_counter(), 0
        for i in range(steps):
            if self.bare:
                tokens += self._bare_step(self.fixed[i % len(self.fixed)])
            else:
                tokens += train_step(self.engine, self.batches, self.cfg, self.spec, self.state,
                                     get_world_size(), self.engine.device)["tokens"]
        torch.distributed.barrier()
        return tokens / (time.perf_counter() - start)

    def _bare_step(self, batch) -> int:
        accum = self.engine.gradient_accumulation_steps()
        n = 0
        for _ in range(accum):
            logits, _ = self.engine(batch.input_ids)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
            self.engine.backward(loss)
            self.engine.step()
            n += batch.n_tokens
        t = torch.tensor([n], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return int(t)


def main():
    args = parse_args()
    init_deepspeed_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    variants = {name: Variant(make_cfg(args, extra)) for name, extra in VARIANTS.items()}
    variants["bare DeepSpeed loop (CE)"] = Variant(make_cfg(args, ["objective.name=ce"]), bare=True)
    for v in variants.values():
        v.run(args.warmup)
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            results[name].append(v.run(args.steps))
    if get_rank() == 0:
        report(args, variants, results)


def report(args, variants, results):
    med = {name: statistics.median(r) for name, r in results.items()}
    cfg = variants["ce"].cfg
    print(f"\nTraining throughput, {get_world_size()} ranks, model {cfg.model.n_layers}L d={cfg.model.d_model} "
          f"V={cfg.model.vocab_size}, micro-batch {cfg.data.micro_batch_size} x {cfg.model.max_seq_len}, "
          f"global batch {cfg.data.global_batch_size}, ZeRO {cfg.deepspeed.zero_stage}; median of {args.rounds} "
          f"rounds x {args.steps} steps")
    print(f"{'variant':<38}{'tokens/s':>12}{'CE / variant':>14}")
    for name, value in med.items():
        print(f"{name:<38}{value:>12.0f}{med['ce'] / value:>14.3f}")
    print(f"\ntrime train (CE) / bare DeepSpeed loop: {med['ce'] / med['bare DeepSpeed loop (CE)']:.3f} "
          "(target >= 0.95)")
    print(f"trime_local overhead (CE time / ... ): step-time ratio {med['ce'] / med['trime_local']:.3f} "
          "(target <= 1.10)")
    print(f"trime_ext gathered step-time ratio vs CE: {med['ce'] / med['trime_ext (gathered)']:.3f} (target <= 1.15)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"tokens_per_s": med, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
