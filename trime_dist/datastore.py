"""`trime datastore build | info`: the kNN datastore of (memory key g(c_j), next token y_j) pairs and its
faiss index, built by R ranks (any launcher); and `open_datastore`, the reader eval uses.

Layout of DS_DIR: build.json (what is being built), parts/{keys,values}-pNNNNN.npy (fp16 [n, D],
int32 [n] memmaps) with part-pNNNNN.json, trained.index, parts/index-pNNNNN.faiss, index.faiss, and
datastore.json, written last: a store is complete only when it exists (docs/FORMATS.md).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from trime_dist import datastore_build as build
from trime_dist.io_utils import atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = "trime-datastore/v1"
KEY_TYPE = "last_ffn_input"
META_FILE = "datastore.json"


@dataclass
class DatastoreConfig:
    model: str = field(default="", metadata={"help": "trained run directory (or its model/ directory)"})
    data: str = field(default="", metadata={"help": "prepared segment shards to store (`trime prepare` output)"})
    out: str = field(default="", metadata={"help": "datastore directory (created; a rerun resumes it)"})
    factory: str = field(default="Flat", metadata={"help": "faiss index: Flat | IVF{nlist},PQ{m} | IVF{nlist},Flat"})
    train_sample: int = field(default=100_000, metadata={"help": "keys sampled to train an IVF index"})
    batch_size: int = field(default=16, metadata={"help": "segments per forward pass when encoding"})
    part_segments: int = field(default=0, metadata={"help": "segments per part (0 = split evenly over the ranks)"})
    ondisk: bool = field(default=False, metadata={"help": "merge IVF lists into an on-disk index.ivfdata"})
    seed: int = field(default=0, metadata={"help": "seed of the training sample and k-means"})
    threads: int = field(default=0, metadata={"help": "torch / faiss threads per rank (0 = leave as is)"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.cli_utils import add_dataclass_flags

    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    b = sub.add_parser("build", help="encode the data, train the index, add and merge (R ranks, resumable)")
    add_dataclass_flags(b, DatastoreConfig)
    i = sub.add_parser("info", help="print a datastore's metadata")
    i.add_argument("path", help="datastore directory")
    for p in (b, i):
        p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    if args.action == "info":
        ds = open_datastore(args.path, load_values=False)
        for k, v in ds.meta.items():
            if k != "parts":
                print(f"{k:>22}: {v}")
        print(f"{'parts':>22}: {len(ds.meta['parts'])}")
        return 0
    from trime_dist.cli_utils import dataclass_from_flags

    cfg = dataclass_from_flags(DatastoreConfig, args)
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"trime datastore build: --{name} is required")
    from trime_dist.distributed import shutdown_distributed

    try:
        build_datastore(cfg)
    finally:
        shutdown_distributed()
    return 0


# ----------------------------------------------------------------------------- build

def build_datastore(cfg: DatastoreConfig) -> dict:
    """All four steps on every rank of the launcher's world; returns the final metadata."""
    import torch

    from data_pipeline import shards
    from trime_dist.checkpoint import load_model
    from trime_dist.distributed import barrier, broadcast_object, init_distributed

    env = init_distributed()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        build.dsi.set_threads(cfg.threads)
    model, _, info = load_model(cfg.model)
    manifest = shards.read_manifest(cfg.data)
    plan = None
    if env.rank == 0:
        try:
            plan = _resolve_plan(cfg, model, info, manifest, env.world_size)
        except (ValueError, FileNotFoundError) as e:
            plan = {"error": str(e)}  # every rank stops with the message instead of waiting at a barrier
    plan = broadcast_object(plan)
    if "error" in plan:
        raise ValueError(plan["error"])
    if os.path.isfile(os.path.join(cfg.out, META_FILE)):  # same plan (checked above): nothing to do
        log.info("%s is complete already (%s exists)", cfg.out, META_FILE)
        return read_json(os.path.join(cfg.out, META_FILE), "datastore metadata")
    parts = build.plan_parts(int(manifest["segments"]), plan["part_segments"])
    mine = [p for p in parts if p.index % env.world_size == env.rank]
    _encode_step(cfg, model, manifest, mine)
    barrier()
    offsets = build.part_offsets(cfg.out, parts)
    total = sum(int(read_json(build.part_paths(cfg.out, p)["info"])["count"]) for p in parts)
    if env.rank == 0:
        _train_step(cfg, parts, offsets, total)
    barrier()
    _add_step(cfg, mine, offsets)
    barrier()
    meta = None
    if env.rank == 0:
        meta = _merge_step(cfg, plan, parts, offsets, total, env.world_size)
    barrier()
    return meta or read_json(os.path.join(cfg.out, META_FILE), "datastore metadata")


