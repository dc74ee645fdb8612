"""One training step of a Hugging Face GPT-2 (through HFCausalLM, as `model.pretrained` trains it) vs the
built-in transformer of the same size: forward + TRIME trime_ext loss + backward, same batch, same weights.

    .venv/bin/python benchmarks/bench_hf.py                      # 4 layers, d=256, 4 heads, seq 128, batch 8

The GPT-2 holds the built-in model's weights (trime_dist/model/gpt2_map.py), so both compute the same
loss (checked); the two are timed in interleaved rounds in one process (machines are noisy). Prints a
table with the ratio built-in time / HF time (target >= 0.9: the HF path is at most ~10% slower).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trime_dist.model.config import ModelConfig  # noqa: E402
from trime_dist.model.gpt2_map import build_gpt2  # noqa: E402
from trime_dist.model.hf import HFCausalLM  # noqa: E402
from trime_dist.model.transformer import build_model  # noqa: E402
from trime_dist.train.batch import Batch  # noqa: E402
from trime_dist.train.loss import LossSpec, micro_batch_loss  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    return p.parse_args()


def make_batch(B: int, T: int, V: int) -> Batch:
    """B segments of one stream [B, T], each its own row: trime_ext's memory is the whole batch."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, T + 1), generator=gen)
    return Batch(input_ids=tokens[:, :-1], targets=tokens[:, 1:], stream=torch.zeros(B, dtype=torch.long),
                 stream_index=torch.arange(B), row=torch.arange(B), group_tokens=B * T)


def step(model, batch: Batch, spec: LossSpec) -> float:
    """forward + trime_ext loss (local + every other segment of the batch) + backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    logits, keys = model(batch.input_ids)
    out = micro_batch_loss(logits, keys, batch, spec, "external", use_local=True)
    out.loss.backward()
    return float(out.loss.detach())


def timed(model, batch, spec, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step(model, batch, spec)
    return (time.perf_counter() - start) / steps


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(vocab_size=args.vocab, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                      d_ffn=4 * args.d_model, max_seq_len=args.seq)
    builtin = build_model(cfg, seed=0).train()
    hf = HFCausalLM(build_gpt2(builtin.state_dict(), cfg), cfg).train()
    print(f"HF attention implementation: {hf.hf_model.config._attn_implementation}")
    models = {"built-in TransformerLM": builtin, "HF GPT2LMHeadModel (HFCausalLM)": hf}
    batch, spec = make_batch(args.batch, args.seq, args.vocab), LossSpec(layout="external", gather=True)
    losses = {name: step(m, batch, spec) for name, m in models.items()}
    assert abs(losses["built-in TransformerLM"] - losses["HF GPT2LMHeadModel (HFCausalLM)"]) < 1e-4, losses
    for m in models.values():
        timed(m, batch, spec, args.warmup)
    times = {name: [] for name in models}
    order = list(models)
    for _ in range(args.rounds):
        for name in order:  # ABBA order: a drifting machine load weighs on both alike
            times[name].append(timed(models[name], batch, spec, args.steps))
        order.reverse()
    report(args, cfg, losses, {name: statistics.median(t) for name, t in times.items()})


def report(args, cfg, losses, med):
    print(f"\nOne training step (forward + trime_ext loss + backward), {cfg.n_layers} layers, d={cfg.d_model}, "
          f"{cfg.n_heads} heads, FFN {cfg.d_ffn}, V={cfg.vocab_size}, batch {args.batch} x {args.seq} tokens, fp32, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':<36}{'ms/step':>10}{'tokens/s':>12}{'loss':>10}")
    for name, t in med.items():
        print(f"{name:<36}{t * 1e3:>10.1f}{args.batch * args.seq / t:>12.0f}{losses[name]:>10.4f}")
    ratio = med["built-in TransformerLM"] / med["HF GPT2LMHeadModel (HFCausalLM)"]
    print(f"\nbuilt-in time / HF time: {ratio:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
