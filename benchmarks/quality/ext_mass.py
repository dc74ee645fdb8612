"""Where TrimeLM_ext's probability mass goes at test time: the share of the one softmax that falls on the
in-context memory (local + long cache) and on the retrieved neighbours, and how much of each share is on the
target (its precision). Prints a table per datastore.

  python benchmarks/quality/ext_mass.py --model runs/quality/runs/trime_ext --data runs/quality/data/test \
      --datastore runs/quality/datastore/trime_ext [--datastore ...] --k 256 --temperature 1.5
"""
from __future__ import annotations

import argparse
import math

import torch

from trime_dist.core import shards
from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.datastore.store import open_datastore
from trime_dist.eval.evaluate import forward_windows
from trime_dist.eval.memory import KeyCache
from trime_dist.eval.windows import iter_windows
from trime_dist.model.export import load_model


def masses(model, data: str, store, k: int, tau: float, mem_size: int, nprobe: int) -> dict:
    manifest = shards.read_manifest(data)
    cache, stream = KeyCache(mem_size), None
    sums = {"vocab": 0.0, "memory": 0.0, "ext": 0.0, "memory_on_target": 0.0, "ext_on_target": 0.0,
            "target_in_ext": 0.0, "target_in_memory": 0.0, "n": 0}
    for w in iter_windows(data, manifest, int(manifest["seq_len"])):
        if w.stream != stream:
            cache.reset()
            stream = w.stream
        logits, keys, targets = (x[0, :w.length] for x in forward_windows(model, [w], 0))   # [n, V], [n, D], [n]
        n, D = keys.shape
        c_keys, c_labels = cache.memory(w.start, mem_size)
        mem_keys = keys if c_keys is None else torch.cat([c_keys, keys])                      # [m + n, D]
        mem_labels = targets if c_keys is None else torch.cat([c_labels, targets])
        m = len(mem_labels) - n
        allowed = torch.cat([torch.ones(n, m, dtype=torch.bool), torch.ones(n, n).tril(-1).bool()], 1)
        allowed &= (mem_labels != IGNORE_INDEX)[None, :]
        scale = 1.0 / (math.sqrt(D) * tau)
        mem_s = (keys @ mem_keys.T * scale).masked_fill(~allowed, float("-inf"))              # [n, m + n]
        ext_s, _, ext_labels = store.search_tensor(keys, k, nprobe)                           # [n, k]
        ext_s = (ext_s * scale).masked_fill(ext_labels == IGNORE_INDEX, float("-inf"))
        z = torch.logsumexp(torch.cat([logits, mem_s, ext_s], 1), 1, keepdim=True)            # [n, 1]
        ok = targets != IGNORE_INDEX
        tgt = targets.clamp(min=0)[:, None]
        p_vocab, p_mem, p_ext = (torch.exp(x - z) for x in (logits, mem_s, ext_s))
        on_mem, on_ext = mem_labels[None, :] == tgt, ext_labels == tgt
        sums["vocab"] += float(p_vocab.sum(1)[ok].sum())
        sums["memory"] += float(p_mem.sum(1)[ok].sum())
        sums["ext"] += float(p_ext.sum(1)[ok].sum())
        sums["memory_on_target"] += float((p_mem * on_mem).sum(1)[ok].sum())
        sums["ext_on_target"] += float((p_ext * on_ext).sum(1)[ok].sum())
        sums["target_in_ext"] += float(on_ext.any(1)[ok].sum())
        sums["target_in_memory"] += float((on_mem & allowed).any(1)[ok].sum())
        sums["n"] += int(ok.sum())
        cache.push(keys, targets, w.start + torch.arange(n))
    n = sums.pop("n")
    out = {key: v / n for key, v in sums.items()}
    out["memory_precision"] = out["memory_on_target"] / max(out["memory"], 1e-12)
    out["ext_precision"] = out["ext_on_target"] / max(out["ext"], 1e-12)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--datastore", action="append", required=True)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--mem-size", type=int, default=1024)
    args = p.parse_args()
    model, info = load_model(args.model)
    cols = ("vocab", "memory", "ext", "memory_precision", "ext_precision", "target_in_memory", "target_in_ext")
    print(f"{'datastore':<48}" + "".join(f"{c:>18}" for c in cols))
    for path in args.datastore:
        store = open_datastore(path)
        with torch.inference_mode():
            r = masses(model, args.data, store, args.k, args.temperature, args.mem_size, args.nprobe)
        print(f"{path[-48:]:<48}" + "".join(f"{r[c]:>18.3f}" for c in cols))
    print(f"(mean over scored tokens of {args.data}; k={args.k}, tau={args.temperature}, mem_size={args.mem_size}; "
          "vocab / memory / ext = share of the softmax's mass; precision = share of that on the target; "
          "target_in_* = the target is among the entries)")


if __name__ == "__main__":
    main()
