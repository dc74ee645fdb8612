"""`trime eval`: perplexity under none / local / long / external memory, kNN-LM interpolation, τ search.

Settings that share a model share one pass over the data: each batch of windows is encoded once,
each datastore searched once (batched), then every setting's loss is computed from the same
logits and keys. Runs in one process; prints a table and writes a JSON file.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from trime_dist.core.constants import IGNORE_INDEX, LAYOUTS
from trime_dist.core.io import batched
from trime_dist.core.shards import pad_rows
from trime_dist.eval.memory import KeyCache, window_nll
from trime_dist.eval.windows import Window, iter_windows

log = logging.getLogger(__name__)


@dataclass
class EvalSetting:
    """One row of the table: a model under one memory setting."""
    name: str = ""
    model: str = ""
    memory: str = "local"          # none | local | long | external
    datastore: str = ""            # needed by external and by kNN interpolation
    k: int = 1024                  # neighbours retrieved per query
    nprobe: int = 32               # IVF lists visited per search
    temperature: float = 1.0       # τ of memory similarities q·k / (sqrt(d)·τ)
    mem_size: int = 1024           # long / external: cached keys from preceding windows of the stream
    knn_lambda: float = 0.0        # λ of P = (1-λ)·P_trime + λ·P_knn (0 = no interpolation)
    knn_temperature: float = 1.0   # τ_knn of P_knn = softmax(score / τ_knn), raw score: q·k or -||q-k||^2 (l2)
    rescore: bool = False          # neighbours' scores recomputed from the stored keys (IVF-PQ's are approximate)

    def validate(self) -> None:
        if self.memory not in LAYOUTS:
            raise ValueError(f"setting {self.name!r}: memory {self.memory!r}, expected one of {LAYOUTS}")
        if not self.model:
            raise ValueError(f"setting {self.name!r}: no model (--model or model=...)")
        if self.retrieves and not self.datastore:
            raise ValueError(f"setting {self.name!r}: memory={self.memory}, knn_lambda={self.knn_lambda} "
                             "needs a datastore (--datastore DIR)")
        if not 0.0 <= self.knn_lambda <= 1.0 or self.temperature <= 0 or self.knn_temperature <= 0:
            raise ValueError(f"setting {self.name!r}: need 0 <= knn_lambda <= 1 and positive temperatures")
        if self.k < 1 or self.nprobe < 1 or self.mem_size < 0:
            raise ValueError(f"setting {self.name!r}: need k >= 1, nprobe >= 1, mem_size >= 0")

    @property
    def retrieves(self) -> bool:
        return self.memory == "external" or self.knn_lambda > 0


# ----------------------------------------------------------------------------- the passes

@dataclass
class SearchGrid:
    """The values tried on the validation split (each empty = not searched): τ for rows with memory, λ and τ_knn
    for rows that interpolate with the kNN distribution (knn_lambda > 0). Every point of a row's grid is scored
    in one pass; the row is then evaluated at the point of least validation loss."""
    taus: tuple = ()
    lambdas: tuple = ()
    knn_temperatures: tuple = ()

    def for_setting(self, s: EvalSetting) -> tuple[list[float], list[float], list[float]]:
        interpolates = s.knn_lambda > 0
        return (list(self.taus) if self.taus and s.memory != "none" else [s.temperature],   # τ scales memory only
                list(self.lambdas) if self.lambdas and interpolates else [s.knn_lambda],
                list(self.knn_temperatures) if self.knn_temperatures and interpolates else [s.knn_temperature])

    def searches(self, s: EvalSetting) -> bool:
        return self.for_setting(s) != ([s.temperature], [s.knn_lambda], [s.knn_temperature])


def evaluate_settings(settings: list[EvalSetting], data_dir: str, valid_dir: str = "", taus: list[float] = (),
                      context_window: int = 0, batch_size: int = 8, max_segments: int = 0,
                      device: torch.device = torch.device("cpu"), search: str = "faiss",
                      lambdas: list[float] = (), knn_temperatures: list[float] = ()) -> list[dict]:
    """One row dict per setting (in order); settings of one model share each pass. The model runs on
    `device` (bf16 autocast on a GPU); search = faiss (the stores' indexes) or exact (keys on `device`).
    taus / lambdas / knn_temperatures: the SearchGrid searched on valid_dir first."""
    from trime_dist.core import shards
    from trime_dist.model.export import check_tokenizer, load_model

    grid = SearchGrid(tuple(taus), tuple(lambdas), tuple(knn_temperatures))
    manifest = shards.read_manifest(data_dir)
    rows: dict[int, dict] = {}
    for model_path in dict.fromkeys(s.model for s in settings):
        group = [i for i, s in enumerate(settings) if s.model == model_path]
        model, info = load_model(model_path, device)
        log.info("model %s (%s): %s in one pass over %s", model_path, info["model_id"],
                 ", ".join(settings[i].name for i in group), data_dir)
        stores = open_stores([settings[i] for i in group], info, manifest, data_dir, search, device, context_window)
        chosen = {i: settings[i] for i in group}
        searched = {}
        tuned = [i for i in group if grid.searches(settings[i])]
        if tuned:
            valid_manifest = shards.read_manifest(valid_dir)
            check_tokenizer(info, valid_manifest, valid_dir, model_path)
            grids = [grid.for_setting(settings[i]) for i in tuned]
            result = eval_pass(model, valid_dir, valid_manifest, [settings[i] for i in tuned], stores,
                               [g[0] for g in grids], context_window, batch_size, max_segments,
                               [g[1] for g in grids], [g[2] for g in grids])
            for i, g, r in zip(tuned, grids, result["settings"]):
                chosen[i], searched[i] = pick_from_grid(settings[i], g, r["nll"] / max(r["tokens"], 1))
                log.info("%s: search on %s: %s -> τ = %g, λ = %g, τ_knn = %g", settings[i].name, valid_dir,
                         "; ".join(f"{k}: " + ", ".join(f"{v}: {loss:.4f}" for v, loss in d.items())
                                   for k, d in searched[i].items() if d),
                         chosen[i].temperature, chosen[i].knn_lambda, chosen[i].knn_temperature)
        check_tokenizer(info, manifest, data_dir, model_path)
        result = eval_pass(model, data_dir, manifest, [chosen[i] for i in group], stores,
                           [[chosen[i].temperature] for i in group], context_window, batch_size, max_segments)
        for i, r in zip(group, result["settings"]):
            rows[i] = make_row(chosen[i], info, stores, r, searched.get(i, {}), context_window, data_dir,
                               result["tokens_per_s"])
            rows[i].update(text_metrics(rows[i]["loss"], rows[i]["tokens"], manifest))
    return [rows[i] for i in range(len(settings))]


def pick_from_grid(s: EvalSetting, grid: tuple[list, list, list], losses: np.ndarray) -> tuple[EvalSetting, dict]:
    """(s at the grid point of least loss, {"tau_search" / "lambda_search" / "knn_temperature_search": {value:
    valid loss along that axis through the best point}, None for an axis not searched}); losses [n_tau*n_l*n_k]."""
    taus, lams, knn_taus = grid
    losses = np.asarray(losses).reshape(len(taus), len(lams), len(knn_taus))
    t, l, k = np.unravel_index(int(np.argmin(losses)), losses.shape)
    best = dataclasses.replace(s, temperature=taus[t], knn_lambda=lams[l], knn_temperature=knn_taus[k])

    def axis(values, line, was):
        return {f"{v:g}": float(x) for v, x in zip(values, line)} if values != [was] else None

    return best, {"tau_search": axis(taus, losses[:, l, k], s.temperature),
                  "lambda_search": axis(lams, losses[t, :, k], s.knn_lambda),
                  "knn_temperature_search": axis(knn_taus, losses[t, l, :], s.knn_temperature)}


def open_stores(settings: list[EvalSetting], info: dict, manifest: dict, data_dir: str, search: str = "faiss",
                device: torch.device = torch.device("cpu"), context_window: int = 0) -> dict:
    from trime_dist.datastore.store import open_datastore

    stores = {}
    for s in settings:
        if s.retrieves and s.datastore not in stores:
            ds = open_datastore(s.datastore)
            ds.check_compatible(info, manifest["tokenizer"]["sha256"], data_dir)
            stored = (int(ds.meta.get("context_window", 0)), int(ds.meta.get("seq_len", manifest["seq_len"])))
            if stored != (context_window, int(manifest["seq_len"])):
                log.warning("datastore %s was encoded with --context-window %d over %d-token windows, but this "
                            "evaluation uses --context-window %d over %d-token windows: its keys saw other contexts "
                            "than the queries (rebuild it with `trime datastore build --context-window %d`)",
                            s.datastore, *stored, context_window, int(manifest["seq_len"]), context_window)
            if search == "exact":
                t0 = time.perf_counter()
                ds.use_exact_search(device)
                log.info("datastore %s: %d keys on %s for exact search (%.1f s)", s.datastore, ds.meta["count"],
                         device, time.perf_counter() - t0)
            stores[s.datastore] = ds
    return stores


def text_metrics(loss: float, tokens: int, manifest: dict) -> dict:
    """Per-word perplexity and bits per byte / character of the evaluated text, comparable across tokenizers
    (the paper's WikiText-103 numbers are per word; enwik8's bits per byte): the total NLL over the text's
    counts that `trime prepare` records (manifest "text"). word_ppl divides by words + line ends (WikiText's
    </s> tokens). None unless every target of the split was scored and the manifest has the counts."""
    text = manifest.get("text")
    if not text or tokens != int(manifest["tokens"]):
        return {"word_ppl": None, "bits_per_byte": None, "bits_per_char": None, "words": None}
    nll = loss * tokens
    words = int(text["words"]) + int(text["lines"])
    return {"word_ppl": math.exp(nll / max(words, 1)), "bits_per_byte": nll / (max(int(text["bytes"]), 1) * math.log(2)),
            "bits_per_char": nll / (max(int(text["chars"]), 1) * math.log(2)), "words": words}


def make_row(s: EvalSetting, info: dict, stores: dict, r: dict, searched: dict, context_window: int,
             data_dir: str, tokens_per_s: float) -> dict:
    loss = float(r["nll"][0] / max(r["tokens"], 1))
    ds = stores.get(s.datastore)
    return {"name": s.name, "model": s.model, "model_id": info["model_id"], "memory": s.memory,
            "loss": loss, "ppl": math.exp(loss), "tokens": int(r["tokens"]), "temperature": s.temperature,
            "k": s.k if s.retrieves else None, "nprobe": s.nprobe if s.retrieves else None,
            "knn_lambda": s.knn_lambda, "knn_temperature": s.knn_temperature if s.knn_lambda > 0 else None,
            "rescore": s.rescore if s.retrieves else None,
            "mem_size": s.mem_size if s.memory in ("long", "external") else None,
            "datastore": s.datastore if s.retrieves else None, "datastore_id": ds.id if ds and s.retrieves else None,
            "metric": ds.metric if ds and s.retrieves else None,
            "tau_search": searched.get("tau_search"), "lambda_search": searched.get("lambda_search"),
            "knn_temperature_search": searched.get("knn_temperature_search"), "context_window": context_window,
            "data": data_dir, "pass_tokens_per_s": tokens_per_s}


def eval_pass(model, data_dir: str, manifest: dict, settings: list[EvalSetting], stores: dict,
              taus: list[list[float]], context_window: int = 0, batch_size: int = 8,
              max_segments: int = 0, lambdas: list[list[float]] | None = None,
              knn_temperatures: list[list[float]] | None = None) -> dict:
    """{"settings": [{"nll": [n_tau * n_lambda * n_knn_tau] summed nats (τ slowest), "tokens"}], "tokens_per_s",
    "seconds": {forward, search, memory}} for one model; per setting, the grid of its τ values (`taus`), λ values
    (`lambdas`, default: its knn_lambda) and τ_knn values (default: its knn_temperature), all from the same
    forward pass and search (tokens_per_s: scored tokens over the whole pass, data reading included)."""
    from tqdm import tqdm

    lambdas = lambdas or [[s.knn_lambda] for s in settings]
    knn_temperatures = knn_temperatures or [[s.knn_temperature] for s in settings]

    L = int(manifest["seq_len"])
    pad_id = int(manifest["tokenizer"]["pad_id"])
    cached = [s.mem_size for s in settings if s.memory in ("long", "external")]
    cache = KeyCache(max(cached) + context_window if cached else 0)
    device = next(model.parameters()).device
    sums = [torch.zeros(len(t) * len(lam) * len(kt), dtype=torch.float64, device=device)   # summed on the device:
            for t, lam, kt in zip(taus, lambdas, knn_temperatures)]
    n_scored = torch.zeros((), dtype=torch.long, device=device)                     # no sync per window
    stream, start_time = None, time.perf_counter()
    windows = iter_windows(data_dir, manifest, L, context_window, max_segments)
    seconds = {"forward": 0.0, "search": 0.0, "memory": 0.0}   # search runs beside forward and memory

    def timed_search(batch, keys):
        t0 = time.perf_counter()
        found = search_batch(batch, keys, settings, stores)
        seconds["search"] += time.perf_counter() - t0
        return found

    def start(batch, pool):
        """Queue the batch's forward pass; its datastore search starts in the background thread."""
        t0 = time.perf_counter()
        logits, keys, targets = forward_windows(model, batch, pad_id)       # [B, T, V], [B, T, D], [B, T]
        seconds["forward"] += time.perf_counter() - t0
        return batch, logits, keys, targets, pool.submit(timed_search, batch, keys)

    def score(batch, logits, keys, targets, search):
        nonlocal stream, n_scored
        found = search.result()
        t0 = time.perf_counter()
        positions = torch.arange(targets.shape[1], device=device)           # [T]
        for b, w in enumerate(batch):
            if w.stream != stream:
                cache.reset()
                stream = w.stream
            n, s0 = w.length, w.score_from
            for i, s in enumerate(settings):
                ext = found.get((s.datastore, s.k, s.nprobe, s.rescore))
                nll = setting_nll(s, logits[b, s0:n], targets[b, :n], keys[b, :n], s0, cache, w,
                                  None if ext is None else (ext[0][b], ext[1][b]), taus[i], lambdas[i],
                                  knn_temperatures[i])                                     # [n_grid, N]
                sums[i] += nll.sum(1).double()
            n_scored += (targets[b, s0:n] != IGNORE_INDEX).sum()
            cache.push(keys[b, s0:n], targets[b, s0:n], w.start + positions[s0:n])
        seconds["memory"] += time.perf_counter() - t0

    # A two-stage pipeline: batch i+1's forward runs (on the GPU) and batch i's search (faiss on the CPU, or
    # the exact search) runs in a thread while batch i-1 is scored, so neither side waits for the other.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in tqdm(batched(windows, batch_size), desc="eval", unit="batch", leave=False):
            current = start(batch, pool)
            if pending is not None:
                score(*pending)
            pending = current
        if pending is not None:
            score(*pending)
    n_scored = int(n_scored)  # every setting scores the same tokens
    elapsed = time.perf_counter() - start_time
    return {"settings": [{"nll": sums[i].cpu().numpy(), "tokens": n_scored} for i in range(len(settings))],
            "tokens_per_s": n_scored / max(elapsed, 1e-9), "seconds": seconds}


@torch.inference_mode()
def forward_windows(model, batch: list[Window], pad_id: int):
    """Pad the windows into [B, T] and run the model on its device (bf16 autocast on a GPU):
    (logits [B, T, V] fp32, keys [B, T, D] fp32, targets [B, T]), all on that device."""
    from trime_dist.core.device import inference_autocast

    device = next(model.parameters()).device
    tokens, lengths = pad_rows([w.tokens for w in batch], None, pad_id, dtype=np.int64)   # [B, T + 1], [B]
    tokens = torch.from_numpy(tokens)
    targets = tokens[:, 1:].clone()                                                        # [B, T]
    targets[torch.arange(targets.shape[1])[None, :] >= torch.from_numpy(lengths)[:, None]] = IGNORE_INDEX
    with inference_autocast(device):
        logits, keys = model(tokens[:, :-1].to(device, non_blocking=True))
    return logits.float(), keys.float(), targets.to(device)


def search_batch(batch: list[Window], keys: torch.Tensor, settings: list[EvalSetting], stores: dict) -> dict:
    """{(datastore, k, nprobe, rescore): ([scores [N_b, k]] per window, [labels [N_b, k]] per window)}: one
    search each."""
    out = {}
    for s in settings:
        spec = (s.datastore, s.k, s.nprobe, s.rescore)
        if not s.retrieves or spec in out:
            continue
        queries = torch.cat([keys[b, w.score_from:w.length] for b, w in enumerate(batch)])   # [Q, D]
        scores, ids, labels = stores[s.datastore].search_tensor(queries, s.k, s.nprobe)     # [Q, k]
        if s.rescore:
            scores = rescore_neighbours(stores[s.datastore], queries, ids)
        sizes = [w.length - w.score_from for w in batch]
        out[spec] = (scores.split(sizes), labels.split(sizes))
    return out


def rescore_neighbours(store, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[Q, k] scores recomputed from the stored (fp16) keys of the retrieved ids in the store's metric (q·k, or
    -||q - k||^2 for l2), as kNN-LM recomputes its distances from the stored keys: IVF-PQ's scores are those of
    compressed keys. -inf where id is -1."""
    from trime_dist.datastore.exact import similarity

    found = ids >= 0
    stored = torch.from_numpy(store.keys(ids.clamp(min=0).cpu().numpy())).to(queries.device)    # [Q, k, D]
    scores = similarity(queries, stored, store.metric)                                          # [Q, k]
    return torch.where(found, scores, torch.full_like(scores, float("-inf")))


def setting_nll(s: EvalSetting, vocab_logits, window_targets, window_keys, s0: int, cache: KeyCache,
                w: Window, ext, taus: list[float], lambdas: list[float] | None = None,
                knn_temperatures: list[float] | None = None) -> torch.Tensor:
    """[n_tau * n_lambda * n_knn_tau, N] NLL of the scored positions s0.. of one window under setting s, for each
    point of the grid (λ and τ_knn default to the setting's)."""
    n = window_keys.shape[0]
    queries, targets = window_keys[s0:], window_targets[s0:]                        # [N, D], [N]
    keys = labels = mask = None
    if s.memory != "none":
        keys, labels = window_keys, window_targets                                  # [n, D], [n]
        pos = torch.arange(n, device=window_keys.device)
        mask = pos[None, :] < pos[s0:, None]                                        # [N, n] j < i
        if s.memory in ("long", "external"):
            c_keys, c_labels = cache.memory(w.start, s.mem_size)                    # [m, D], [m]
            if c_keys is not None and len(c_labels):
                keys, labels = torch.cat([c_keys, keys]), torch.cat([c_labels, labels])
                mask = torch.cat([mask.new_ones(len(queries), len(c_labels)), mask], 1)
    ext_scores, ext_labels = ext if ext is not None else (None, None)
    return window_nll(vocab_logits, targets, queries, keys, labels, mask, ext_scores, ext_labels, taus,
                      ext_in_softmax=s.memory == "external", knn_lambda=lambdas or [s.knn_lambda],
                      knn_temperature=knn_temperatures or [s.knn_temperature])
