"""The GPU numbers of issue 9, on one GPU, in one process (run by benchmarks/gpu/check.sh):

1. training step at the paper's 247M model (configs/wt103_247m.yaml, 3072-token segments, bf16, ZeRO-1) for
   ce, trime_local, trime_long and trime_ext: tokens/s, step time, peak memory, MFU. The real `train_step`
   runs; long and ext get the memory W ranks would gather (W-1 other ranks' keys appended to this rank's,
   with gradients computed for all of them), since one GPU has no other ranks.
2. the most gathered memory keys per trime_ext step that fit (d=1024), growing W.
3. datastore encode keys/s (the real encode_part, bf16 autocast, fp16 keys written to a memmap).
4. search: exact torch top-k on the GPU (fp16 keys, fp32 rescoring) and faiss (GPU faiss when it runs here,
   else CPU faiss, saying which and its SIMD level).
5. `eval_pass` tokens/s with external memory (k=1024, exact GPU search) vs local memory only.

Each section is guarded: a failure is recorded and the next section runs. Writes RESULTS.json and
RESULTS.md to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "helpers"))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
RESULTS: dict = {}
ARGS = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def section(name: str):
    def wrap(fn):
        def run(*a, **kw):
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                RESULTS[name] = fn(*a, **kw)
            except Exception as e:  # keep going: the other numbers are still worth having
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                log(f"{name} FAILED: {e}")
            RESULTS[name + " (seconds)"] = round(time.perf_counter() - t0, 1)
            if CUDA:
                torch.cuda.empty_cache()
            write_report(ARGS.out, ARGS, quiet=True)   # a later timeout keeps what is done
        return run
    return wrap


CUDA = torch.cuda.is_available()   # without CUDA (--smoke on a laptop) the same code runs on the CPU


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")


def peak_flops() -> float:
    return next((v for k, v in PEAK_BF16.items() if k in device_name()), 989e12)


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------- 1 + 2: training

def emulate_ranks(world: int):
    """Patch train.loss.build_memory: this rank's keys plus those of world-1 emulated ranks (random keys of the
    same dtype, labels drawn from this rank's, rows of their own, earlier segments of the same streams)."""
    import trime_dist.train.loss as loss_mod
    from trime_dist.objective.masks import TokenMeta

    original = loss_mod.build_memory

    def build_memory(queries, targets, meta, gather, gather_grad):
        keys, labels, key_meta = original(queries, targets, meta, False, gather_grad)
        if not gather or world == 1:
            return keys, labels, key_meta
        m = keys.shape[0]
        fake = torch.randn((world - 1) * m, keys.shape[1], device=keys.device, dtype=keys.dtype) * keys.std()
        meta_t = key_meta.stack()                                                   # [m, 4]
        others = [meta_t + torch.tensor([1000 * r, 0, 0, -r], device=meta_t.device) for r in range(1, world)]
        fake_labels = labels[torch.randint(0, m, ((world - 1) * m,), device=labels.device)]
        return (torch.cat([keys, fake]), torch.cat([labels, fake_labels]),
                TokenMeta.unstack(torch.cat([meta_t, *others])))

    loss_mod.build_memory = build_memory
    return lambda: setattr(loss_mod, "build_memory", original)


