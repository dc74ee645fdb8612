"""Evaluation speed with external memory (k=1024, nprobe=32, the paper's settings) vs local memory only,
same model and data; plus where the time goes and what batched search buys.

Usage: python benchmarks/bench_eval.py --model RUN --data TEST_SHARDS --datastore DS [--max-segments N]
(build DS first, e.g. `trime datastore build --factory IVF1024,PQ16 ...`). Each setting runs its own
pass (`eval_pass` with one setting), so the times do not share work.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--datastore", required=True)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--max-segments", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from trime_dist.core import shards
    from trime_dist.datastore import index as dsi
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import EvalSetting, eval_pass
    from trime_dist.model.export import load_model

    torch.set_num_threads(args.threads)
    dsi.set_threads(args.threads)
    model, info = load_model(args.model)
    manifest = shards.read_manifest(args.data)
    ds = open_datastore(args.datastore)
    ds.check_compatible(info, manifest["tokenizer"]["sha256"], args.data)
    stores = {ds.path: ds}
    ds.index(args.nprobe)  # load the index before timing
    cases = [("local", args.batch_size, EvalSetting(model="m", memory="local")),
             ("long (mem 1024)", args.batch_size, EvalSetting(model="m", memory="long", mem_size=1024)),
             ("external", args.batch_size, EvalSetting(model="m", memory="external", datastore=ds.path,
                                                       k=args.k, nprobe=args.nprobe, mem_size=1024)),
             ("external, unbatched search", 1, EvalSetting(model="m", memory="external", datastore=ds.path,
                                                           k=args.k, nprobe=args.nprobe, mem_size=1024)),
             ("kNN-LM (none + knn 0.25)", args.batch_size,
              EvalSetting(model="m", memory="none", datastore=ds.path, k=args.k, nprobe=args.nprobe,
                          knn_lambda=0.25))]
    print(f"\nEval speed: {args.max_segments} segments of {manifest['seq_len']} tokens, datastore "
          f"{ds.meta['count']} keys x {ds.meta['dim']} ({ds.meta['factory']}), k={args.k}, nprobe={args.nprobe}, "
          f"{args.threads} thread(s)")
    print(f"  {'setting':<30}{'batch':>6}{'tokens/s':>10}{'forward s':>11}{'search s':>10}{'memory s':>10}"
          f"{'ppl':>9}{'vs local':>10}")
    base = None
    for name, batch_size, setting in cases:
        r = eval_pass(model, args.data, manifest, [setting], stores, [[1.0]], batch_size=batch_size,
                      max_segments=args.max_segments)
        s = r["settings"][0]
        ppl = float(torch.tensor(s["nll"][0] / s["tokens"]).exp())
        base = base or r["tokens_per_s"]
        sec = r["seconds"]
        print(f"  {name:<30}{batch_size:>6}{r['tokens_per_s']:>10,.0f}{sec['forward']:>11.2f}{sec['search']:>10.2f}"
              f"{sec['memory']:>10.2f}{ppl:>9.2f}{r['tokens_per_s'] / base:>10.3f}")


if __name__ == "__main__":
    main()
