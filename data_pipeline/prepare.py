"""`trime prepare`: tokenize text files into segment shards (docs/FORMATS.md), as MPI ranks.

Rank 0 cuts the inputs into pieces (files larger than --split-mb into byte ranges that end at document
boundaries: data_pipeline/input_pieces.py), trains the tokenizer (or loads a given one: a tokenizer.json or a
Hugging Face tokenizer folder) and broadcasts both; each rank owns a contiguous block of the pieces and writes
its own shards; rank 0 writes manifest.json last. Neither the pieces nor the tokenizer depend on the number of
ranks, so neither do the segments. Reruns reuse finished shards; a complete output with other settings is
refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from data_pipeline.input_pieces import Piece, plan_pieces, rank_block
from data_pipeline.segmenter import Segmenter, stream_id
from data_pipeline.text_input import FORMATS, expand_inputs, iter_documents
from data_pipeline.tokenizer import KINDS, SIDE_FILES, UNK, TokenizerSource
from trime_dist.core import shards
from trime_dist.core.config import opt
from trime_dist.core.io import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
)
from trime_dist.core.launch_env import rank_on_host
from trime_dist.core.output_lock import output_lock
from trime_dist.core.progress import show_progress

log = logging.getLogger(__name__)

STATE_FILE = ".prepare-state.json"       # rank 0: settings + tokenizer of the run in progress
RANK_RECORD = ".prepare-r{rank:03d}.json"  # each rank: its finished shard entries
PROGRESS = ".prepare-r{rank:03d}-progress.json"  # each rank: the cut pieces finished so far (resume after a kill)
PROGRESS_GLOB = ".prepare-r*-progress.json"
DOC_BATCH = 64                           # documents per tokenizer call


@dataclass
class PrepareConfig:
    input: list[str] = opt(doc="input files, folders (searched recursively) or globs ('data/**/*.jsonl.gz'): text, "
                               "JSONL, Parquet (each text file may be .gz / .xz / .zst) or a `datasets` save_to_disk "
                               "folder", factory=list)
    output: str = opt("", "output shard directory")
    seq_len: int = opt(128, "tokens per segment L")
    tokenizer_kind: str = opt("bpe", "tokenizer to train", choices=KINDS)
    vocab_size: int = opt(4096, "BPE vocabulary size")
    tokenizer: Optional[str] = opt(None, "use this tokenizer instead of training: a tokenizer.json or a Hugging "
                                   "Face tokenizer folder (save_pretrained); it needs no pad token")
    eod_token: Optional[str] = opt(None, "end-of-document token (default: the tokenizer's EOS token; "
                                   "<eod> for trained tokenizers)")
    tokenizer_sample_mb: float = opt(256.0, "MiB of text (spread over files and their pieces) to train on")
    stream_per_document: bool = opt(False, "each document is its own stream")
    format: str = opt("auto", "text: blank-line separated docs; file: one doc per file; wikitext: ' = Title = ' "
                      "headings; jsonl: a text field per line; parquet: a text column; hf_dataset: a datasets "
                      "save_to_disk folder; auto: by extension and content", choices=FORMATS)
    text_field: str = opt("text", "the field (JSONL) or column (Parquet, datasets folders) that holds the text")
    shard_segments: int = opt(2000, "segments per shard")
    split_mb: float = opt(16.0, "an uncompressed text, WikiText or JSONL file larger than this is cut into pieces "
                          "of about this many MiB, where a document starts, so that one big file keeps every rank "
                          "busy; each piece is a stream of its own (compressed files, Parquet and datasets folders "
                          "stay whole); the cuts do not depend on the number of ranks; 0: never cut")
    overwrite: bool = opt(False, "start from scratch, replacing an existing output")


# ----------------------------------------------------------------------------- one rank's work

TEXT_STATS = ("words", "lines", "bytes", "chars")


def text_stats(docs: list[str]) -> dict[str, int]:
    """What per-word and per-byte metrics divide by (docs/FORMATS.md, "text"): whitespace-separated words,
    newlines (WikiText's line-end </s> tokens), UTF-8 bytes and characters."""
    return {"words": sum(len(d.split()) for d in docs), "lines": sum(d.count("\n") for d in docs),
            "bytes": sum(len(d.encode("utf-8")) for d in docs), "chars": sum(len(d) for d in docs)}


def doc_token_ids(piece: Piece, tok, eod_id: int, pbar, text_field: str = "text",
                  stats: Optional[dict] = None) -> Iterator[np.ndarray]:
    """Each document's token ids followed by the end-of-document token, int32 [n + 1], in file order;
    the text's counts are added to `stats`."""
    from data_pipeline.tokenizer import encode_docs

    docs = iter_documents(piece.path, piece.fmt, text_field, piece.start, piece.end)
    while batch := list(itertools.islice(docs, DOC_BATCH)):
        if stats is not None:
            for k, v in text_stats(batch).items():
                stats[k] = stats.get(k, 0) + v
        for ids in encode_docs(tok, batch):
            yield np.array(ids + [eod_id], dtype=np.int32)
        pbar.update(sum(len(d.encode("utf-8")) for d in batch))


def tokenize_piece(piece: Piece, piece_index: int, cfg: PrepareConfig, tok, eod_id: int,
                   writer: shards.SegmentShardWriter, pbar) -> dict[str, int]:
    """Cut one piece's documents into segments of one stream (or one per document with
    --stream-per-document) and hand them to `writer`; returns counts {docs, streams, words, lines, bytes, chars}."""
    streams, seg, sid = 0, None, None

    def end_stream():
        for index, start, tokens in seg.finish():
            writer.add(sid, index, start, tokens)

    docs = unknown = 0
    stats = dict.fromkeys(TEXT_STATS, 0)
    unk_id = tok.token_to_id(UNK)  # char tokenizers (and some given ones) have one
    for docs, ids in enumerate(doc_token_ids(piece, tok, eod_id, pbar, cfg.text_field, stats), start=1):
        if unk_id is not None:
            unknown += int((ids == unk_id).sum())
        if seg is None or cfg.stream_per_document:
            if seg is not None:
                end_stream()
            seg, sid, streams = Segmenter(cfg.seq_len), stream_id(piece_index, streams), streams + 1
        for index, start, tokens in seg.push(ids):
            writer.add(sid, index, start, tokens)
    if seg is not None:
        end_stream()
    if unknown:
        log.warning("%s: %d characters the tokenizer does not know became %s (decoding will not give the text "
                    "back; for a char tokenizer raise --tokenizer-sample-mb)", piece.path, unknown, UNK)
    return {"docs": docs, "streams": streams, **stats}


def process_rank(cfg: PrepareConfig, pieces: list[Piece], rank: int, world: int, tok_json: str,
                 eod_id: int, fingerprint: dict) -> dict[str, Any]:
    """Write this rank's shards; returns {"shards": entries, "docs", "streams", ..., "seconds", "cpu_seconds"}.

    A cut piece ends its last shard, and the pieces finished so far are recorded then (PROGRESS), so a rerun
    after a kill goes on after them."""
    from data_pipeline.tokenizer import tokenizer_from_str

    tok = tokenizer_from_str(tok_json)
    mine = rank_block([p.size for p in pieces], rank, world)
    writer = shards.SegmentShardWriter(cfg.output, rank, cfg.shard_segments)  # imports webdataset
    counts = {"docs": 0, "streams": 0, **dict.fromkeys(TEXT_STATS, 0)}
    done = resume_progress(cfg, rank, fingerprint, writer, counts)
    progress = os.path.join(cfg.output, PROGRESS.format(rank=rank))
    t0, cpu0 = time.time(), time.process_time()
    # one bar for the job on rank 0: its bytes, times all bytes / its bytes (the ranks' blocks are of equal bytes)
    share = sum(pieces[i].size for i in mine)
    with show_progress(sum(pieces[i].size for i in mine[done:]), "prepare", "B", rank=rank, unit_scale=True,
                       scale=sum(p.size for p in pieces) / share if share else 1.0) as pbar:
        for n, i in enumerate(mine[done:], start=done + 1):
            for k, v in tokenize_piece(pieces[i], i, cfg, tok, eod_id, writer, pbar).items():
                counts[k] += v
            if pieces[i].end is not None:  # a cut (so big) piece: keep it, whatever happens next
                writer.flush()
                atomic_write_json(progress, {"fingerprint": fingerprint, "pieces_done": n,
                                             "shards": writer.entries, "counts": counts})
    entries = writer.close()
    result = {"shards": entries, **counts, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0}
    tokens = sum(e["tokens"] for e in entries)
    log.info("rank %d: %d pieces of %d files, %d docs, %d streams, %d segments, %d tokens, %.0f tokens/s "
             "(%d shards, %d reused)",
             rank, len(mine), len({pieces[i].path for i in mine}), counts["docs"], counts["streams"],
             sum(e["segments"] for e in entries), tokens, tokens / max(result["seconds"], 1e-9), len(entries),
             sum(e["reused"] for e in entries))
    return result


def resume_progress(cfg: PrepareConfig, rank: int, fingerprint: dict, writer: shards.SegmentShardWriter,
                    counts: dict[str, int]) -> int:
    """How many of this rank's pieces an interrupted run with the same settings finished (their shards
    verify): the writer goes on after their shards and `counts` starts from theirs."""
    path = os.path.join(cfg.output, PROGRESS.format(rank=rank))
    if not os.path.isfile(path):
        return 0
    record = read_json(path, "prepare progress record")
    if record.get("fingerprint") != fingerprint:
        return 0
    try:
        for entry in record["shards"]:
            shards.verify_shard(entry, cfg.output)
    except (ValueError, FileNotFoundError) as e:
        log.warning("rank %d: starting over, a shard of the interrupted run does not verify: %s", rank, e)
        return 0
    writer.resume_after([dict(e, reused=True) for e in record["shards"]])
    counts.update(record["counts"])
    log.info("rank %d: going on after %d finished pieces (%d shards)", rank, record["pieces_done"],
             len(record["shards"]))
    return int(record["pieces_done"])


def reuse_rank_record(cfg: PrepareConfig, rank: int, fingerprint: dict) -> Optional[dict]:
    """This rank's finished result from an earlier run with the same settings, if its shards verify."""
    path = os.path.join(cfg.output, RANK_RECORD.format(rank=rank))
    if not os.path.isfile(path):
        return None
    record = read_json(path, "prepare rank record")
    if record.get("fingerprint") != fingerprint:
        return None
    try:
        for entry in record["result"]["shards"]:
            shards.verify_shard(entry, cfg.output)
    except (ValueError, FileNotFoundError) as e:
        log.warning("rank %d: redoing work, an earlier shard does not verify: %s", rank, e)
        return None
    log.info("rank %d: reusing %d finished shards", rank, len(record["result"]["shards"]))
    return record["result"]


# ----------------------------------------------------------------------------- rank 0: plan

def settings_of(cfg: PrepareConfig, files: list[str], world: int, given: Optional[TokenizerSource] = None,
                pieces: Optional[list[Piece]] = None) -> dict[str, Any]:
    """Everything that determines the output; a complete output with other settings is refused."""
    s = dataclasses.asdict(cfg)
    for k in ("input", "output", "overwrite", "tokenizer", "split_mb"):  # split_mb: the cuts it made count
        s.pop(k)
    cuts = {p.path: [] for p in pieces or [] if p.start}
    for p in pieces or []:
        if p.start:
            cuts[p.path].append(p.start)
    if cuts:
        s["cuts"] = cuts
    s["tokenizer_file_sha256"] = sha256_file(given.json_path) if given else None
    if given and given.side:  # a folder's settings choose the EOS (end-of-document) and pad tokens
        s["tokenizer_settings_sha256"] = hashlib.sha256(json.dumps(given.side, sort_keys=True).encode()).hexdigest()
    s["inputs"] = [[f, quick_fingerprint(f)] for f in files]
    s["world_size"] = world
    return s


def quick_fingerprint(path: str, edge: int = 1 << 20) -> str:
    """sha256 of (size, first MiB, last MiB): notices edited inputs without reading whole corpora (a folder:
    the fingerprints of its files)."""
    if os.path.isdir(path):
        parts = sorted((os.path.relpath(os.path.join(r, n), path), quick_fingerprint(os.path.join(r, n), edge))
                       for r, _, fs in os.walk(path) for n in fs)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    h = hashlib.sha256(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        f.seek(max(0, os.path.getsize(path) - edge))
        h.update(f.read(edge))
    return h.hexdigest()


def clear_output(out: str) -> None:
    """Remove what an earlier prepare wrote (only our own file names)."""
    names = [shards.MANIFEST, shards.TOKENIZER_FILE, STATE_FILE, *SIDE_FILES]
    paths = [os.path.join(out, n) for n in names] + glob.glob(os.path.join(out, "shard-r*-*.tar")) \
        + glob.glob(os.path.join(out, ".prepare-r*.json"))
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def check_existing(cfg: PrepareConfig, settings: dict) -> bool:
    """True if the output is already complete with these settings; clears stale outputs."""
    out = cfg.output
    state_path = os.path.join(out, STATE_FILE)
    if cfg.overwrite:
        clear_output(out)
    elif os.path.isfile(os.path.join(out, shards.MANIFEST)):
        old = shards.read_manifest(out).get("settings") or {}
        # a different number of ranks gives the same segments: a complete output stays valid
        diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k) and k != "world_size")
        if diff:
            raise ValueError(f"{out} already holds prepared shards made with other settings "
                             f"(differ: {', '.join(diff)}); use --overwrite or another --output")
        try:
            for entry in shards.read_manifest(out)["shards"]:
                shards.verify_shard(entry, out)
            return True
        except (ValueError, FileNotFoundError) as e:
            log.warning("redoing the damaged part of %s: %s", out, e)
            os.remove(os.path.join(out, shards.MANIFEST))
            if old.get("world_size") != settings["world_size"]:
                clear_output(out)  # other ranks, other shard names: start clean
    elif os.path.isfile(state_path) and read_json(state_path).get("settings") != settings:
        clear_output(out)  # an interrupted run with other settings: nothing of it is reusable
    return False