class TrainBench:
    def __init__(self, args, extra: list[str] = ()):
        from trime_dist.core.config import load_config
        from trime_dist.train.config import TrainConfig
        from trime_dist.train.engine import build_engine, build_train_model, init_deepspeed_distributed

        init_deepspeed_distributed()
        overrides = [f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq_len}", "model.dropout=0.0",
                     "data.train=unused", "data.valid=", "data.micro_batch_size=1", "data.global_batch_size=1",
                     "run.max_steps=100000", "optim.warmup_steps=1", *args.overrides, *extra]
        self.cfg = load_config(TrainConfig, os.path.join(REPO, "configs", "wt103_247m.yaml"), overrides)
        model = build_train_model(self.cfg, 1)
        self.n_params = sum(p.numel() for p in model.parameters())
        if self.cfg.run.compile:
            model.compile_blocks()
        self.engine = build_engine(model, self.cfg, 1)
        self.device = self.engine.device
        self.vocab, self.seq_len = args.vocab, args.seq_len
        self.batch = self.batch_of(1)

    def batch_of(self, segments: int):
        """A micro-batch of `segments` random segments of distinct streams (one group: accumulation 1)."""
        from trime_dist.train.batch import Batch

        T, g = self.seq_len, torch.Generator().manual_seed(segments)
        tokens = torch.randint(2, self.vocab, (segments, T + 1), generator=g)
        return Batch(input_ids=tokens[:, :-1], targets=tokens[:, 1:].clone(), stream=torch.arange(segments),
                     stream_index=torch.full((segments,), 5000), row=torch.arange(segments),
                     group_tokens=segments * T)

    def step_time(self, objective: str, world: int, warmup: int, steps: int, tile: int = 4096,
                  batch=None) -> dict:
        from trime_dist.train.loop import TrainState, train_step
        from trime_dist.train.loss import build_loss_spec

        cfg = self.cfg
        cfg.objective.name, cfg.objective.cross_sent_ratio, cfg.memory.tile_size = objective, 0.0, tile
        cfg.data.placement = "interleaved"   # long memory spans ranks, as with the paper's 8 GPUs
        spec = build_loss_spec(cfg)
        state = TrainState()
        batch = self.batch if batch is None else batch
        batches = iter(lambda: (batch, 0), None)
        undo = emulate_ranks(world)
        records = []
        try:
            reset_peak()
            dt = timed(lambda: records.append(train_step(self.engine, batches, cfg, spec, state, 1, self.device)),
                       warmup, steps)
        finally:
            undo()
        T, L, D = batch.input_ids.shape[1], cfg.model.n_layers, cfg.model.d_model
        flops_per_token = 6 * self.n_params + 12 * L * D * T          # nanoGPT/PaLM estimate (model only)
        tokens = records[-1]["tokens"]   # per optimizer step (all micro-batches)
        return {"objective": objective, "emulated_ranks": world, "tile_size": tile, "step_s": dt,
                "precision": cfg.deepspeed.precision, "zero": cfg.deepspeed.zero_stage,
                "accum": cfg.data.global_batch_size, "micro_batch": batch.input_ids.shape[0],
                "tokens_per_s": tokens / dt, "peak_mem_gib": peak_gib(),
                "mfu": flops_per_token * tokens / dt / peak_flops(), "memory_keys": records[-1]["memory_size"],
                "loss": records[-1]["loss"]}


@section("train")
def bench_train(tb: TrainBench, args) -> dict:
    """CE, trime_local, trime_long and trime_ext (8 ranks' memory: 8 x 3072 = 24,576 keys, the paper's) steps in
    interleaved rounds; x_ce_step is the median over rounds of each round's step / that round's CE step."""
    variants = [("ce", 1, 4096), ("trime_local", 1, 4096), ("trime_long", 8, 4096),
                *[("trime_ext", 8, tile) for tile in args.tiles]]
    rounds: list[list[dict]] = []
    for _ in range(args.rounds):
        rounds.append([tb.step_time(obj, world, args.warmup, args.steps, tile) for obj, world, tile in variants])
    rows = []
    for i in range(len(variants)):
        cells = [r[i] for r in rounds]
        row = dict(min(cells, key=lambda c: c["step_s"]))          # the best round's numbers
        row["x_ce_step"] = float(np.median([r[i]["step_s"] / r[0]["step_s"] for r in rounds]))
        row["x_ce_step_rounds"] = [round(r[i]["step_s"] / r[0]["step_s"], 4) for r in rounds]
        rows.append(row)
        log(json.dumps(row))
    return {"n_params": tb.n_params, "seq_len": args.seq_len, "vocab": args.vocab, "rounds": args.rounds,
            "rows": rows}


@section("max_memory_keys")
def bench_max_keys(tb: TrainBench, args) -> dict:
    rows = []
    for world in args.max_key_worlds:
        try:
            r = tb.step_time("trime_ext", world, 1, 2, 4096)
        except torch.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            rows.append({"emulated_ranks": world, "keys": world * args.seq_len, "error": f"OOM: {e}"[:200]})
            break
        r["keys"] = world * args.seq_len
        rows.append(r)
        log(json.dumps(r))
    return {"rows": rows}