def _resolve_plan(cfg, model, info: dict, manifest: dict, world_size: int) -> dict:
    """What is being built; written once to build.json, and a rerun must agree with it."""
    if manifest["format"] != "trime-segments/v1":
        raise ValueError(f"{cfg.data}: datastore build needs prepared segment shards (trime prepare output), "
                         f"got format {manifest['format']!r}")
    data_tok = manifest["tokenizer"]["sha256"]
    if info.get("tokenizer_sha256") not in (None, data_tok):
        raise ValueError(f"{cfg.data} was tokenized with tokenizer {data_tok[:12]}..., but the model in {cfg.model} "
                         f"was trained with tokenizer {info['tokenizer_sha256'][:12]}...: keys would be meaningless")
    build.dsi.check_factory(cfg.factory, model.cfg.d_model)
    n_segments = int(manifest["segments"])
    part_segments = cfg.part_segments or max(1, -(-n_segments // world_size))
    plan = {"model_id": info["model_id"], "data_manifest_sha256": sha256_file(os.path.join(cfg.data, "manifest.json")),
            "tokenizer_sha256": data_tok, "factory": cfg.factory, "part_segments": part_segments,
            "dim": model.cfg.d_model, "seq_len": int(manifest["seq_len"]), "train_sample": cfg.train_sample,
            "seed": cfg.seed, "ondisk": cfg.ondisk}
    path = os.path.join(cfg.out, "build.json")
    if os.path.isfile(path):
        old = read_json(path, "datastore build plan")
        if cfg.part_segments == 0:  # auto: keep the earlier choice so finished parts stay valid
            plan["part_segments"] = old.get("part_segments", part_segments)
        diff = sorted(k for k in plan if old.get(k) != plan[k])
        if diff:
            raise ValueError(f"{path}: a build with different {', '.join(diff)} "
                             f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}) is in this directory; "
                             "use another --out or delete it")
        log.info("resuming the build in %s", cfg.out)
    else:
        os.makedirs(cfg.out, exist_ok=True)
        atomic_write_json(path, plan)
    return plan


def _encode_step(cfg, model, manifest: dict, mine: list) -> None:
    done = 0
    for part in mine:
        paths = build.part_paths(cfg.out, part)
        if build.part_is_encoded(paths, part, model.cfg.d_model):
            log.info("part %s: encoded already, skipping", part.stem)
            continue
        for stale in (paths["index_info"], paths["index"]):  # an index part of older keys is stale
            if os.path.exists(stale):
                os.remove(stale)
        t0 = time.perf_counter()
        n = build.encode_part(model, cfg.data, manifest, part, paths, cfg.batch_size)
        dt = time.perf_counter() - t0
        log.info("part %s: encoded %d keys (segments %d..%d) in %.1f s, %.0f keys/s", part.stem, n,
                 part.first_segment, part.end_segment, dt, n / max(dt, 1e-9))
        done += 1
        build.maybe_exit("encode", done)


def _train_step(cfg, parts: list, offsets: list[int], total: int) -> None:
    path = os.path.join(cfg.out, "trained.index")
    if os.path.isfile(path):
        log.info("index: trained already, skipping")
        return
    if total == 0:
        raise ValueError(f"{cfg.data}: no targets to store")
    if build.dsi.needs_training(cfg.factory):
        sample = build.sample_keys(cfg.out, parts, offsets, total, cfg.train_sample, cfg.seed)   # [n, D]
    else:  # Flat: nothing to learn, the "trained" index is just the empty one
        sample = np.zeros((0, int(read_json(build.part_paths(cfg.out, parts[0])["info"])["dim"])), np.float32)
    t0 = time.perf_counter()
    build.dsi.train_index(cfg.factory, sample, path, cfg.seed)
    log.info("index: trained %s on %d keys in %.1f s", cfg.factory, len(sample), time.perf_counter() - t0)
    build.maybe_exit("train")


def _add_step(cfg, mine: list, offsets: list[int]) -> None:
    done = 0
    for part in mine:
        paths = build.part_paths(cfg.out, part)
        count = int(read_json(paths["info"])["count"])
        if build.index_part_is_added(paths, count):
            log.info("part %s: added already, skipping", part.stem)
            continue
        t0 = time.perf_counter()
        build.add_part(cfg.out, part, offsets[part.index], cfg.factory)
        dt = time.perf_counter() - t0
        log.info("part %s: added %d keys to the index (ids from %d) in %.1f s, %.0f keys/s", part.stem, count,
                 offsets[part.index], dt, count / max(dt, 1e-9))
        done += 1
        build.maybe_exit("add", done)


