"""`trime datastore build`: the kNN datastore of (memory key g(c_j), next token y_j) pairs and its
faiss index, built by R ranks (any launcher) in four resumable steps: encode, train, add, merge.

Layout of DS_DIR: build.json (what is being built), parts/{keys,values}-pNNNNN.npy (fp16 [n, D],
int32 [n] memmaps) with part-pNNNNN.json, trained.index, parts/index-pNNNNN.faiss, index.faiss, and
datastore.json, written last: a store is complete only when it exists (docs/FORMATS.md).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time

import numpy as np

from trime_dist.core.io import atomic_write_json, read_json
from trime_dist.core.progress import show_progress
from trime_dist.datastore import parts as build
from trime_dist.datastore.config import DatastoreConfig
from trime_dist.datastore.store import FORMAT, KEY_TYPE, META_FILE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- build

def build_datastore(cfg: DatastoreConfig) -> dict:
    """All four steps on every rank of the launcher's world; returns the final metadata."""
    import torch

    from trime_dist.core import shards
    from trime_dist.core.device import pick_device
    from trime_dist.core.distributed import barrier, broadcast_object, init_distributed
    from trime_dist.core.mpi import plan_on_root
    from trime_dist.model.export import load_model

    env = init_distributed(timeout_s=cfg.dist_timeout_s, net_interface=cfg.net_interface,
                           net_interface_key="net_interface")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
        build.dsi.set_threads(cfg.threads)
    device = pick_device(cfg.device, env.local_rank)
    model, info = load_model(cfg.model, device)
    log.info("rank %d/%d encodes on %s", env.rank, env.world_size, device)
    manifest = shards.read_manifest(cfg.data)
    # every rank stops with rank 0's error instead of waiting at a barrier
    plan = plan_on_root(lambda: _resolve_plan(cfg, model, info, manifest, env.world_size), rank=env.rank,
                        bcast=broadcast_object)
    if os.path.isfile(os.path.join(cfg.out, META_FILE)):  # same plan (checked above): nothing to do
        log.info("%s is complete already (%s exists)", cfg.out, META_FILE)
        return read_json(os.path.join(cfg.out, META_FILE), "datastore metadata")
    parts = build.plan_parts(int(manifest["segments"]), plan["part_segments"])
    mine = [p for p in parts if p.index % env.world_size == env.rank]
    _encode_step(cfg, model, manifest, mine, len(parts), env.rank, device)
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
    from trime_dist.core import shards
    from trime_dist.model.export import check_tokenizer

    if manifest["format"] != "trime-segments/v1":
        raise ValueError(f"{cfg.data}: datastore build needs prepared segment shards (trime prepare output), "
                         f"got format {manifest['format']!r}")
    check_tokenizer(info, manifest, cfg.data, cfg.model)
    data_tok = manifest["tokenizer"]["sha256"]
    build.dsi.check_factory(cfg.factory, model.cfg.d_model)
    seq_len = int(manifest["seq_len"])
    if not 0 <= cfg.context_window < seq_len:
        raise ValueError(f"--context-window {cfg.context_window}: must be in [0, {seq_len}) (the data's segment "
                         f"length, {cfg.data}/manifest.json)")
    # one key per target token: the manifest's count, known before anything is encoded
    build.dsi.check_factory_fits(cfg.factory, int(manifest["tokens"]), cfg.train_sample, cfg.data)
    if int(manifest["seq_len"]) > model.cfg.max_seq_len:
        raise ValueError(f"{cfg.data}: seq_len {manifest['seq_len']} exceeds the model's max_seq_len "
                         f"{model.cfg.max_seq_len} ({cfg.model}); prepare the data with --seq-len <= "
                         f"{model.cfg.max_seq_len}")
    n_segments = int(manifest["segments"])
    part_segments = cfg.part_segments or max(1, -(-n_segments // world_size))
    plan = {"model_id": info["model_id"], "data_manifest_sha256": shards.manifest_sha256(cfg.data),
            "tokenizer_sha256": data_tok, "factory": cfg.factory, "part_segments": part_segments,
            "dim": model.cfg.d_model, "seq_len": int(manifest["seq_len"]), "train_sample": cfg.train_sample,
            "seed": cfg.seed, "ondisk": cfg.ondisk, "context_window": cfg.context_window, "metric": cfg.metric}
    path = os.path.join(cfg.out, "build.json")
    build.remove_temp_files(cfg.out)  # of a killed build; rank 0 plans before any rank writes
    if os.path.isfile(path):
        old = read_json(path, "datastore build plan")
        old.setdefault("context_window", 0)  # plans written before these settings existed
        old.setdefault("metric", "ip")
        if cfg.part_segments == 0:  # auto: keep the earlier choice so finished parts stay valid
            plan["part_segments"] = old.get("part_segments", part_segments)
        diff = sorted(k for k in plan if old.get(k) != plan[k])
        started = build.encoded_parts(cfg.out)
        if diff and started:
            raise ValueError(f"{path}: a build with different {', '.join(diff)} "
                             f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}) is in this directory; "
                             "use another --out or delete it")
        if not diff:
            log.info("resuming the build in %s", cfg.out)
            return plan
        # nothing was encoded under the old plan (e.g. it failed at its first step): the new one replaces it
        log.warning("%s: replacing the plan of an earlier build that encoded nothing (%s)", path,
                    ", ".join(f"{k}: {old.get(k)!r} -> {plan[k]!r}" for k in diff))
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(path, plan)
    return plan


