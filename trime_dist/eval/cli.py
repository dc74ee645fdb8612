"""`trime eval`: the stage's flags, the table it prints and its entry point."""
from __future__ import annotations

import argparse
import dataclasses

from trime_dist.eval.evaluate import MEMORY, EvalSetting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="", help="trained run directory (or its model/ directory)")
    a("--data", required=True, help="prepared segment shards to evaluate (e.g. the test split)")
    a("--memory", nargs="+", default=["local"], choices=MEMORY, help="one row per memory setting")
    a("--datastore", default="", help="datastore directory (external memory, kNN interpolation)")
    a("--k", type=int, default=1024, help="neighbours per query")
    a("--nprobe", type=int, default=32, help="IVF lists probed per search")
    a("--temperature", type=float, default=1.0, help="τ of the memory similarities")
    a("--mem-size", type=int, default=1024, help="long-term cache size (keys) for long / external")
    a("--knn-lambda", type=float, default=0.0, help="kNN-LM interpolation weight λ (0 = off)")
    a("--knn-temperature", type=float, default=1.0, help="τ_knn of the kNN distribution")
    a("--tau-search", default="", help="comma-separated τ values tried on --valid; the best is used")
    a("--valid", default="", help="validation split for --tau-search")
    a("--context-window", type=int, default=0, help="sliding context: inputs per window that are context only")
    a("--batch-size", type=int, default=8, help="windows per forward pass (and per batched search)")
    a("--max-segments", type=int, default=0, help="evaluate only the first N segments (0 = all)")
    a("--setting", action="append", default=[], metavar="KEY=VAL,...",
      help="a row with its own fields (name, model, memory, datastore, k, nprobe, temperature, mem_size, "
           "knn_lambda, knn_temperature) over the flags' values; repeatable; replaces --memory")
    a("--out", default="", help="write the rows as JSON here")
    a("--threads", type=int, default=0, help="torch / faiss threads (0 = leave as is)")
    a("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def settings_from_args(args: argparse.Namespace) -> list[EvalSetting]:
    base = EvalSetting(model=args.model, datastore=args.datastore, k=args.k, nprobe=args.nprobe,
                       temperature=args.temperature, mem_size=args.mem_size, knn_lambda=args.knn_lambda,
                       knn_temperature=args.knn_temperature)
    if args.setting:
        out = [parse_setting(s, base) for s in args.setting]
    else:
        out = [dataclasses.replace(base, memory=m) for m in args.memory]
    for s in out:
        if not s.name:
            s.name = s.memory + ("+knn" if s.knn_lambda > 0 else "")
        s.validate()
    return out


def parse_setting(text: str, base: EvalSetting) -> EvalSetting:
    fields = {f.name: f.type for f in dataclasses.fields(EvalSetting)}
    values = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--setting {text!r}: {item!r} is not KEY=VALUE with KEY in {sorted(fields)}")
        cast = {"int": int, "float": float}.get(fields[key], str)
        try:
            values[key] = cast(value.strip())
        except ValueError:
            raise ValueError(f"--setting {text!r}: {key}={value!r} is not a {fields[key]}") from None
    return dataclasses.replace(base, **values)


def run(args: argparse.Namespace) -> int:
    import torch

    from trime_dist.eval.evaluate import evaluate_settings

    if args.threads > 0:
        torch.set_num_threads(args.threads)
        from trime_dist.datastore.index import set_threads

        set_threads(args.threads)
    settings = settings_from_args(args)
    taus = [float(t) for t in args.tau_search.split(",") if t.strip()] if args.tau_search else []
    if taus and not args.valid:
        raise ValueError("--tau-search needs --valid DIR (a validation split to choose τ on)")
    rows = evaluate_settings(settings, args.data, valid_dir=args.valid, taus=taus,
                             context_window=args.context_window, batch_size=args.batch_size,
                             max_segments=args.max_segments)
    print_table(rows, args.data)
    if args.out:
        from trime_dist.core.io import atomic_write_json

        atomic_write_json(args.out, rows)
        print(f"(rows written to {args.out})")
    return 0


def print_table(rows: list[dict], data_dir: str) -> None:
    print(f"\nPerplexity on {data_dir}")
    print(f"{'setting':<22}{'memory':<10}{'tau':>6}{'lambda':>8}{'k':>6}{'nprobe':>8}{'tokens':>9}"
          f"{'loss':>8}{'ppl':>9}")
    for r in rows:
        k = "-" if r["k"] is None else str(r["k"])
        nprobe = "-" if r["nprobe"] is None else str(r["nprobe"])
        print(f"{r['name']:<22}{r['memory']:<10}{r['temperature']:>6.3g}{r['knn_lambda']:>8.3g}{k:>6}{nprobe:>8}"
              f"{r['tokens']:>9}{r['loss']:>8.4f}{r['ppl']:>9.3f}")