def sample_texts(pieces: list[Piece], cfg: PrepareConfig) -> Iterator[str]:
    """Documents from every piece (so from all over a big file), at most tokenizer_sample_mb / len(pieces) MiB
    per piece."""
    per_piece = cfg.tokenizer_sample_mb * 2**20 / len(pieces)
    for p in pieces:
        taken = 0
        for doc in iter_documents(p.path, p.fmt, cfg.text_field, p.start, p.end):
            yield doc
            taken += len(doc)
            if taken >= per_piece:
                break


def given_tokenizer(cfg: PrepareConfig) -> Optional[tuple[TokenizerSource, dict]]:
    """--tokenizer read and checked (its EOS or --eod-token) before the output is touched; None: train one."""
    from data_pipeline.tokenizer import (
        configured_special,
        describe_tokenizer,
        read_tokenizer_source,
        tokenizer_from_str,
    )

    if not cfg.tokenizer:
        return None
    src = read_tokenizer_source(cfg.tokenizer)
    tok = tokenizer_from_str(src.text, src.json_path)
    return src, describe_tokenizer(tok, configured_special(src), cfg.eod_token, cfg.tokenizer)


def make_tokenizer(cfg: PrepareConfig, pieces: list[Piece], settings: dict,
                   given: Optional[tuple[TokenizerSource, dict]]) -> tuple[str, dict]:
    """(tokenizer.json text, its manifest entry less file/sha256): the given tokenizer (copied byte for byte,
    so splits share one sha256, with a folder's special-token settings), else the one of an interrupted run,
    else trained now on a sample of the inputs."""
    from data_pipeline.tokenizer import (
        build_tokenizer,
        describe_tokenizer,
        tokenizer_from_str,
    )

    out_tok = os.path.join(cfg.output, shards.TOKENIZER_FILE)
    state_path = os.path.join(cfg.output, STATE_FILE)
    side: dict[str, str] = {}
    if given:
        src, info = given
        tok_json, side = src.text, src.side
    elif os.path.isfile(state_path) and os.path.isfile(out_tok) \
            and read_json(state_path).get("tokenizer_sha256") == sha256_file(out_tok):
        log.info("reusing %s from the interrupted run", out_tok)
        tok_json = _read_text(out_tok)
    else:
        t0 = time.time()
        tok = build_tokenizer(cfg.tokenizer_kind, sample_texts(pieces, cfg), cfg.vocab_size)
        log.info("trained %s tokenizer (%d tokens) in %.1fs", cfg.tokenizer_kind, tok.get_vocab_size(),
                 time.time() - t0)
        tok_json = tok.to_str(pretty=True)
    if not given:
        info = describe_tokenizer(tokenizer_from_str(tok_json, out_tok), None, cfg.eod_token, out_tok)
    for name, text in [(shards.TOKENIZER_FILE, tok_json), *side.items()]:
        path = os.path.join(cfg.output, name)
        if not os.path.isfile(path) or _read_text(path) != text:
            atomic_write_text(path, text)
    for name in set(SIDE_FILES) - set(side):  # another run's settings would contradict this tokenizer
        if os.path.isfile(os.path.join(cfg.output, name)):
            os.remove(os.path.join(cfg.output, name))
    atomic_write_json(state_path, {"settings": settings, "tokenizer_sha256": sha256_file(out_tok)})
    return tok_json, info


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": the bytes as they are
        return f.read()


