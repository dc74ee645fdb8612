"""`trime eval`: the stage's flags (from EvalConfig), the table it prints and its entry point."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses

from trime_dist.eval.config import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.core.flags import add_dataclass_flags

    add_dataclass_flags(parser, EvalConfig)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def settings_from_config(cfg: EvalConfig) -> list:
    """The rows: one per --setting (over the flags' values), else one per --memory; each validated."""
    from trime_dist.eval.evaluate import EvalSetting

    base = EvalSetting(model=cfg.model, datastore=cfg.datastore, k=cfg.k, nprobe=cfg.nprobe,
                       temperature=cfg.temperature, mem_size=cfg.mem_size, knn_lambda=cfg.knn_lambda,
                       knn_temperature=cfg.knn_temperature, rescore=cfg.rescore)
    if cfg.setting:
        out = [parse_setting(s, base) for s in cfg.setting]
    else:
        out = [dataclasses.replace(base, memory=m) for m in cfg.memory]
    for s in out:
        if not s.name:
            s.name = s.memory + ("+knn" if s.knn_lambda > 0 else "")
    for spec in cfg.sweep:
        out = [swept for s in out for swept in sweep_setting(s, spec)]
    for s in out:
        s.validate()
    return out


SWEEPABLE = ("mem_size", "k", "temperature", "knn_lambda", "knn_temperature", "nprobe")


def sweep_setting(setting, spec: str) -> list:
    """`mem_size=128,512` -> copies of the EvalSetting with mem_size 128 and 512, named NAME@mem_size=128, ..."""
    key, sep, values = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in SWEEPABLE or not values.strip():
        raise ValueError(f"--sweep {spec!r}: expected KEY=V1,V2,... with KEY in {', '.join(SWEEPABLE)}")
    cast = int if key in ("mem_size", "k", "nprobe") else float
    out = []
    for v in filter(None, (v.strip() for v in values.split(","))):
        try:
            value = cast(v)
        except ValueError:
            raise ValueError(f"--sweep {spec!r}: {v!r} is not a{'n int' if cast is int else ' number'}") from None
        out.append(dataclasses.replace(setting, name=f"{setting.name}@{key}={v}", **{key: value}))
    return out


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


def parse_setting(text: str, base):
    """`name=knn,memory=none,k=16` -> a copy of the EvalSetting `base` with those fields replaced."""
    fields = {f.name: f.type for f in dataclasses.fields(base)}
    values = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--setting {text!r}: {item!r} is not KEY=VALUE with KEY in {sorted(fields)}")
        cast = {"int": int, "float": float, "bool": _boolean}.get(fields[key], str)
        try:
            values[key] = cast(value.strip())
        except ValueError:
            raise ValueError(f"--setting {text!r}: {key}={value!r} is not a {fields[key]}") from None
    return dataclasses.replace(base, **values)


def run(args: argparse.Namespace) -> int:
    from trime_dist.core.flags import dataclass_from_flags
    from trime_dist.core.launch_env import discover_env
    from trime_dist.core.output_lock import output_lock

    cfg = dataclass_from_flags(EvalConfig, args)
    if not cfg.data:
        raise ValueError("--data is required (prepared segment shards to evaluate)")
    # --out is written at the end, but held from the start: a second eval on it is refused before its passes
    with output_lock(cfg.out, rank=discover_env().rank, inside=False) if cfg.out else contextlib.nullcontext():
        return _evaluate(cfg)


def _evaluate(cfg: EvalConfig) -> int:
    import torch

    from trime_dist.eval.evaluate import evaluate_settings

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        from trime_dist.datastore.index import set_threads

        set_threads(cfg.threads)
    settings = settings_from_config(cfg)
    searches = [f for f, grid in (("--tau-search", cfg.taus()), ("--lambda-search", cfg.lambdas()),
                                  ("--knn-temperature-search", cfg.knn_temperatures())) if grid]
    if searches and not cfg.valid:
        raise ValueError(f"{' / '.join(searches)} needs --valid DIR (a validation split to choose the values on)")
    from trime_dist.core.device import pick_device
    from trime_dist.core.distributed import init_distributed, shutdown_distributed

    try:  # R ranks under any torch launcher: the streams are dealt to them (eval/evaluate.py)
        env = init_distributed(backend="gloo" if cfg.device == "cpu" else None)
        rows = evaluate_settings(settings, cfg.data, valid_dir=cfg.valid, taus=cfg.taus(), lambdas=cfg.lambdas(),
                                 knn_temperatures=cfg.knn_temperatures(),
                                 context_window=cfg.context_window, batch_size=cfg.batch_size,
                                 max_segments=cfg.max_segments, device=pick_device(cfg.device, env.local_rank),
                                 search=cfg.search)
    finally:  # like every torch stage: no process group or DeepSpeed buffer outlives it
        shutdown_distributed()
    if env.rank != 0:  # every rank has the rows; rank 0 prints and writes them
        return 0
    print_table(rows, cfg.data)
    if cfg.out:
        from trime_dist.core.io import atomic_write_json

        atomic_write_json(cfg.out, rows)
        print(f"(rows written to {cfg.out})")
    return 0


def print_table(rows: list[dict], data_dir: str) -> None:
    """The rows as a table; the setting column is as wide as the longest name (+ 2), at least 22."""
    ranks = max((int(r.get("ranks") or 1) for r in rows), default=1)
    print(f"\nPerplexity on {data_dir}" + (f" ({ranks} ranks)" if ranks > 1 else ""))
    w = max([22] + [len(r["name"]) + 2 for r in rows])
    print(f"{'setting':<{w}}{'memory':<10}{'tau':>6}{'lambda':>8}{'tau_knn':>8}{'k':>6}{'nprobe':>8}{'tokens':>9}"
          f"{'loss':>8}{'ppl':>9}{'word ppl':>10}{'bits/byte':>10}")
    for r in rows:
        k = "-" if r["k"] is None else str(r["k"])
        nprobe = "-" if r["nprobe"] is None else str(r["nprobe"])
        word = "-" if r.get("word_ppl") is None else f"{r['word_ppl']:.3f}"
        bpb = "-" if r.get("bits_per_byte") is None else f"{r['bits_per_byte']:.4f}"
        knn_tau = "-" if r.get("knn_temperature") is None else f"{r['knn_temperature']:.3g}"
        print(f"{r['name']:<{w}}{r['memory']:<10}{r['temperature']:>6.3g}{r['knn_lambda']:>8.3g}{knn_tau:>8}{k:>6}"
              f"{nprobe:>8}{r['tokens']:>9}{r['loss']:>8.4f}{r['ppl']:>9.3f}{word:>10}{bpb:>10}")
    print("(ppl per token; word ppl = exp(NLL / (words + line ends)) and bits per byte of the text `trime prepare` "
          "read, when every target was scored)")
