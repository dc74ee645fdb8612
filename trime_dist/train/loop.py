"""`trime train`: DeepSpeed training with the TRIME objective, resumable, one JSON line per step.

Run it under a launcher (`deepspeed --num_gpus 2 $(which trime) train ...`, `trime launch`,
srun/mpiexec) or as one process. The loop is split into small steps: set-up, one optimizer
step, validation, checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from trime_dist.core.config import save_config
from trime_dist.core.constants import STOPPED_MARKER_ENV
from trime_dist.core.io import atomic_write_json
from trime_dist.core.progress import show_progress
from trime_dist.train.config import TrainConfig, grad_accum_steps, validate_train_config
from trime_dist.train.kill_hook import maybe_exit_after_step
from trime_dist.train.loss import LossSpec, build_loss_spec, micro_batch_loss
from trime_dist.train.signals import EXIT_STOPPED_BY_SIGNAL, StopFlag, StoppedBySignal

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- set-up

@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    tokens_seen: int = 0
    best_valid: Optional[float] = None
    history: list = field(default_factory=list)
    stop_ranks: int = 0           # ranks that had a stop signal at the last step's all-reduce (same on all)


def setup_run(cfg: TrainConfig, world_size: int, rank: int, resume: bool):
    """Check the config against the data, fill in sizes from the manifest, write the resolved config."""
    from trime_dist.train.loader import ShardDataset

    if cfg.model.pretrained:  # the architecture fields come from the model folder's config.json
        from trime_dist.model.hf import pretrained_model_config

        cfg.model = pretrained_model_config(cfg.model)
    validate_train_config(cfg, world_size)
    ckpt_dir = os.path.join(cfg.run.out_dir, "checkpoints")
    if not resume and os.path.isfile(os.path.join(ckpt_dir, "latest")):
        raise ValueError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run "
                         "or choose a new run.out_dir")
    if resume and not has_checkpoint(ckpt_dir):
        raise ValueError(f"--resume: no checkpoint in {ckpt_dir} (run.out_dir={cfg.run.out_dir}); use "
                         "--auto-resume to start the run or resume it, whichever applies")
    group_size = world_size * cfg.data.micro_batch_size
    train_data = ShardDataset(cfg.data.train, group_size, shuffle_shards=cfg.data.shuffle_shards,
                              seed=cfg.run.seed, verify=(rank == 0))
    if cfg.data.valid:
        check_valid_data(cfg.data.valid, group_size, rank)
    fit_model_to_data(cfg, train_data)
    check_data_for_objective(cfg, train_data, world_size)
    if rank == 0:
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.out_dir, "config.yaml"))
        add_log_file(os.path.join(cfg.run.out_dir, "train.log"))
    return train_data


def copy_data_tokenizer(data: str, manifest: dict, out_dir: str) -> Optional[str]:
    """A local copy in out_dir of the data's tokenizer file (a folder, URL or pipe: location), checked against
    the manifest's sha256; None (with a warning: the model is exported without it) when it cannot be had."""
    from trime_dist.core.io import atomic_write_bytes
    from trime_dist.core.shards import read_tokenizer

    local = os.path.join(out_dir, ".data-tokenizer.json")
    try:
        atomic_write_bytes(local, read_tokenizer(data, manifest))
    except (FileNotFoundError, ValueError) as e:
        log.warning("the model's tokenizer is not copied beside it: %s", e)
        return None
    return local


def check_valid_data(valid: str, group_size: int, rank: int) -> None:
    """Refuse a missing or incomplete data.valid now, not after the engine is built (rank 0 checks sums)."""
    from trime_dist.train.loader import ShardDataset

    try:
        ShardDataset(valid, group_size, drop_last=False, verify=(rank == 0))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(f"data.valid={valid}: {e}") from e


def fit_model_to_data(cfg: TrainConfig, train_data) -> None:
    """model.vocab_size from the data's tokenizer when 0; refuse data whose token ids or segment length the
    model cannot take (for model.pretrained, its config.json fixed both)."""
    from trime_dist.core.locations import manifest_location

    m, manifest = cfg.model, manifest_location(cfg.data.train)
    data_vocab = int(train_data.manifest["tokenizer"]["vocab_size"])
    origin = f" (from {m.pretrained}/config.json)" if m.pretrained else ""
    if m.vocab_size == 0:
        m.vocab_size = data_vocab
    elif m.vocab_size < data_vocab:
        fix = f"prepare the data with the tokenizer of {m.pretrained}" if m.pretrained else \
            "set it to 0 to take it from the data"
        raise ValueError(f"model.vocab_size={m.vocab_size}{origin} is smaller than the tokenizer's {data_vocab} "
                         f"({manifest}); {fix}")
    if train_data.seq_len > m.max_seq_len:
        raise ValueError(f"model.max_seq_len={m.max_seq_len}{origin} is shorter than the data's segment length "
                         f"{train_data.seq_len} ({manifest})")