def _encode_step(cfg, model, manifest: dict, mine: list, n_parts: int, rank: int, device) -> None:
    todo = []
    for part in mine:
        paths = build.part_paths(cfg.out, part)
        if build.part_is_encoded(paths, part, model.cfg.d_model):
            log.info("part %s: encoded already, skipping", part.stem)
        else:
            todo.append((part, paths, build.count_targets(cfg.data, manifest, part)))
    # one bar for the job on rank 0: its keys, times parts / its parts (the parts are dealt round-robin)
    with show_progress(sum(c for _, _, c in todo), "datastore encode", "key", rank=rank,
                       scale=n_parts / max(len(mine), 1)) as bar:
        for done, (part, paths, count) in enumerate(todo, start=1):
            for stale in (paths["index_info"], paths["index"]):  # an index part of older keys is stale
                if os.path.exists(stale):
                    os.remove(stale)
            t0 = time.perf_counter()
            n = build.encode_part(model, cfg.data, manifest, part, paths, cfg.batch_size, device, cfg.context_window,
                                  count, bar)
            dt = time.perf_counter() - t0
            log.info("part %s: encoded %d keys (segments %d..%d) in %.1f s, %.0f keys/s", part.stem, n,
                     part.first_segment, part.end_segment, dt, n / max(dt, 1e-9))
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
    build.dsi.train_index(cfg.factory, sample, path, cfg.seed, cfg.metric)
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
    from trime_dist.core import locations

    index_paths = [build.part_paths(cfg.out, p)["index"] for p in parts]
    t0 = time.perf_counter()
    ntotal = build.dsi.merge_parts(os.path.join(cfg.out, "trained.index"), index_paths,
                                   os.path.join(cfg.out, "index.faiss"), cfg.factory, cfg.ondisk)
    if ntotal != total:
        raise ValueError(f"{cfg.out}: merged index holds {ntotal} keys, the parts {total}")
    log.info("index: merged %d parts (%s) in %.1f s", len(parts), "on disk" if cfg.ondisk else "in memory",
             time.perf_counter() - t0)
    # an inner-product store keeps the id it had before --metric existed
    metric = "" if cfg.metric == "ip" else f"|{cfg.metric}"
    key = f"{plan['model_id']}|{plan['data_manifest_sha256']}|{cfg.factory}{metric}"
    ident = hashlib.sha256(key.encode()).hexdigest()
    meta = {"format": FORMAT, "datastore_id": ident[:16], "model_id": plan["model_id"], "key_type": KEY_TYPE,
            "dim": plan["dim"], "dtype": "float16", "value_dtype": "int32", "count": total,
            "tokenizer_sha256": plan["tokenizer_sha256"], "data_manifest_sha256": plan["data_manifest_sha256"],
            "data": locations.describe(cfg.data), "model": os.path.abspath(cfg.model), "seq_len": plan["seq_len"],
            "context_window": plan["context_window"],
            "factory": cfg.factory, "metric": cfg.metric, "index": "index.faiss", "ondisk": cfg.ondisk,
            "world_size": world_size, "created_by": "trime datastore build",
            "parts": [{"keys": os.path.relpath(build.part_paths(cfg.out, p)["keys"], cfg.out),
                       "values": os.path.relpath(build.part_paths(cfg.out, p)["values"], cfg.out),
                       "first_id": first, "segments": [p.first_segment, p.end_segment]}
                      for p, first in zip(parts, offsets)]}
    atomic_write_json(os.path.join(cfg.out, META_FILE), meta)
    log.info("datastore %s complete: %d keys, index %s", cfg.out, total, cfg.factory)
    return meta