class BareLoop:
    """The loop a user would write by hand (nanoGPT style) on the same model: fp32 parameters, bf16 autocast,
    fused AdamW, clipping at 1.0, no DeepSpeed."""

    def __init__(self, cfg):
        from trime_dist.model.transformer import build_model

        self.model = build_model(cfg.model, seed=0).to(tb_device())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=CUDA)

    def step(self, batch) -> None:
        import torch.nn.functional as F

        batch = batch.to(tb_device(), non_blocking=True)
        self.opt.zero_grad(set_to_none=True)   # (also after a step that ran out of memory half way)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            logits, _ = self.model(batch.input_ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()


def flops_per_segment(cfg, n_params: int, seq_len: int) -> float:
    """nanoGPT/PaLM estimate: 6 N per token plus attention, model only."""
    return (6 * n_params + 12 * cfg.model.n_layers * cfg.model.d_model * seq_len) * seq_len


@section("train_variants")
def bench_variants(args) -> dict:
    """The CE step of the same 237M model three ways, interleaved (best of rounds): a bare torch loop (fp32
    params, bf16 autocast, fused AdamW, clipping), DeepSpeed ZeRO-0 bf16 and ZeRO-1 bf16 (the config's)."""
    benches = {f"deepspeed zero{z} {p}" + (f" accum {a}" if a > 1 else ""):
               TrainBench(args, [f"deepspeed.zero_stage={z}", f"deepspeed.precision={p}", f"data.global_batch_size={a}"])
               for z, p, a in args.variants}
    first = next(iter(benches.values()))
    cfg = first.cfg
    bare = BareLoop(cfg)
    bare_step = lambda: bare.step(first.batch)   # noqa: E731

    T = args.seq_len
    times: dict = {}
    for _ in range(2):
        times.setdefault("bare torch (autocast)", []).append(timed(bare_step, args.warmup, args.steps))
        for name, tb in benches.items():
            times.setdefault(name, []).append(tb.step_time("ce", 1, args.warmup, args.steps)["step_s"])
    flops = flops_per_segment(cfg, first.n_params, T)
    segments = {"bare torch (autocast)": 1, **{n: tb.cfg.data.global_batch_size for n, tb in benches.items()}}
    out = {name: {"step_s": min(t), "tokens_per_s": segments[name] * T / min(t),
                  "mfu": segments[name] * flops / min(t) / peak_flops()} for name, t in times.items()}
    log(json.dumps(out))
    RESULTS["_profile_targets"] = (first, bare_step)
    return out