def check_data_for_objective(cfg: TrainConfig, train_data, world_size: int) -> None:
    """Refuse memory layouts the data cannot satisfy, saying which setting to change."""
    method = train_data.manifest.get("grouping", {}).get("method")
    if cfg.objective.name == "trime_ext" and method != "bm25" and not cfg.data.allow_ungrouped:
        # In stream order a segment's memory holds the next segment of the same text: trime_ext would
        # learn to copy it instead of retrieving from similar texts.
        found = f"{method!r} groups" if method else "segments in stream order (not grouped)"
        raise ValueError(f"objective.name=trime_ext trains on BM25 groups, but {cfg.data.train} holds {found}; "
                         f"group them with `trime group --input {cfg.data.train} --output DIR --method bm25`, "
                         "or set data.allow_ungrouped=true to train on them anyway")
    if cfg.objective.name == "trime_long":
        if method not in (None, "consecutive"):
            raise ValueError(f"objective.name=trime_long needs consecutive segments, but {cfg.data.train} holds "
                             f"{method!r} groups; use shards from `trime prepare` or `trime group --method consecutive`")
        if cfg.data.placement == "contiguous" and cfg.data.micro_batch_size < 2:
            raise ValueError("objective.name=trime_long with data.placement=contiguous keeps memory on each rank, "
                             "but data.micro_batch_size=1 leaves one segment per rank: nothing earlier to remember. "
                             "Use data.placement=interleaved (memory gathered across ranks) or a larger "
                             "data.micro_batch_size")
        if world_size * cfg.data.micro_batch_size < 2:
            raise ValueError("objective.name=trime_long needs at least 2 consecutive segments per global batch: "
                             "raise data.micro_batch_size")