def build_manifest(cfg: PrepareConfig, files: list[str], settings: dict, tok_info: dict,
                   results: list[dict]) -> dict:
    """docs/FORMATS.md manifest ("tokens" counts targets), plus "documents" and the "settings" of the run."""
    entries = [{k: v for k, v in e.items() if k != "reused"} for r in results for e in r["shards"]]
    tok_sha = sha256_file(os.path.join(cfg.output, shards.TOKENIZER_FILE))
    return {
        "format": shards.SEGMENTS_FORMAT, "seq_len": cfg.seq_len,
        "tokenizer": {"file": shards.TOKENIZER_FILE, **tok_info, "sha256": tok_sha},
        "stream_mode": "document" if cfg.stream_per_document else "file",
        "segments": sum(e["segments"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
        "streams": sum(r["streams"] for r in results), "documents": sum(r["docs"] for r in results),
        "shards": entries, "inputs": files, "created_by": "trime prepare",
        "world_size": len(results), "settings": settings,
        # per-word / per-byte metrics divide by these (rank records of older runs lack them: then none)
        **({"text": {k: sum(r[k] for r in results) for k in TEXT_STATS}}
           if all(k in r for r in results for k in TEXT_STATS) else {}),
    }


# ----------------------------------------------------------------------------- the stage

def _plan(cfg: PrepareConfig, world: int) -> dict:
    """Rank 0: validate inputs and output, fix the tokenizer; the plan is broadcast."""
    files = expand_inputs(cfg.input)
    pieces = plan_pieces(files, cfg.format, cfg.split_mb)
    given = given_tokenizer(cfg)
    settings = settings_of(cfg, files, world, given[0] if given else None, pieces)
    if check_existing(cfg, settings):
        return {"done": True, "files": files}
    os.makedirs(cfg.output, exist_ok=True)
    tok_json, tok_info = make_tokenizer(cfg, pieces, settings, given)
    return {"done": False, "files": files, "pieces": pieces, "settings": settings, "tok_json": tok_json,
            "tok_info": tok_info}


def prepare(cfg: PrepareConfig) -> dict:
    """Run the stage on every rank of the MPI world (or alone); returns the manifest."""
    from trime_dist.core import mpi

    if not cfg.input or not cfg.output:
        raise ValueError("prepare needs --input and --output")
    if cfg.seq_len < 1 or cfg.shard_segments < 1:
        raise ValueError(f"--seq-len and --shard-segments must be >= 1 (got {cfg.seq_len}, {cfg.shard_segments})")
    rank, world = mpi.rank(), mpi.size()
    # rank 0 holds --output for the job; every rank stops with its refusal
    with output_lock(cfg.output, rank=rank, bcast=mpi.bcast):
        return _prepare(cfg, rank, world)


def _prepare(cfg: PrepareConfig, rank: int, world: int) -> dict:
    from trime_dist.core import mpi

    plan = mpi.plan_on_root(lambda: _plan(cfg, world), rank=rank, bcast=mpi.bcast)
    if plan["done"]:
        log.info("%s is already complete with these settings; nothing to do", cfg.output)
        return shards.read_manifest(cfg.output)
    result, error = None, None
    fingerprint = {"settings": plan["settings"],
                   "tokenizer_sha256": hashlib.sha256(plan["tok_json"].encode("utf-8")).hexdigest()}
    try:
        result = reuse_rank_record(cfg, rank, fingerprint)
        if result is None:
            result = process_rank(cfg, plan["pieces"], rank, world, plan["tok_json"], plan["tok_info"]["eod_id"],
                                  fingerprint)
            atomic_write_json(os.path.join(cfg.output, RANK_RECORD.format(rank=rank)),
                              {"fingerprint": fingerprint, "result": result})
    except mpi.USER_ERRORS as e:
        error = e
    mpi.raise_first_error(error, f"{rank_on_host(rank)}: " if world > 1 else "")  # no rank waits for a failed one
    results = mpi.gather(result)
    mpi.barrier()
    return mpi.plan_on_root(lambda: finish(cfg, plan, results), rank=rank, bcast=mpi.bcast)


def finish(cfg: PrepareConfig, plan: dict, results: list[dict]) -> dict:
    """Rank 0, after every rank is done: write manifest.json (last) and log the summary."""
    manifest = build_manifest(cfg, plan["files"], plan["settings"], plan["tok_info"], results)
    if manifest["segments"] == 0:  # refused before manifest.json: nothing here looks complete
        raise ValueError(f"{', '.join(plan['files'])}: no text to prepare (0 documents, 0 segments): the input "
                         "is empty or only blank lines")
    # left by killed writers, and the progress of finished ranks: all ranks are done
    for stale in glob.glob(os.path.join(cfg.output, ".*.tmp")) + glob.glob(os.path.join(cfg.output, PROGRESS_GLOB)):
        os.remove(stale)
    shards.write_manifest(cfg.output, manifest)
    seconds = max(r["seconds"] for r in results)
    log.info("prepare done: %d docs, %d streams, %d segments, %d tokens, %.0f tokens/s over %d ranks -> %s",
             manifest["documents"], manifest["streams"], manifest["segments"], manifest["tokens"],
             manifest["tokens"] / max(seconds, 1e-9), len(results), cfg.output)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trime_dist.core.flags import add_dataclass_flags

    add_dataclass_flags(parser, PrepareConfig)


def run(args: argparse.Namespace) -> int:
    from trime_dist.core import mpi
    from trime_dist.core.flags import dataclass_from_flags

    cfg = dataclass_from_flags(PrepareConfig, args)
    with mpi.abort_on_error():
        prepare(cfg)
    return 0
