"""`trime eval`: perplexity under none / local / long / external memory, kNN-LM interpolation, τ search.

Settings that share a model share one pass over the data: each batch of windows is encoded once,
each datastore searched once (batched), then every setting's loss is computed from the same
logits and keys. On R ranks (any torch launcher) the streams are dealt to the ranks whole (a stream's
long-memory chain never crosses ranks), each rank scores its share and the summed losses (every grid point's:
the τ / λ / τ_knn searches see the same sums as one process) and token counts are reduced; an exact store
is sharded over the ranks (each holds 1/R of the keys, every search round is a collective), a faiss index
is searched by each rank on its own replica. Rank 0 prints the table and writes the JSON.
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
from trime_dist.core.device import mark_ready, run_on_side_stream, side_stream, use_side_results
from trime_dist.core.io import batched
from trime_dist.core.shards import pad_rows
from trime_dist.eval.memory import KeyCache, window_nll
from trime_dist.eval.windows import Window, deal_streams, iter_windows, stream_sizes

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
    from trime_dist.core.distributed import get_rank, get_world_size
    from trime_dist.model.export import check_tokenizer, load_model

    grid = SearchGrid(tuple(taus), tuple(lambdas), tuple(knn_temperatures))
    manifest = shards.read_manifest(data_dir)
    rows: dict[int, dict] = {}
    for model_path in dict.fromkeys(s.model for s in settings):
        group = [i for i, s in enumerate(settings) if s.model == model_path]
        model, info = load_model(model_path, device)
        log.info("model %s (%s): %s in one pass over %s", model_path, info["model_id"],
                 ", ".join(settings[i].name for i in group), data_dir)
        stores = open_stores([settings[i] for i in group], info, manifest, data_dir, search, device, context_window,
                             rank=get_rank(), world_size=get_world_size())
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
                               result["tokens_per_s"], result["ranks"])
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
                device: torch.device = torch.device("cpu"), context_window: int = 0, rank: int = 0,
                world_size: int = 1) -> dict:
    """{datastore path: Datastore} of the settings that retrieve. search=exact: this rank's 1/world_size of
    the keys on `device` (a collective: every rank calls it, and every rank raises when one rank's shard does
    not fit); faiss: each rank searches its own (memory-mapped) replica of the index; faiss-shard: each rank
    1/world_size of the index's entries (a collective too)."""
    from trime_dist.core.distributed import raise_first_error
    from trime_dist.datastore.exact import check_shard_fits, shard_range
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
                count, dim = int(ds.meta["count"]), int(ds.meta["dim"])
                error = None
                try:
                    check_shard_fits(s.datastore, count, dim, device, rank, world_size, ds.metric,
                                     ranks_here=world_size if device.type != "cuda" else 1)
                except ValueError as e:
                    error = e
                raise_first_error(error)  # every rank stops, not only the one whose shard does not fit
                ds.use_exact_search(device, rank, world_size)
                lo, hi = shard_range(count, rank, world_size)
                log.info("datastore %s: exact search, keys [%d, %d) of %d (rank %d of %d) on %s (%.1f s)", s.datastore,
                         lo, hi, count, rank, world_size, device, time.perf_counter() - t0)
            elif search == "faiss-shard":
                t0 = time.perf_counter()
                where = ds.use_faiss_shard(device, s.nprobe, rank, world_size)
                lo, hi, _ = ds.faiss_shard
                log.info("datastore %s: faiss search (%s) with %s, rank %d of %d's shard: ids [%d, %d) (%.1f s)",
                         s.datastore, ds.meta.get("factory", "?"), where, rank, world_size, lo, hi,
                         time.perf_counter() - t0)
            else:
                where = ds.use_faiss_on(device, s.nprobe)
                log.info("datastore %s: faiss search (%s) with %s%s", s.datastore, ds.meta.get("factory", "?"),
                         where, f", rank {rank}'s own replica" if world_size > 1 else "")
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
             data_dir: str, tokens_per_s: float, ranks: int = 1) -> dict:
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
            "data": data_dir, "pass_tokens_per_s": tokens_per_s, "ranks": ranks}