def largest_micro_batch(step, make_batch, headroom: float = 0.85, limit: int = 256) -> int:
    """The most segments per micro-batch whose `step` fits on this GPU: peak memory at 1 and 2 segments gives
    the cost of a segment, the prediction for `headroom` of the GPU's memory is tried and shrunk by 1/8 until
    a step fits. (On a CPU: 2, so that --smoke runs the same code.)"""
    if not CUDA:
        return 2
    peaks = []
    for n in (1, 2):
        reset_peak()
        step(make_batch(n))
        sync()
        peaks.append(torch.cuda.max_memory_allocated())
    per_segment = max(peaks[1] - peaks[0], 1)
    total = torch.cuda.get_device_properties(0).total_memory
    n = int(min(limit, max(2, (headroom * total - peaks[0]) // per_segment + 1)))
    while n > 2:
        try:
            step(make_batch(n))
            sync()
            return n
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            n = n * 7 // 8
    return n


@section("train_zero")
def bench_zero(args) -> dict:
    """Issue 21's GPU target: CE tokens/s and MFU of `trime train`'s step (train_step on the engine of
    train/engine.py) at each ZeRO stage against the bare loop at the same micro-batch, at micro-batch 1 (the
    paper) and at the largest that fits here (found with the bare loop while every engine is alive, 85% of
    the GPU's memory), all cells interleaved in rounds; x_bare = trime tokens/s / bare tokens/s, the median
    over rounds of each round's ratio (target >= 0.95; MFU target at the largest micro-batch >= 40%)."""
    benches = {z: TrainBench(args, [f"deepspeed.zero_stage={z}", f"deepspeed.precision={args.zero_precision}"])
               for z in args.zero_stages}
    first = next(iter(benches.values()))
    bare = BareLoop(first.cfg)
    largest = largest_micro_batch(bare.step, first.batch_of)
    log(f"largest micro-batch that fits (bare loop, {args.zero_precision} engines alive): {largest}")
    flops = flops_per_segment(first.cfg, first.n_params, args.seq_len)
    cells: dict = {}   # (micro_batch, name) -> [tokens/s per round]
    failed: dict = {}
    for _ in range(args.rounds):
        for mb in (1, largest):
            batch = first.batch_of(mb)
            dt = timed(lambda: bare.step(batch), args.warmup, args.steps)
            cells.setdefault((mb, "bare"), []).append(mb * args.seq_len / dt)
            for z, tb in benches.items():
                name = f"zero{z}"
                if (mb, name) in failed:
                    continue
                try:
                    r = tb.step_time("ce", 1, args.warmup, args.steps, batch=batch)
                except torch.OutOfMemoryError as e:   # that engine is not reused at this size
                    failed[(mb, name)] = f"OOM: {e}"[:200]
                    torch.cuda.empty_cache()
                    continue
                cells.setdefault((mb, name), []).append(r["tokens_per_s"])
    rows = []
    for (mb, name), tps in cells.items():
        bare_tps = cells[(mb, "bare")]
        rows.append({"micro_batch": mb, "loop": name, "tokens_per_s": float(np.median(tps)),
                     "mfu": float(np.median(tps)) / args.seq_len * flops / peak_flops(),
                     "x_bare": float(np.median([t / b for t, b in zip(tps, bare_tps)])),
                     "rounds": [round(t) for t in tps]})
        log(json.dumps(rows[-1]))
    rows += [{"micro_batch": mb, "loop": name, "error": err} for (mb, name), err in failed.items()]
    return {"precision": args.zero_precision, "seq_len": args.seq_len, "largest_micro_batch": largest,
            "n_params": first.n_params, "rows": rows}


@section("profile")
def bench_profile(args) -> dict:
    """torch.profiler of one ZeRO-1 CE step and one bare step: where the time goes (tables in bench.log)."""
    from torch.profiler import ProfilerActivity, profile

    tb, bare_step = RESULTS.pop("_profile_targets")
    out = {}
    for name, fn in (("deepspeed zero1 ce", lambda: tb.step_time("ce", 1, 0, 1)), ("bare", bare_step)):
        fn()
        sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with profile(activities=acts) as prof:
            fn()
            sync()
        for key in ("self_cuda_time_total", "self_device_time_total", "self_cpu_time_total"):
            try:
                table = prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=70)
                break
            except Exception:  # the key's name differs across torch versions
                continue
        print(f"\n### profile: {name}\n{table}", flush=True)
        events = prof.key_averages()
        out[name] = {"cuda_total_ms": sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e3,
                     "cpu_total_ms": sum(e.self_cpu_time_total for e in events) / 1e3}
    log(json.dumps(out))
    return out


@section("train_compiled")
def bench_compiled(args) -> dict:
    """CE and trime_ext steps with run.compile=true (each block torch.compiled; warm-up steps compile)."""
    args.overrides = [*args.overrides, "run.compile=true"]
    tb = TrainBench(args)
    rows = [tb.step_time("ce", 1, args.warmup, args.steps), tb.step_time("trime_ext", 8, args.warmup, args.steps, 4096)]
    rows[1]["x_ce_step"] = rows[1]["step_s"] / rows[0]["step_s"]
    for r in rows:
        log(json.dumps(r))
    return {"rows": rows}


# ----------------------------------------------------------------------------- 3: encode

def write_segments(path: str, n_segments: int, seq_len: int, vocab: int) -> dict:
    from shard_fixtures import write_segment_dir

    return write_segment_dir(path, [n_segments * seq_len + 1], seq_len=seq_len, vocab_size=vocab, per_shard=64)


@section("encode")
def bench_encode(model, data_dir: str, manifest: dict, tmp: str, args) -> dict:
    from trime_dist.datastore import parts

    n = int(manifest["segments"])
    part = parts.Part(0, 0, n)
    out = {}
    for bs in (4, 8):
        paths = parts.part_paths(os.path.join(tmp, f"enc{bs}"), part)
        parts.encode_part(model, data_dir, manifest, parts.Part(0, 0, min(n, 2 * bs)), paths, bs, tb_device())
        sync()
        t0 = time.perf_counter()
        count = parts.encode_part(model, data_dir, manifest, part, paths, bs, tb_device())
        dt = time.perf_counter() - t0
        out[f"batch {bs}"] = {"keys": count, "seconds": dt, "keys_per_s": count / dt}
        log(f"encode batch {bs}: {count / dt:.0f} keys/s")
    return out


def tb_device():
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


# ----------------------------------------------------------------------------- 4: search

@section("search")
def bench_search(args) -> dict:
    from trime_dist.datastore.exact import rescore, topk_chunked

    dev, D, k, Q = tb_device(), args.search_dim, min(1024, args.faiss_keys), args.seq_len
    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    keys = torch.randn(args.exact_keys, D, device=dev, generator=g, dtype=torch.float16)
    queries = torch.randn(Q, D, device=dev, generator=g)

    def exact():
        if not CUDA:
            return topk_chunked(queries, keys, k)
        _, cand = topk_chunked(queries, keys, k + k // 8, compute_dtype=torch.float16)
        return rescore(queries, keys, cand, k)

    dt = timed(exact, 1, 3)
    out["exact_gpu"] = {"keys": args.exact_keys, "queries": Q, "k": k, "seconds": dt, "queries_per_s": Q / dt}
    log(f"exact GPU search over {args.exact_keys} keys: {Q / dt:.0f} queries/s")
    keys = None  # free the GPU copy before faiss
    torch.cuda.empty_cache()

    import faiss

    out["faiss"] = {"version": faiss.__version__, "gpus_seen_by_faiss": faiss.get_num_gpus(),
                    "compile_options": faiss.get_compile_options() if hasattr(faiss, "get_compile_options") else "",
                    "omp_threads": faiss.omp_get_max_threads()}
    log(f"faiss {faiss.__version__}: {out['faiss']}")
    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.faiss_keys, D), dtype=np.float32)
    qs = rng.standard_normal((Q, D), dtype=np.float32)
    flat = faiss.IndexFlatIP(D)
    flat.add(base)
    t0 = time.perf_counter()
    flat.search(qs[:512], k)
    dt = time.perf_counter() - t0
    out["faiss_cpu_flat"] = {"keys": args.faiss_keys, "queries": 512, "k": k, "queries_per_s": 512 / dt}
    log(f"faiss CPU Flat over {args.faiss_keys}: {512 / dt:.0f} queries/s")
    from trime_dist.datastore import index as dsi

    factory = f"IVF{args.ivf_nlist},PQ64"
    ivf = dsi.build_empty_index(factory, D)
    t0 = time.perf_counter()
    ivf.train(base[:32768])
    ivf.add(base)
    out["faiss_ivfpq_build_s"] = time.perf_counter() - t0
    dsi.set_nprobe(ivf, 32)
    t0 = time.perf_counter()
    ivf.search(qs, k)
    dt = time.perf_counter() - t0
    out["faiss_cpu_ivfpq"] = {"factory": factory, "nprobe": 32, "keys": args.faiss_keys, "queries": Q, "k": k,
                              "queries_per_s": Q / dt}
    log(f"faiss CPU IVF-PQ: {Q / dt:.0f} queries/s")
    if faiss.get_num_gpus() > 0:
        gflat = faiss.index_cpu_to_all_gpus(flat)
        t0 = time.perf_counter()
        gflat.search(qs, k)
        dt = time.perf_counter() - t0
        out["faiss_gpu_flat"] = {"keys": args.faiss_keys, "queries": Q, "k": k, "queries_per_s": Q / dt}
    return out


# ----------------------------------------------------------------------------- 5: eval

def write_store(path: str, n_keys: int, dim: int, vocab: int) -> str:
    from trime_dist.core.io import atomic_write_json
    from trime_dist.datastore.store import FORMAT, META_FILE

    os.makedirs(os.path.join(path, "parts"), exist_ok=True)
    rng = np.random.default_rng(1)
    keys = np.lib.format.open_memmap(os.path.join(path, "parts", "keys-p00000.npy"), mode="w+", dtype=np.float16,
                                     shape=(n_keys, dim))
    g = torch.Generator(device=tb_device()).manual_seed(1)
    for i0 in range(0, n_keys, 1 << 18):   # drawn on the device: numpy would take longer than the benchmark
        n = min(1 << 18, n_keys - i0)
        keys[i0:i0 + n] = torch.randn(n, dim, generator=g, device=tb_device(), dtype=torch.float16).cpu().numpy()
    keys.flush()
    keys = None  # free the GPU copy before faiss
    np.save(os.path.join(path, "parts", "values-p00000.npy"), rng.integers(2, vocab, n_keys).astype(np.int32))
    atomic_write_json(os.path.join(path, META_FILE), {
        "format": FORMAT, "datastore_id": "bench", "model_id": "bench", "dim": dim, "count": n_keys,
        "index": "index.faiss", "ondisk": False, "tokenizer_sha256": "0" * 64,
        "parts": [{"keys": "parts/keys-p00000.npy", "values": "parts/values-p00000.npy", "first_id": 0}]})
    return path


@section("eval")
def bench_eval(model, data_dir: str, manifest: dict, tmp: str, args) -> dict:
    from trime_dist.datastore.store import open_datastore
    from trime_dist.eval.evaluate import EvalSetting, eval_pass

    store = open_datastore(write_store(os.path.join(tmp, "store"), args.eval_keys, model.cfg.d_model, args.vocab))
    t0 = time.perf_counter()
    store.use_exact_search(tb_device())
    load_s = time.perf_counter() - t0
    stores = {"store": store}
    out = {"store_keys": args.eval_keys, "keys_to_gpu_s": load_s}
    for name, setting in (("local", EvalSetting(name="local", model="m", memory="local")),
                          ("external k=1024", EvalSetting(name="ext", model="m", memory="external",
                                                          datastore="store", k=1024))):
        for bs in (1, 4):
            eval_pass(model, data_dir, manifest, [setting], stores, [[1.0]], batch_size=bs, max_segments=2 * bs)
            sync()
            r = eval_pass(model, data_dir, manifest, [setting], stores, [[1.0]], batch_size=bs)
            out[f"{name}, batch {bs}"] = {"tokens_per_s": r["tokens_per_s"], "tokens": r["settings"][0]["tokens"],
                                          "seconds": r["seconds"]}
            log(f"eval {name} batch {bs}: {r['tokens_per_s']:.0f} tokens/s")
    return out


# ----------------------------------------------------------------------------- report

def write_report(out_dir: str, args, quiet: bool = False) -> None:
    os.makedirs(out_dir, exist_ok=True)
    env = {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    RESULTS["env"] = env
    with open(os.path.join(out_dir, "RESULTS.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    lines = [f"GPU check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}), {env['date']}", ""]
    tr = RESULTS.get("train", {})
    if "rows" in tr:
        lines += [f"Training step, {tr['n_params'] / 1e6:.0f}M params, seq {tr['seq_len']}, vocab {tr['vocab']}, "
                  "bf16, 1 GPU", "",
                  "| objective | emulated ranks | tile | step (ms) | x CE | tokens/s | peak GiB | MFU | memory keys |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            lines.append(f"| {r['objective']} | {r['emulated_ranks']} | {r['tile_size']} | {r['step_s'] * 1e3:.1f} | "
                         f"{r['x_ce_step']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.1f} | "
                         f"{r['mfu'] * 100:.1f}% | {r['memory_keys']:.0f} |")
        lines.append("")
    tz = RESULTS.get("train_zero", {})
    if "rows" in tz:
        lines += [f"CE step of `trime train` vs a bare torch loop, {tz['n_params'] / 1e6:.0f}M params, seq "
                  f"{tz['seq_len']}, {tz['precision']}, 1 GPU; largest micro-batch that fits: "
                  f"{tz['largest_micro_batch']} (target: x bare >= 0.95, MFU >= 40% at the largest)", "",
                  "| micro-batch | loop | tokens/s | MFU | x bare | tokens/s per round |", "|---|---|---|---|---|---|"]
        for r in tz["rows"]:
            if "error" in r:
                lines.append(f"| {r['micro_batch']} | {r['loop']} | {r['error']} | | | |")
            else:
                lines.append(f"| {r['micro_batch']} | {r['loop']} | {r['tokens_per_s']:.0f} | {r['mfu'] * 100:.1f}% | "
                             f"{r['x_bare']:.3f} | {r['rounds']} |")
        lines.append("")
    mk = RESULTS.get("max_memory_keys", {})
    if "rows" in mk:
        lines += ["trime_ext with W emulated ranks' memory (d=1024, tile 4096)", "",
                  "| gathered keys | step (ms) | peak GiB |", "|---|---|---|"]
        for r in mk["rows"]:
            lines.append(f"| {r['keys']} | {r.get('step_s', math.nan) * 1e3:.1f} | "
                         f"{r.get('peak_mem_gib', math.nan):.1f} | {r.get('error', '')}")
        lines.append("")
    for name in ("encode", "search", "eval"):
        if name in RESULTS:
            lines += [f"{name}: `{json.dumps(RESULTS[name], default=str)[:1500]}`", ""]
    for name, v in RESULTS.items():
        if isinstance(v, dict) and "error" in v:
            lines += [f"{name} FAILED: {v['error']}", ""]
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    p.add_argument("--seq-len", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-key-worlds", type=int, nargs="*", default=[8, 80, 320, 1280])
    p.add_argument("--encode-segments", type=int, default=64)
    p.add_argument("--exact-keys", type=int, default=8_000_000)
    p.add_argument("--faiss-keys", type=int, default=200_000)
    p.add_argument("--eval-keys", type=int, default=1_000_000)
    p.add_argument("--tiles", type=int, nargs="*", default=[1024, 4096, 8192], help="trime_ext tile sizes")
    p.add_argument("--variants", nargs="*", type=lambda v: (int(v.split(":")[0]), v.split(":")[1], int(v.split(":")[2])),
                   default=[(1, "bf16", 1), (0, "bf16_autocast", 1), (1, "bf16_autocast", 1), (1, "bf16", 8),
                            (1, "bf16_autocast", 8)], help="train_variants: ZERO:PRECISION:SEGMENTS_PER_STEP ...")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of train and train_zero")
    p.add_argument("--zero-stages", type=int, nargs="*", default=[0, 1, 2, 3], help="train_zero: ZeRO stages")
    p.add_argument("--zero-precision", default="bf16_autocast", help="train_zero: deepspeed.precision")
    p.add_argument("--search-dim", type=int, default=1024)
    p.add_argument("--ivf-nlist", type=int, default=1024)
    p.add_argument("--only", nargs="*", default=["train_zero", "train_variants", "profile", "train", "max_memory_keys", "encode",
                                                 "search", "eval", "compiled"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the script itself (CPU is fine)")
    p.add_argument("overrides", nargs="*", help="train config overrides, e.g. run.compile=true")
    args = p.parse_args()
    if args.smoke:
        args.seq_len, args.vocab, args.warmup, args.steps, args.max_key_worlds = 64, 100, 1, 2, [2, 4]
        args.encode_segments, args.exact_keys, args.faiss_keys, args.eval_keys = 8, 5000, 5000, 5000
        args.search_dim, args.ivf_nlist = 64, 16
        args.overrides = ["model.n_layers=1", "model.d_model=64", "model.n_heads=2", "model.d_ffn=128",
                          "deepspeed.precision=fp32", *args.overrides]
    global ARGS
    ARGS = args
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # `timeout` still gets the report written
    log(f"{device_name()}, torch {torch.__version__}")
    try:
        if "train_zero" in args.only:
            bench_zero(args)
        if "train_variants" in args.only:
            bench_variants(args)
        if "profile" in args.only:
            bench_profile(args)
        RESULTS.pop("_profile_targets", None)
        tb = TrainBench(args)
        if "train" in args.only:
            bench_train(tb, args)
        if "max_memory_keys" in args.only:
            bench_max_keys(tb, args)
        write_report(args.out, args)
        model = tb.engine.module.eval()
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = os.path.join(tmp, "data")
            manifest = write_segments(data_dir, args.encode_segments, args.seq_len, args.vocab)
            if "encode" in args.only:
                bench_encode(model, data_dir, manifest, tmp, args)
            if "search" in args.only:
                bench_search(args)
            if "eval" in args.only:
                bench_eval(model, data_dir, manifest, tmp, args)
        del model, tb
        if "compiled" in args.only:
            bench_compiled(args)
    finally:
        write_report(args.out, args)


if __name__ == "__main__":
    main()