def add_log_file(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


# ----------------------------------------------------------------------------- one step

def train_step(engine, batches, cfg: TrainConfig, spec: LossSpec, state: TrainState, world_size: int,
               device: torch.device, rank: int = 0, stop: Optional[StopFlag] = None) -> dict:
    """One optimizer step over grad-accumulation micro-batches; returns the step's metrics. Sets
    state.stop_ranks to the number of ranks that had a stop signal, agreed in the step's one all-reduce.

    One host wait per step, and it does not drain the device's queue: the step's totals (after their
    all-reduce) are copied to the host without blocking, the update is queued behind them, and only then
    does the host read them (NaN check, stop signal, metrics). A non-finite loss raises before anything is
    saved, so the update it made never reaches a checkpoint. grad_norm (a device read) only at log steps."""
    from trime_dist.core.device import bf16_autocast
    from trime_dist.core.distributed import all_reduce_sum
    from trime_dist.train.engine import clip_gradients, clips_in_loop, current_lr

    start = time.perf_counter()
    # nll_sum, ce_sum, tokens, stop signal (this rank)
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    memory_sizes, epoch, layout, grad_norm = [], 0, "none", None
    accum, clip_here = grad_accum_steps(cfg, world_size), clips_in_loop(cfg)
    for micro_step in range(accum):
        batch, epoch = next(batches)
        batch = batch.to(device, non_blocking=True)
        layout, use_local = spec.step_memory(state.step, epoch, rank, micro_step)
        with bf16_autocast(device, cfg.deepspeed.precision == "bf16_autocast"):
            logits, memory_keys = engine(batch.input_ids)
        out = micro_batch_loss(logits, memory_keys, batch, spec, layout, use_local)
        totals[:3] += torch.stack([out.nll_sum.double(), out.ce_sum.double(), out.n_tokens.double()])
        memory_sizes.append(out.memory_size)
        engine.backward(out.loss)
        if micro_step == accum - 1:
            # One collective per optimizer step: every rank sees a NaN anywhere, and a stop signal on any
            # rank (so all ranks stop after the same step).
            totals[3] = 1.0 if stop is not None and stop.requested else 0.0
            totals = all_reduce_sum(totals)
            host_totals, copied = _to_host_async(totals)
            if clip_here:  # (the gradients are all-reduced by now: DeepSpeed does it in the last backward)
                grad_norm = clip_gradients(engine, cfg.optim.grad_clip)
        engine.step()
    copied()  # waits for the totals only; the update stays queued on the device
    if not math.isfinite(float(host_totals[0])):
        raise FloatingPointError(nan_message(cfg, state.step + 1, epoch))
    elapsed = time.perf_counter() - start
    state.step += 1
    nll, ce, n_tokens, stop_ranks = host_totals.tolist()
    state.stop_ranks, tokens = int(stop_ranks), int(n_tokens)
    state.tokens_seen += tokens
    loss, ce_loss = nll / max(tokens, 1), ce / max(tokens, 1)
    if not is_log_step(cfg, state.step):
        grad_norm = None
    elif not clip_here:
        grad_norm = engine.get_global_grad_norm()
    # "objective": the one in effect (ce during the warm-up); "memory": its layout this step.
    return {"step": state.step, "epoch": epoch, "objective": "ce" if layout == "none" else cfg.objective.name,
            "memory": layout, "loss": loss, "ce_loss": ce_loss,
            "ppl": math.exp(min(loss, 50.0)), "tokens": tokens, "tokens_seen": state.tokens_seen,
            "tokens_per_s": tokens / elapsed, "step_time_s": elapsed, "lr": current_lr(engine),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "memory_size": sum(memory_sizes) / len(memory_sizes)}


def is_log_step(cfg: TrainConfig, step: int) -> bool:
    """Steps whose log line (and grad_norm, a device read) are written: every run.log_every and the first."""
    return step % cfg.run.log_every == 0 or step == 1


def _to_host_async(t: torch.Tensor):
    """(host copy of t, wait()): on a GPU a non-blocking copy into pinned memory and an event to wait on,
    so the host can queue more work before it reads the copy; on the CPU t itself and a no-op."""
    if t.device.type != "cuda":
        return t, lambda: None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done.synchronize


def nan_message(cfg: TrainConfig, step: int, epoch: int) -> str:
    """The NaN-loss stop's line: it promises an intact checkpoint only when one exists."""
    ckpt_dir = os.path.join(cfg.run.out_dir, "checkpoints")
    kept = (f"the last good checkpoint in {ckpt_dir} is intact" if has_checkpoint(ckpt_dir) else
            f"no checkpoint was saved yet (none in {ckpt_dir})")
    return (f"non-finite loss at step {step} (epoch {epoch}); stopping without saving, {kept}. Try a lower "
            "optim.lr or deepspeed.precision=fp32")


def has_checkpoint(ckpt_dir: str) -> bool:
    """A complete checkpoint: `latest` names a tag directory that exists (DeepSpeed writes it last)."""
    latest = os.path.join(ckpt_dir, "latest")
    return os.path.isfile(latest) and os.path.isdir(os.path.join(ckpt_dir, open(latest).read().strip()))


@torch.no_grad()
def evaluate(engine, cfg: TrainConfig, spec: LossSpec, rank: int, world_size: int, device: torch.device) -> dict:
    """Validation loss and perplexity with plain CE and with the run's memory (spec.for_validation)."""
    from trime_dist.core.device import bf16_autocast
    from trime_dist.core.distributed import all_reduce_sum
    from trime_dist.train.loader import iter_eval_batches

    valid_spec = spec.for_validation()
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in iter_eval_batches(cfg.data.valid, rank, world_size, cfg.data.micro_batch_size,
                                   cfg.run.eval_batches):
        batch = batch.to(device, non_blocking=True)
        with bf16_autocast(device, cfg.deepspeed.precision == "bf16_autocast"):
            logits, memory_keys = engine(batch.input_ids)
        out = micro_batch_loss(logits.float(), memory_keys.float(), batch, valid_spec, valid_spec.layout)
        totals += torch.stack([out.nll_sum.double(), out.ce_sum.double(), out.n_tokens.double()])
    engine.train()
    totals = all_reduce_sum(totals)
    tokens = max(float(totals[2]), 1.0)
    return {"valid_tokens": int(totals[2]), "valid_ce_loss": float(totals[1]) / tokens,
            "valid_ce_ppl": math.exp(float(totals[1]) / tokens), "valid_memory_loss": float(totals[0]) / tokens,
            "valid_memory_ppl": math.exp(float(totals[0]) / tokens)}


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train until run.max_steps (or run.max_epochs); returns the final summary (also RUN/summary.json).
    SIGTERM / SIGUSR1 stop it after a whole step and a checkpoint: StoppedBySignal (see signals.py)."""
    from trime_dist.core.launch_env import discover_env
    from trime_dist.core.lost_ranks import is_peer_failure, rank_lost_error
    from trime_dist.core.watchdog import ProgressWatchdog

    env = discover_env()
    # a rank waiting longer than run.dist_timeout_s for the others ends with a line naming the lost ranks
    watchdog = ProgressWatchdog(cfg.run.dist_timeout_s, env, "train", "training")
    stop = StopFlag().install()  # from here on a signal cannot kill a step half-done
    try:
        return _train(cfg, resume, stop, watchdog)
    except Exception as e:
        # (still under the StopFlag: the launcher's SIGTERM to the survivors cannot cut the check short)
        if env.world_size > 1 and is_peer_failure(e):
            raise rank_lost_error(e, env, "training") from e
        raise
    finally:
        watchdog.stop()
        stop.restore()


def _train(cfg: TrainConfig, resume: bool, stop: StopFlag, watchdog) -> dict:
    from trime_dist.core.device import pick_device
    from trime_dist.core.distributed import get_rank, get_world_size
    from trime_dist.core.launch_env import discover_env
    from trime_dist.train.engine import (
        build_engine,
        build_train_model,
        check_latest_checkpoint,
        init_deepspeed_distributed,
        load_checkpoint,
    )
    from trime_dist.train.loader import RankLoader
    from trime_dist.train.trackers import open_run_metrics

    env = discover_env()  # config and data are checked before any process group or engine exists
    train_data = setup_run(cfg, env.world_size, env.rank, resume)
    if resume:  # so is the checkpoint: a file holding a pickled object is refused before the engine is built
        check_latest_checkpoint(os.path.join(cfg.run.out_dir, "checkpoints"))
    spec = build_loss_spec(cfg)  # what every micro-batch's loss is, decided once
    init_deepspeed_distributed(cfg.run.dist_timeout_s, cfg.run.net_interface)
    rank, world_size = get_rank(), get_world_size()
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    ckpt_dir = os.path.join(cfg.run.out_dir, "checkpoints")

    device = pick_device("auto", env.local_rank)
    model = build_train_model(cfg, world_size)
    if cfg.run.compile:
        model.compile_blocks()
    engine = build_engine(model, cfg, world_size)
    loader = RankLoader(train_data, rank, world_size, cfg.data.placement, max_epochs=cfg.run.max_epochs,
                        num_workers=cfg.data.num_workers)
    state = TrainState()
    client = load_checkpoint(engine, ckpt_dir) if resume else None
    if client is not None:
        state.step, state.tokens_seen = int(client["step"]), int(client["tokens_seen"])
        loader.load_state_dict(client["loader"])
    watchdog.start()  # from here on every rank makes progress together
    # metrics.jsonl and the run.trackers (tensorboard, wandb): rank 0 only
    metrics = open_run_metrics(cfg, state.step if resume else None) if rank == 0 else None
    log.info("rank %d/%d: %d params, %s, %d optimizer steps from step %d, loader at %s", rank, world_size,
             sum(p.numel() for p in engine.module.parameters()), cfg.objective.name, cfg.run.max_steps,
             state.step, loader.state.state_dict())

    if state.step == 0 and cfg.data.valid:
        start_eval = evaluate(engine, cfg, spec, rank, world_size, device)
        _record(metrics, {"step": 0, **start_eval})
        state.history.append({"step": 0, **start_eval})
    batches = iter(loader)
    # rank 0: a bar on a terminal, a line every TRIME_PROGRESS_EVERY_S in a log file (core/progress.py)
    progress = show_progress(cfg.run.max_steps, "train", "step", rank=rank, initial=state.step)
    last_saved = state.step
    while state.step < cfg.run.max_steps:
        try:
            record = train_step(engine, batches, cfg, spec, state, world_size, device, rank, stop)
        except StopIteration:
            log.info("run.max_epochs=%d reached at step %d", cfg.run.max_epochs, state.step)
            break
        if cfg.data.valid and cfg.run.eval_every and state.step % cfg.run.eval_every == 0:
            record.update(evaluate(engine, cfg, spec, rank, world_size, device))
            state.history.append({k: v for k, v in record.items() if k.startswith("valid") or k == "step"})
        _record(metrics, record)
        watchdog.beat()
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{record['ppl']:.1f}")
        if rank == 0 and (state.step % cfg.run.log_every == 0 or state.step == 1):
            log.info("step %d epoch %d %s loss %.4f ce %.4f lr %.2e grad_norm %s tok/s %.0f", state.step,
                     record["epoch"], record["objective"], record["loss"], record["ce_loss"], record["lr"],
                     record["grad_norm"], record["tokens_per_s"])
        if state.step % cfg.run.save_every == 0 or state.stop_ranks:
            _save(engine, cfg, ckpt_dir, state, loader)
            last_saved = state.step
            watchdog.beat()
        if state.stop_ranks and state.step < cfg.run.max_steps:
            _stop_by_signal(stop, ckpt_dir, state, rank, progress, metrics)
        maybe_exit_after_step(state.step)
    progress.close()
    if last_saved != state.step or not os.path.isfile(os.path.join(ckpt_dir, "latest")):
        _save(engine, cfg, ckpt_dir, state, loader)
    watchdog.beat()  # the final validation and export get a whole run.dist_timeout_s
    return _finish(engine, cfg, spec, ckpt_dir, state, train_data, rank, world_size, metrics, device)


def _stop_by_signal(stop: StopFlag, ckpt_dir: str, state: TrainState, rank: int, progress, metrics) -> None:
    """After the stopping step's checkpoint (every rank): one log line, then StoppedBySignal."""
    error = StoppedBySignal(state.step, ckpt_dir, stop.signal_name)
    if rank == 0:
        progress.close()
        metrics.close()
        log.warning("%s (exit code %d)", error, EXIT_STOPPED_BY_SIGNAL)
        marker = os.environ.get(STOPPED_MARKER_ENV)
        if marker:  # every rank is past the checkpoint's closing barrier
            atomic_write_json(marker, {"step": state.step, "signal": stop.signal_name})
    raise error


def _record(metrics, record: dict) -> None:
    if metrics is not None:
        metrics.write(record)


def _save(engine, cfg: TrainConfig, ckpt_dir: str, state: TrainState, loader) -> str:
    from trime_dist.train.engine import save_checkpoint

    client = {"step": state.step, "tokens_seen": state.tokens_seen, "loader": loader.state.state_dict()}
    return save_checkpoint(engine, ckpt_dir, state.step, client, keep=cfg.run.keep_checkpoints)


def _finish(engine, cfg, spec, ckpt_dir, state, train_data, rank, world_size, metrics, device) -> dict:
    """Final validation, exported model, summary JSON and loss-curve PNG."""
    from trime_dist.core import locations
    from trime_dist.core.distributed import barrier
    from trime_dist.core.shards import manifest_sha256
    from trime_dist.model.export import export_model
    from trime_dist.train.engine import full_state_dict, latest_tag
    from trime_dist.train.metrics import plot_loss_curve

    summary = {"steps": state.step, "tokens_seen": state.tokens_seen, "objective": cfg.objective.name,
               "world_size": world_size}
    if cfg.data.valid:
        final_eval = evaluate(engine, cfg, spec, rank, world_size, device)
        _record(metrics, {"step": state.step, **final_eval})
        summary.update(final=final_eval, start=next((h for h in state.history if h["step"] == 0), None))
    barrier()
    tag = latest_tag(ckpt_dir)
    weights = full_state_dict(engine, ckpt_dir, tag, cfg.deepspeed.zero_stage)
    if rank == 0:
        tok = train_data.manifest["tokenizer"]
        info = {"step": state.step, "objective": cfg.objective.name, "tokenizer_sha256": tok["sha256"],
                "tokenizer": tok, "train_data": locations.describe(cfg.data.train),
                "train_manifest_sha256": manifest_sha256(cfg.data.train),
                "seq_len": train_data.seq_len}
        # a run from model.pretrained records its HF config; the data's tokenizer goes beside the weights
        hf_config = engine.module.hf_config_dict() if hasattr(engine.module, "hf_config_dict") else None
        tok_file = copy_data_tokenizer(cfg.data.train, train_data.manifest, cfg.run.out_dir)
        export_model(weights, cfg.model, cfg.run.out_dir, info, run_config=cfg, hf_config=hf_config,
                     tokenizer_file=tok_file)
        atomic_write_json(os.path.join(cfg.run.out_dir, "summary.json"), summary)
        plot_loss_curve(os.path.join(cfg.run.out_dir, "metrics.jsonl"), os.path.join(cfg.run.out_dir, "loss.png"))
        log.info("done: %s", summary)
        metrics.close()
    barrier()
    return summary
