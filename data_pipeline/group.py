"""`trime group`: decide which segments share a memory (one global batch) and rewrite the shards, one group
per sample. Methods: random, consecutive (TrimeLM_long), bm25 (TrimeLM_ext; distributed under MPI).
Run as `mpiexec -n R trime group ...`; 1 and R ranks give identical output.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from data_pipeline.bm25 import BM25Params, NeighbourIndex, mean_pair_score
from data_pipeline.chain import (
    consecutive_order,
    cut_groups,
    greedy_chain,
    random_order,
)
from data_pipeline.group_search import (
    exchange_segments,
    gather_counts,
    load_neighbours,
    read_local_segments,
    search_neighbours,
    wait_for_all_ranks,
)
from data_pipeline.pruned_search import FetchedSegments, LocalIndex, sampled_recall_pruned, search_neighbours_pruned
from data_pipeline.tokenizer import SIDE_FILES
from trime_dist.core import locations, mpi, shards
from trime_dist.core.config import ConfigError, opt
from trime_dist.core.flags import add_dataclass_flags, dataclass_from_flags
from trime_dist.core.io import atomic_path, read_json, sha256_file
from trime_dist.core.launch_env import rank_on_host
from trime_dist.core.output_lock import output_lock

log = logging.getLogger(__name__)
METHODS = ("random", "consecutive", "bm25")


@dataclass
class GroupConfig:
    input: str = opt("", "segment shard directory made by `trime prepare`")
    output: str = opt("", "directory for the grouped shards")
    method: str = opt("bm25", "grouping method", choices=METHODS)
    group_size: int = opt(16, "G: segments per group = ranks x micro-batch in training")
    seed: int = opt(0, "seed of the random order / the chain's random restarts")
    top_k: int = opt(20, "bm25: neighbours kept per segment")
    k1: float = opt(0.9, "bm25: k1")
    b: float = opt(0.4, "bm25: b")
    min_df: int = opt(1, "bm25: terms in fewer segments are not scored")
    max_df_ratio: float = opt(1.0, "bm25: terms in more than this fraction of segments are not scored "
                                   "(1.0 = keep all; faster below)")
    stopwords: list[int] = opt(doc="bm25: token ids removed from every segment before indexing (also from its "
                                   "length)", factory=list)
    query_block: int = opt(256, "bm25: queries scored per block (one file each)")
    dense_df_ratio: float = opt(0.05, "bm25: terms in at least this fraction of segments are scored with a "
                                      "dense matmul")
    max_dense_terms: int = opt(1024, "bm25: cap on the dense terms")
    numba: bool = opt(True, "bm25: compiled sparse loop when numba is installed (~2x faster search; "
                            "else scipy only)")
    query_terms: int = opt(0, "bm25: pruned search: each segment queries with only its m terms of largest "
                              "count x idf, then its best --candidates are rescored exactly (0 = exact "
                              "all-pairs search; needs numba)")
    candidates: int = opt(100, "bm25 pruned search: candidates per segment rescored with the full query "
                               "(>= --top-k)")
    recall_sample: int = opt(256, "bm25 pruned search: segments whose exact top-k is also computed, to "
                                  "report the search's recall@k in the manifest (0 = skip)")
    groups_per_shard: int = opt(256, "groups per output tar shard")
    similarity_groups: int = opt(1000, "groups sampled for the mean within-group BM25 similarity report "
                                       "(0 = skip the report)")

    def bm25_params(self) -> BM25Params:
        return BM25Params(k1=self.k1, b=self.b, min_df=self.min_df, max_df_ratio=self.max_df_ratio,
                          dense_df_ratio=self.dense_df_ratio, max_dense_terms=self.max_dense_terms,
                          use_numba=self.numba, query_terms=self.query_terms, candidates=self.candidates)

    def grouping(self) -> dict:
        """The parameters that determine the groups (recorded in the manifest)."""
        g = {"method": self.method, "seed": self.seed}
        if self.method == "bm25":
            g.update(top_k=self.top_k, k1=self.k1, b=self.b, min_df=self.min_df, max_df_ratio=self.max_df_ratio,
                     stopwords=sorted(self.stopwords), dense_df_ratio=self.dense_df_ratio,
                     max_dense_terms=self.max_dense_terms, query_block=self.query_block, numba=self.numba)
            if self.query_terms > 0:  # absent in exact mode: exact manifests stay as they were
                g.update(query_terms=self.query_terms, candidates=self.candidates)
        return g


def validate_config(cfg: GroupConfig) -> None:
    def require(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--{key.replace('_', '-')}: {msg}")
    require(bool(cfg.input), "input", "is required (a directory made by `trime prepare`)")
    require(bool(cfg.output), "output", "is required")
    require(os.path.abspath(cfg.input) != os.path.abspath(cfg.output), "output", "must differ from --input")
    require(os.path.isdir(cfg.output) or not os.path.exists(cfg.output), "output",
            f"{cfg.output} is a file, expected a directory")
    require(cfg.method in METHODS, "method", f"got {cfg.method!r}, allowed: {', '.join(METHODS)}")
    for key in ("group_size", "top_k", "query_block", "groups_per_shard"):
        require(getattr(cfg, key) >= 1, key, f"must be >= 1, got {getattr(cfg, key)}")
    require(cfg.k1 >= 0 and 0 <= cfg.b <= 1, "k1", f"need k1 >= 0 and 0 <= b <= 1, got k1={cfg.k1}, b={cfg.b}")
    require(0 < cfg.max_df_ratio <= 1, "max_df_ratio", f"must be in (0, 1], got {cfg.max_df_ratio}")
    require(cfg.similarity_groups >= 0, "similarity_groups", f"must be >= 0, got {cfg.similarity_groups}")
    require(cfg.query_terms >= 0, "query_terms", f"must be >= 0 (0 = exact search), got {cfg.query_terms}")
    require(cfg.query_terms == 0 or cfg.candidates >= cfg.top_k, "candidates",
            f"must be >= --top-k ({cfg.top_k}) for the pruned search, got {cfg.candidates}")
    require(cfg.recall_sample >= 0, "recall_sample", f"must be >= 0, got {cfg.recall_sample}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_flags(parser, GroupConfig)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_flags(GroupConfig, args)
    validate_config(cfg)
    # rank 0 holds --output for the job; every rank stops with its refusal (one line each, no abort)
    with output_lock(cfg.output, rank=mpi.rank(), bcast=mpi.bcast):
        return _run(cfg)


def _run(cfg: GroupConfig) -> int:
    if mpi.size() == 1:
        return group_segments(cfg)
    try:
        return group_segments(cfg)
    except BaseException as e:  # noqa: BLE001 -- one failing rank must not leave the others waiting
        print(f"trime group: error: {rank_on_host(mpi.rank())}: {e}", file=sys.stderr, flush=True)
        mpi.get_comm().Abort(2)
        raise


# ----------------------------------------------------------------------------- the stage

def _check_source(cfg: GroupConfig) -> dict:
    manifest = shards.read_manifest(cfg.input)
    where = os.path.join(cfg.input, shards.MANIFEST)
    if manifest["format"] != shards.SEGMENTS_FORMAT:
        raise ValueError(f"{where}: format {manifest['format']!r}, expected {shards.SEGMENTS_FORMAT!r} "
                         f"(--input must be a `trime prepare` output)")
    tok = manifest["tokenizer"]
    tok_path = locations.resolve(cfg.input, tok["file"])
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"tokenizer file listed in {where} not found: {tok_path}")
    if sha256_file(tok_path) != tok["sha256"]:
        raise ValueError(f"{tok_path}: sha256 differs from {where}: the shards were made with another tokenizer")
    if manifest["segments"] == 0:
        raise ValueError(f"{where}: the corpus is empty (0 segments)")
    if cfg.group_size > manifest["segments"]:
        raise ConfigError(f"--group-size: {cfg.group_size} is larger than the {manifest['segments']} segments "
                          f"in {cfg.input}")
    bad_stop = [s for s in cfg.stopwords if not 0 <= s < tok["vocab_size"]]
    if bad_stop:
        raise ConfigError(f"--stopwords: token ids {bad_stop} outside the vocabulary [0, {tok['vocab_size']})")
    return manifest


def _existing_output(cfg: GroupConfig, source_sha: str) -> bool:
    """True if the output is already complete for these settings; raise if it holds another grouping."""
    path = os.path.join(cfg.output, shards.MANIFEST)
    if not os.path.isfile(path):
        return False
    done = read_json(path, "grouped shard manifest")
    same = (done.get("grouping") == cfg.grouping() and done.get("group_size") == cfg.group_size
            and done.get("source_manifest_sha256") == source_sha)
    if not same:
        raise ValueError(f"{path}: the output already holds another grouping ({done.get('grouping')}, "
                         f"G={done.get('group_size')}); choose another --output or delete it")
    return True


def group_segments(cfg: GroupConfig) -> int:
    clock = _PhaseClock()
    rank, world = mpi.rank(), mpi.size()
    source = _check_source(cfg)
    source_sha = sha256_file(os.path.join(cfg.input, shards.MANIFEST))
    if _existing_output(cfg, source_sha):
        if rank == 0:
            log.info("%s is already complete for these settings; nothing to do", cfg.output)
        return 0
    os.makedirs(cfg.output, exist_ok=True)
    n = source["segments"]
    local = read_local_segments(cfg.input, source, rank, world)
    clock.lap("read")
    index, recall = None, None
    if cfg.method == "bm25" and cfg.query_terms > 0:  # pruned: each rank indexes its own segments only
        index = LocalIndex(local.docs(set(cfg.stopwords)), local.first, source["tokenizer"]["vocab_size"], n,
                           cfg.bm25_params())
        clock.lap("index")
    elif cfg.method == "bm25" or cfg.similarity_groups > 0:  # exact: the whole index on every rank
        counts, doc_len, df = gather_counts(local.docs(set(cfg.stopwords)), source["tokenizer"]["vocab_size"], n)
        index = NeighbourIndex(counts, doc_len, df, cfg.bm25_params())
        clock.lap("index")
    order = None
    if cfg.method == "bm25":
        order, recall = _bm25_order(cfg, index, source_sha, clock, rank, world)
    elif rank == 0:
        order = random_order(n, cfg.seed) if cfg.method == "random" else consecutive_order(n)
    wait_for_all_ranks()
    order = mpi.bcast(order)
    clock.lap("chain")
    groups, dropped = cut_groups(order, cfg.group_size)                                # [n_groups, G]
    segs = exchange_segments(local, _writer_of_segments(cfg, groups, dropped, n, world), world)
    del local
    entries = _write_my_shards(cfg, source, groups, segs, rank, world)
    clock.lap("write")
    wait_for_all_ranks()
    scorer = index
    if isinstance(index, LocalIndex) and cfg.similarity_groups:  # fetch the sampled segments' counts
        scorer = FetchedSegments(index, np.concatenate([g.ravel() for g in _similarity_samples(groups, n, cfg)]))
    gathered = mpi.gather((entries, clock.cpu))
    if rank == 0:
        sim = _similarity_report(scorer, groups, n, cfg) if scorer is not None and cfg.similarity_groups else {}
        if recall:
            sim["pruned_search"] = recall
        clock.lap("similarity")
        dropped_keys = [shards.segment_key(segs[int(i)][1]["stream"], segs[int(i)][1]["index"]) for i in dropped]
        cpu_per_rank = [cpu for _, cpu in gathered]
        cpu_per_rank[0] = clock.cpu
        _finish(cfg, source, source_sha, groups, dropped_keys, [e for part, _ in gathered for e in part], sim,
                world, clock, cpu_per_rank)
    wait_for_all_ranks()
    return 0


def _bm25_order(cfg: GroupConfig, index: NeighbourIndex | LocalIndex, source_sha: str, clock: "_PhaseClock",
                rank: int, world: int) -> tuple[np.ndarray | None, dict | None]:
    """The neighbour search (exact: replicated index; pruned: partitioned), the pruned search's sampled
    recall, and the greedy chain on rank 0: (order [N] on rank 0 else None, recall on rank 0 else None)."""
    work = os.path.join(cfg.output, "neighbours")
    search = search_neighbours_pruned if isinstance(index, LocalIndex) else search_neighbours
    search(index, work, cfg.top_k, cfg.query_block, _search_fingerprint(cfg, source_sha), rank, world)
    clock.lap("search")
    wait_for_all_ranks()
    neighbours = load_neighbours(work, index.n_docs, cfg.top_k, cfg.query_block) if rank == 0 else None  # [N, k]
    recall = None
    if isinstance(index, LocalIndex) and cfg.recall_sample > 0:
        recall = sampled_recall_pruned(index, neighbours, cfg.recall_sample, cfg.top_k, cfg.seed + 2, rank)
        clock.lap("recall")
    return (greedy_chain(neighbours, cfg.seed) if rank == 0 else None), recall


class _PhaseClock:
    """Wall time and CPU time (this process) per phase of this rank, for the log and the manifest. CPU time
    is the fairer measure when ranks share cores with other work."""

    def __init__(self):
        self.start = self.last = time.time()
        self.last_cpu = time.process_time()
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now, now_cpu = time.time(), time.process_time()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.last, 2)
        self.cpu[name] = round(self.cpu.get(name, 0.0) + now_cpu - self.last_cpu, 2)
        self.last, self.last_cpu = now, now_cpu

    def total(self) -> float:
        return round(time.time() - self.start, 2)


def _search_fingerprint(cfg: GroupConfig, source_sha: str) -> dict:
    """Everything the neighbour block files depend on; blocks from other settings are discarded."""
    keys = ("top_k", "k1", "b", "min_df", "max_df_ratio", "stopwords", "query_block", "dense_df_ratio",
            "max_dense_terms", "numba") + (("query_terms", "candidates") if cfg.query_terms > 0 else ())
    return {"source_manifest_sha256": source_sha, **{k: cfg.grouping()[k] for k in keys}}


def _my_groups(cfg: GroupConfig, n_groups: int, rank: int, world: int) -> tuple[int, int, int]:
    """(first output shard, first group, end group) written by `rank`: a contiguous range of output shards
    (shard boundaries do not depend on the world size)."""
    n_shards = -(-n_groups // cfg.groups_per_shard)
    lo, hi = rank * n_shards // world, (rank + 1) * n_shards // world
    return lo, lo * cfg.groups_per_shard, min(hi * cfg.groups_per_shard, n_groups)


def _writer_of_segments(cfg: GroupConfig, groups: np.ndarray, dropped: np.ndarray, n: int, world: int) -> np.ndarray:
    """[N] rank that writes each segment's group; dropped segments go to rank 0 (it lists their keys)."""
    dest = np.zeros(n, dtype=np.int64)
    for r in range(world):
        _, g_lo, g_hi = _my_groups(cfg, len(groups), r, world)
        dest[groups[g_lo:g_hi].ravel()] = r
    dest[dropped] = 0
    return dest