def _merge_step(cfg, plan: dict, parts: list, offsets: list[int], total: int, world_size: int) -> dict:
    index_paths = [build.part_paths(cfg.out, p)["index"] for p in parts]
    t0 = time.perf_counter()
    ntotal = build.dsi.merge_parts(os.path.join(cfg.out, "trained.index"), index_paths,
                                   os.path.join(cfg.out, "index.faiss"), cfg.factory, cfg.ondisk)
    if ntotal != total:
        raise ValueError(f"{cfg.out}: merged index holds {ntotal} keys, the parts {total}")
    log.info("index: merged %d parts (%s) in %.1f s", len(parts), "on disk" if cfg.ondisk else "in memory",
             time.perf_counter() - t0)
    ident = hashlib.sha256(f"{plan['model_id']}|{plan['data_manifest_sha256']}|{cfg.factory}".encode()).hexdigest()
    meta = {"format": FORMAT, "datastore_id": ident[:16], "model_id": plan["model_id"], "key_type": KEY_TYPE,
            "dim": plan["dim"], "dtype": "float16", "value_dtype": "int32", "count": total,
            "tokenizer_sha256": plan["tokenizer_sha256"], "data_manifest_sha256": plan["data_manifest_sha256"],
            "data": os.path.abspath(cfg.data), "model": os.path.abspath(cfg.model), "seq_len": plan["seq_len"],
            "factory": cfg.factory, "metric": "inner_product", "index": "index.faiss", "ondisk": cfg.ondisk,
            "world_size": world_size, "created_by": "trime datastore build",
            "parts": [{"keys": os.path.relpath(build.part_paths(cfg.out, p)["keys"], cfg.out),
                       "values": os.path.relpath(build.part_paths(cfg.out, p)["values"], cfg.out),
                       "first_id": first, "segments": [p.first_segment, p.end_segment]}
                      for p, first in zip(parts, offsets)]}
    atomic_write_json(os.path.join(cfg.out, META_FILE), meta)
    log.info("datastore %s complete: %d keys, index %s", cfg.out, total, cfg.factory)
    return meta


# ----------------------------------------------------------------------------- reading

class Datastore:
    """A complete datastore: metadata, values (in RAM), keys (memmapped per part) and the index."""

    def __init__(self, path: str, load_values: bool = True):
        self.path = path
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {path} is not a complete datastore "
                                    "(run `trime datastore build`, or rerun it to finish an interrupted build)")
        self.meta = read_json(meta_path, "datastore metadata")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.first_ids = np.array([p["first_id"] for p in self.meta["parts"]], dtype=np.int64)
        self.values = np.concatenate([np.load(os.path.join(path, p["values"]), mmap_mode="r")
                                      for p in self.meta["parts"]]) if load_values else None
        self._index = None

    @property
    def id(self) -> str:
        return self.meta["datastore_id"]

    def check_compatible(self, model_info: dict, tokenizer_sha256: str, data_dir: str = "") -> None:
        """Refuse a store built by other weights, or whose tokens are not those of the data evaluated."""
        m = self.meta
        if m["model_id"] != model_info["model_id"]:
            raise ValueError(f"datastore {self.path} was built with model {m['model_id']} ({m.get('model')}), "
                             f"but the model evaluated is {model_info['model_id']}: its keys are not comparable. "
                             "Build a datastore with this model (`trime datastore build --model ...`)")
        if m["tokenizer_sha256"] != tokenizer_sha256:
            raise ValueError(f"datastore {self.path} uses tokenizer {m['tokenizer_sha256'][:12]}..., but the data "
                             f"{data_dir} uses tokenizer {tokenizer_sha256[:12]}...: token ids do not match")

    def keys(self, ids: np.ndarray) -> np.ndarray:
        """[*, D] float32 stored keys of global ids (ids >= 0)."""
        flat = ids.reshape(-1)
        part = np.searchsorted(self.first_ids, flat, side="right") - 1
        out = np.empty((len(flat), self.meta["dim"]), dtype=np.float32)
        for p in np.unique(part):
            keys = np.load(os.path.join(self.path, self.meta["parts"][p]["keys"]), mmap_mode="r")
            sel = part == p
            out[sel] = keys[flat[sel] - self.first_ids[p]]
        return out.reshape(ids.shape + (self.meta["dim"],))

    def all_keys(self) -> np.ndarray:
        """[count, D] float32 (tests, small stores)."""
        return self.keys(np.arange(self.meta["count"], dtype=np.int64))

    def index(self, nprobe: int):
        """The faiss index (loaded once, memory-mapped), with nprobe set."""
        if self._index is None:
            # on-disk lists are memory-mapped by faiss itself; IO_FLAG_MMAP on top of them crashes faiss 1.15
            self._index = build.dsi.load_search_index(os.path.join(self.path, self.meta["index"]), nprobe,
                                                      mmap=not self.meta["ondisk"])
        build.dsi.set_nprobe(self._index, nprobe)
        return self._index

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores [N, k] inner products, ids [N, k], labels [N, k]; id -1 / label -100 where missing)."""
        scores, ids = build.dsi.search(self.index(nprobe), queries, k)
        labels = np.where(ids >= 0, self.values[np.maximum(ids, 0)], -100).astype(np.int64)
        return scores, ids, labels


def open_datastore(path: str, load_values: bool = True) -> Datastore:
    return Datastore(path, load_values)