def eval_pass(model, data_dir: str, manifest: dict, settings: list[EvalSetting], stores: dict,
              taus: list[list[float]], context_window: int = 0, batch_size: int = 8,
              max_segments: int = 0, lambdas: list[list[float]] | None = None,
              knn_temperatures: list[list[float]] | None = None) -> dict:
    """{"settings": [{"nll": [n_tau * n_lambda * n_knn_tau] summed nats (τ slowest), "tokens"}], "tokens_per_s",
    "seconds": {forward, search, memory}} for one model; per setting, the grid of its τ values (`taus`), λ values
    (`lambdas`, default: its knn_lambda) and τ_knn values (default: its knn_temperature), all from the same
    forward pass and search (tokens_per_s: scored tokens over the whole pass, data reading included).

    On R ranks (a process group) each rank scores the windows of its streams (rank_share) and the sums and
    token counts returned are those of all ranks (every rank returns the same); tokens_per_s is the total over
    the slowest rank's time; "ranks": R."""
    from trime_dist.core.distributed import get_rank, get_world_size
    from trime_dist.core.progress import track

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
    rank, world_size = get_rank(), get_world_size()
    stream, start_time = None, time.perf_counter()
    streams, rounds = rank_share(data_dir, manifest, L, context_window, max_segments, batch_size, rank, world_size)
    dealt_s = time.perf_counter() - start_time
    windows = iter_windows(data_dir, manifest, L, context_window, max_segments, streams)
    batches = batched(windows, batch_size)
    if rounds is not None:  # every rank runs the same number of rounds: a sharded search is a collective
        batches = _padded(batches, rounds)
    seconds = {"forward": 0.0, "search": 0.0, "memory": 0.0}   # search runs beside forward and memory

    # On a GPU the search's kernels go to a stream of their own (one stream would queue them behind the next
    # forward pass); events order them after the keys are written and the scoring after the search.
    search_stream = side_stream(device)

    def timed_search(batch, keys, keys_ready):
        t0 = time.perf_counter()
        found = run_on_side_stream(search_stream, keys_ready, search_batch, batch, keys, settings, stores)
        seconds["search"] += time.perf_counter() - t0
        return found

    def start(batch, pool):
        """Queue the batch's forward pass; its datastore search starts in the background thread."""
        if not batch:  # this rank has no windows left: it only serves its shard in the round's search
            return batch, None, None, None, pool.submit(timed_search, batch, None, mark_ready(search_stream, device))
        t0 = time.perf_counter()
        logits, keys, targets = forward_windows(model, batch, pad_id)       # [B, T, V], [B, T, D], [B, T]
        seconds["forward"] += time.perf_counter() - t0
        return batch, logits, keys, targets, pool.submit(timed_search, batch, keys, mark_ready(search_stream, device))

    def score(batch, logits, keys, targets, search):
        nonlocal stream, n_scored
        found, search_done = search.result()
        use_side_results(search_done, [t for v in found.values() if v is not None for part in v for t in part],
                         device)
        if not batch:
            return
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
        # every rank runs `rounds` batches when that is known: rank 0's count is the job's
        for batch in track(batches, "eval", "batch", rank=rank, total=rounds, leave=False):
            current = start(batch, pool)
            if pending is not None:
                score(*pending)
            pending = current
        if pending is not None:
            score(*pending)
    elapsed = time.perf_counter() - start_time
    log.info("rank %d of %d: %d tokens of %s in %.2f s (deal %.2f s, forward %.2f s, search %.2f s, memory %.2f s)",
             rank, world_size, int(n_scored), data_dir, elapsed, dealt_s, seconds["forward"], seconds["search"],
             seconds["memory"])
    if world_size > 1:
        sums, n_scored, elapsed = reduce_pass(sums, n_scored, elapsed)
    n_scored = int(n_scored)  # every setting scores the same tokens
    return {"settings": [{"nll": sums[i].cpu().numpy(), "tokens": n_scored} for i in range(len(settings))],
            "tokens_per_s": n_scored / max(elapsed, 1e-9), "seconds": seconds, "ranks": world_size}


def rank_share(data_dir: str, manifest: dict, seq_len: int, context_window: int, max_segments: int,
               batch_size: int, rank: int, world_size: int) -> tuple[set | None, int | None]:
    """(the stream ids this rank scores, the number of batch rounds every rank runs): rank 0 reads the streams'
    sizes and deals them (windows.deal_streams), every rank gets the same deal (or rank 0's error). One process:
    (None, None), every stream, no rounds."""
    if world_size == 1:
        return None, None
    from trime_dist.core.distributed import broadcast_object
    from trime_dist.core.mpi import plan_on_root

    def plan():
        sizes = stream_sizes(data_dir, manifest, seq_len, context_window, max_segments)
        dealt = deal_streams(sizes, world_size)
        windows = {s.stream: s.windows for s in sizes}
        tokens = {s.stream: s.tokens for s in sizes}
        return {"streams": dealt, "windows": [sum(windows[x] for x in d) for d in dealt],
                "tokens": [sum(tokens[x] for x in d) for d in dealt]}

    deal = plan_on_root(plan, rank=rank, bcast=broadcast_object)
    rounds = max(-(-n // batch_size) for n in deal["windows"])
    log.info("rank %d of %d scores %d of %d streams of %s: %d windows, %d tokens (%d rounds of %d windows)",
             rank, world_size, len(deal["streams"][rank]), sum(map(len, deal["streams"])), data_dir,
             deal["windows"][rank], deal["tokens"][rank], rounds, batch_size)
    return set(deal["streams"][rank]), rounds


def _padded(batches, rounds: int):
    """The batches, then empty ones up to `rounds` in all."""
    n = 0
    for b in batches:
        n += 1
        yield b
    for _ in range(rounds - n):
        yield []


def reduce_pass(sums: list[torch.Tensor], n_scored: torch.Tensor, elapsed: float):
    """(every rank's sums added (float64), the token count added (int64), the slowest rank's seconds), the same
    on every rank (rank 0's result is sent to all, so every rank picks the same grid point)."""
    from trime_dist.core.distributed import all_reduce_max, all_reduce_sum, broadcast_object

    sizes = [len(x) for x in sums]
    total = all_reduce_sum(torch.cat(sums)) if sums else torch.zeros(0, dtype=torch.float64)
    tokens = all_reduce_sum(n_scored.reshape(1))
    slowest = all_reduce_max(torch.tensor([elapsed], dtype=torch.float64, device=tokens.device))
    total, tokens, slowest = broadcast_object((total.cpu().numpy(), int(tokens), float(slowest)))
    return [torch.from_numpy(x) for x in np.split(total, np.cumsum(sizes)[:-1])], tokens, slowest


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
        store = stores[s.datastore]
        if not batch:  # an empty round: only a sharded search needs this rank (it serves its shard)
            if store.collective:
                store.search_tensor(torch.zeros(0, int(store.meta["dim"])), s.k, s.nprobe)
            out[spec] = None
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