def _write_my_shards(cfg: GroupConfig, source: dict, groups: np.ndarray, segs: dict, rank: int,
                     world: int) -> list[dict]:
    """This rank's output shards, from the segments `segs` {id: (tokens, meta)} sent to it."""
    lo, g_lo, g_hi = _my_groups(cfg, len(groups), rank, world)
    mine = groups[g_lo:g_hi]
    seq_len, pad = source["seq_len"], source["tokenizer"]["pad_id"]
    writer = shards.GroupShardWriter(cfg.output, max_groups=cfg.groups_per_shard, start_index=lo)
    for gi, members in enumerate(mine):
        rows = [segs[int(sid)] for sid in members]                                     # (tokens, meta) each
        tokens, _ = shards.pad_rows([t for t, _ in rows], seq_len + 1, pad)            # [G, L + 1]
        writer.add(g_lo + gi, tokens, [meta for _, meta in rows])
    return [{k: v for k, v in e.items() if k != "reused"} for e in writer.close()]


def _similarity_samples(groups: np.ndarray, n: int, cfg: GroupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(sampled groups, random groups of the same size and number) for the similarity report."""
    rng = np.random.default_rng(cfg.seed + 1)
    n_sample = min(cfg.similarity_groups, len(groups))
    sample = groups[np.sort(rng.choice(len(groups), n_sample, replace=False))]
    random_groups, _ = cut_groups(rng.permutation(n), cfg.group_size)
    return sample, random_groups[:n_sample]


def _similarity_report(scorer, groups: np.ndarray, n: int, cfg: GroupConfig) -> dict:
    """Mean BM25 score between members of the same group: these groups vs random groups of the same size.
    scorer: a NeighbourIndex or FetchedSegments (pair_scores of segment ids)."""
    sample, random_sample = _similarity_samples(groups, n, cfg)
    return {"groups_sampled": int(len(sample)), "mean_within_group_bm25": mean_pair_score(scorer, sample),
            "mean_within_group_bm25_random": mean_pair_score(scorer, random_sample)}


def _finish(cfg: GroupConfig, source: dict, source_sha: str, groups: np.ndarray, dropped_keys: list[str],
            entries: list[dict], sim: dict, world: int, clock: _PhaseClock, cpu_per_rank: list[dict]) -> None:
    """Copy the tokenizer, remove stale shards, write the manifest LAST (it marks the output complete)."""
    tok = source["tokenizer"]
    # The tokenizer file, and a HF folder's special-token settings when prepare copied them, so the
    # grouped output is a tokenizer folder on its own too.
    for name in (tok["file"], *SIDE_FILES):
        if name == tok["file"] or os.path.isfile(os.path.join(cfg.input, name)):
            with atomic_path(os.path.join(cfg.output, name)) as tmp:
                shutil.copyfile(os.path.join(cfg.input, name), tmp)
    listed = {e["path"] for e in entries}
    for name in os.listdir(cfg.output):
        stale_tmp = name.startswith(".") and name.endswith(".tmp")  # left by a killed writer
        if (name.startswith("group-") and name.endswith(".tar") and name not in listed) or stale_tmp:
            os.remove(os.path.join(cfg.output, name))
    manifest = {
        "format": shards.GROUPS_FORMAT, "group_size": cfg.group_size, "seq_len": source["seq_len"],
        "tokenizer": dict(tok), "grouping": cfg.grouping(), "groups": int(len(groups)),
        "segments": int(groups.size), "dropped_segments": len(dropped_keys), "dropped_keys": dropped_keys,
        "source_manifest_sha256": source_sha, "shards": entries, "similarity": sim,
        "created_by": "trime group", "world_size": world, "seconds": clock.total(),
        "seconds_rank0": clock.phases, "cpu_seconds_per_rank": cpu_per_rank,
    }
    shards.write_manifest(cfg.output, manifest)
    log.info("grouped %d segments into %d groups of %d (%d dropped) with %s in %.1fs on %d rank(s); "
             "rank 0 phases (s): %s", source["segments"], len(groups), cfg.group_size, len(dropped_keys), cfg.method,
             clock.total(), world, clock.phases)
    if sim:
        log.info("mean within-group BM25 similarity: %.3f (random groups: %.3f, %d groups sampled)",
                 sim["mean_within_group_bm25"], sim["mean_within_group_bm25_random"], sim["groups_sampled"])

