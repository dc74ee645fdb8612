"""Shard I/O for the two on-disk formats of docs/FORMATS.md: segment shards and grouped shards.

The only module that imports webdataset. Writers build each tar in memory with a fixed mtime
(so the same samples give the same bytes and checksum) and rename it into place when complete;
readers raise a ValueError naming the shard for a corrupt, truncated or malformed tar. Readers take
a data location: a folder, or an http(s) / pipe: URL (trime_dist/core/locations.py).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from typing import Any, Callable, Iterator, Optional

import numpy as np

from trime_dist.core import locations
from trime_dist.core.io import (
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    sha256_file,
)

SEGMENTS_FORMAT = "trime-segments/v1"
GROUPS_FORMAT = "trime-groups/v1"
MANIFEST = locations.MANIFEST
TOKENIZER_FILE = "tokenizer.json"
SEGMENT_META_FIELDS = ("stream", "index", "start", "length")

_COMMON_FIELDS = {"format": str, "seq_len": int, "tokenizer": dict, "segments": int, "shards": list}
_FORMAT_FIELDS = {
    SEGMENTS_FORMAT: {"tokens": int, "streams": int, "stream_mode": str},
    GROUPS_FORMAT: {"group_size": int, "groups": int, "grouping": dict},
}
_TOKENIZER_FIELDS = {"file": str, "sha256": str, "kind": str, "vocab_size": int, "eod_id": int, "pad_id": int}
_SHARD_FIELDS = {"path": str, "sha256": str, "segments": int}


# ----------------------------------------------------------------------------- names and keys

def segment_key(stream: int, index: int) -> str:
    return f"{stream:019d}-{index:07d}"  # 19 digits: any non-negative int64 sorts correctly


def group_key(group: int) -> str:
    return f"{group:09d}"


def segment_shard_name(rank: int, idx: int) -> str:
    return f"shard-r{rank:03d}-{idx:05d}.tar"


def group_shard_name(idx: int) -> str:
    return f"group-{idx:05d}.tar"


# ----------------------------------------------------------------------------- writing

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """Serialise samples `{"__key__", "tokens": int array, "meta": dict}` into one tar (deterministic)."""
    import webdataset as wds

    buf = io.BytesIO()
    # mtime fixed and entries sorted by the writer: identical samples give identical bytes.
    with wds.TarWriter(buf, encoder=False, mtime=0, user="trime", group="trime") as tw:
        for s in samples:
            tw.write({"__key__": s["__key__"], "tokens.npy": _npy_bytes(s["tokens"]),
                      "meta.json": json.dumps(s["meta"], sort_keys=True).encode("utf-8")})
    return buf.getvalue()


class ShardWriter:
    """Collects samples and writes a tar shard every `max_per_shard` samples (atomic, resumable).

    `name_fn(idx)` gives the file name of shard idx (idx counts from `start_index`). A shard whose
    file already holds exactly the bytes we would write is left untouched (resume after a crash).
    `close()` flushes the last shard and returns one manifest entry per shard, in write order:
    {"path", "sha256", <count_field>, "tokens", "first_key", "last_key", "reused"}.
    """

    def __init__(self, out_dir: str, name_fn: Callable[[int], str], max_per_shard: int,
                 count_field: str, start_index: int = 0):
        if max_per_shard < 1:
            raise ValueError(f"samples per shard must be >= 1, got {max_per_shard}")
        self.out_dir, self.name_fn, self.max_per_shard = out_dir, name_fn, max_per_shard
        self.count_field, self.next_index = count_field, start_index
        self.entries: list[dict[str, Any]] = []
        self._samples: list[dict[str, Any]] = []
        self._segments = 0
        self._tokens = 0
        os.makedirs(out_dir, exist_ok=True)
        import webdataset  # noqa: F401  (slow first import, pulls in torch: pay it here, not mid-stream)

    def _add(self, key: str, tokens: np.ndarray, meta: dict, n_segments: int, n_tokens: int) -> None:
        self._samples.append({"__key__": key, "tokens": tokens, "meta": meta})
        self._segments += n_segments
        self._tokens += n_tokens
        if len(self._samples) >= self.max_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._samples:
            return
        name = self.name_fn(self.next_index)
        data = tar_bytes(self._samples)
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.out_dir, name)
        reused = os.path.isfile(path) and os.path.getsize(path) == len(data) and sha256_file(path) == digest
        if not reused:
            atomic_write_bytes(path, data)
        entry = {"path": name, "sha256": digest, self.count_field: len(self._samples)}
        if self.count_field != "segments":
            entry["segments"] = self._segments
        entry.update(tokens=self._tokens, first_key=self._samples[0]["__key__"],
                     last_key=self._samples[-1]["__key__"], reused=reused)
        self.entries.append(entry)
        self._samples, self._segments, self._tokens = [], 0, 0
        self.next_index += 1

    def resume_after(self, entries: list[dict[str, Any]]) -> None:
        """Go on after these finished shards of an interrupted run (their entries, as flush made them)."""
        self.entries = list(entries)
        self.next_index += len(entries)

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        return self.entries


class SegmentShardWriter(ShardWriter):
    """Writes segment shards `shard-r{rank:03d}-{idx:05d}.tar` (format trime-segments/v1)."""

    def __init__(self, out_dir: str, rank: int, max_segments: int):
        super().__init__(out_dir, lambda i: segment_shard_name(rank, i), max_segments, "segments")

    def add(self, stream: int, index: int, start: int, tokens: np.ndarray) -> None:
        """tokens: int [n + 1] -- stream tokens [start, start + n + 1)."""
        n = len(tokens) - 1
        if n < 1:
            raise ValueError(f"segment {segment_key(stream, index)} has {len(tokens)} tokens, need >= 2")
        meta = {"stream": int(stream), "index": int(index), "start": int(start), "length": n}
        self._add(segment_key(stream, index), tokens, meta, 1, n)


class GroupShardWriter(ShardWriter):
    """Writes grouped shards `group-{idx:05d}.tar` (format trime-groups/v1), for `trime group`.

    Usage: w = GroupShardWriter(out_dir, max_groups=64); w.add(group_id, tokens, metas) for each
    group, where tokens is int [G, L + 1] (rows right-padded with pad_id) and metas the G segment
    meta dicts {"stream", "index", "start", "length"} in row order; entries = w.close().
    Ranks writing disjoint group ranges pass start_index so shard names do not collide.
    """

    def __init__(self, out_dir: str, max_groups: int, start_index: int = 0):
        super().__init__(out_dir, group_shard_name, max_groups, "groups", start_index)

    def add(self, group: int, tokens: np.ndarray, segments: list[dict]) -> None:
        if tokens.ndim != 2 or tokens.shape[0] != len(segments):
            raise ValueError(f"group {group}: tokens shape {tokens.shape} does not match {len(segments)} segments")
        metas = [{f: int(m[f]) for f in SEGMENT_META_FIELDS} for m in segments]
        n_tokens = sum(m["length"] for m in metas)
        self._add(group_key(group), tokens, {"segments": metas}, len(metas), n_tokens)


# ----------------------------------------------------------------------------- reading

def _check_end_of_archive(path: str, data: Optional[bytes]) -> None:
    """A tar cut at a member boundary reads as a shorter valid tar; its missing end marker tells.
    data: the shard's bytes if read already (else its local file's end is read)."""
    if data is None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    else:
        size, tail = len(data), data[-1024:]
    if size % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
        raise ValueError(f"{path}: corrupt or truncated tar shard (no end-of-archive marker)")


def _iter_tar_samples(path: str, sha256: Optional[str]) -> Iterator[dict[str, bytes]]:
    """Yield {"__key__", "tokens.npy", "meta.json"} dicts; errors name the shard (a path or URL)."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    data = None
    if sha256:  # read whole (a few MB) and checked before a byte is parsed
        data = locations.read_checked(path, sha256, "shard")
    elif locations.is_url(path):
        data = locations.read_bytes(path, "shard")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"shard not found: {path}")
    _check_end_of_archive(path, data)
    current: dict[str, Any] = {}
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as stream:
            for item in tar_file_iterator(stream):
                key, ext = base_plus_ext(item["fname"])
                if current and key != current["__key__"]:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current[ext] = item["data"]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated tar shard ({e})") from None
    if current:
        yield current


def _decode_sample(path: str, raw: dict[str, Any]) -> tuple[str, np.ndarray, dict]:
    key = raw["__key__"]
    if "tokens.npy" not in raw or "meta.json" not in raw:
        raise ValueError(f"{path}: sample {key!r} lacks tokens.npy or meta.json (has {sorted(raw)})")
    try:
        tokens = np.load(io.BytesIO(raw["tokens.npy"]), allow_pickle=False)
        meta = json.loads(raw["meta.json"])
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: sample {key!r} is corrupt ({e})") from None
    if tokens.dtype != np.int32:
        raise ValueError(f"{path}: sample {key!r} tokens have dtype {tokens.dtype}, expected int32")
    return key, tokens, meta


def iter_segments(path: str, sha256: Optional[str] = None) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield (key, tokens int32 [n + 1], meta) for each segment of a segment shard, in file order.

    meta = {"stream", "index", "start", "length"}. With `sha256` the file is checked first.
    """
    for raw in _iter_tar_samples(path, sha256):
        key, tokens, meta = _decode_sample(path, raw)
        if tokens.ndim != 1 or not isinstance(meta, dict) or meta.get("length") != len(tokens) - 1 \
                or key != segment_key(meta.get("stream", -1), meta.get("index", -1)):
            raise ValueError(f"{path}: segment {key!r} is inconsistent (tokens shape {tokens.shape}, meta {meta})")
        yield key, tokens, meta


def iter_groups(path: str, sha256: Optional[str] = None) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield (key, tokens int32 [G, L + 1], meta) for each group of a grouped shard, in file order.

    meta = {"segments": [{"stream", "index", "start", "length"}, ...]}, one entry per row.
    """
    for raw in _iter_tar_samples(path, sha256):
        key, tokens, meta = _decode_sample(path, raw)
        segs = meta.get("segments") if isinstance(meta, dict) else None
        if tokens.ndim != 2 or not isinstance(segs, list) or len(segs) != tokens.shape[0]:
            raise ValueError(f"{path}: group {key!r} is inconsistent (tokens shape {tokens.shape}, meta {meta})")
        yield key, tokens, meta


# ----------------------------------------------------------------------------- reading a range

def shard_offsets(manifest: dict[str, Any], entries: Optional[list[dict]] = None) -> np.ndarray:
    """Index of each shard's first sample: int64 [n_shards + 1], samples numbered in `entries` order
    (default: the manifest's). Samples are segments for segment shards, groups for grouped shards."""
    count = "groups" if manifest["format"] == GROUPS_FORMAT else "segments"
    entries = manifest["shards"] if entries is None else entries
    return np.concatenate([[0], np.cumsum([int(e[count]) for e in entries])]).astype(np.int64)


def iter_range(data_dir: str, manifest: dict[str, Any], start: int = 0, end: Optional[int] = None, *,
               entries: Optional[list[dict]] = None, check: bool = False) -> Iterator[tuple[int, np.ndarray, dict]]:
    """Yield (index, tokens, meta) of samples start..end-1 (end None: to the last), numbered in
    `entries` order (default: the manifest's). Whole shards outside the range are skipped unread.

    Segment shards give tokens int32 [n + 1]; grouped shards tokens int32 [G, L + 1] (see iter_segments,
    iter_groups). check=True also verifies each shard read against the manifest: its checksum and sample
    count, every row's length <= seq_len and every token id inside the vocabulary. Each shard's bytes are
    checked against the manifest's sha256 before they are parsed, check or not.
    """
    entries = manifest["shards"] if entries is None else entries
    grouped = manifest["format"] == GROUPS_FORMAT
    read, what = (iter_groups, "groups") if grouped else (iter_segments, "segments")
    offsets = shard_offsets(manifest, entries)
    for entry, first, last in zip(entries, offsets[:-1].tolist(), offsets[1:].tolist()):
        if last <= start:  # whole shard before the range
            continue
        if end is not None and first >= end:
            return
        path = locations.resolve(data_dir, entry["path"])
        if not locations.is_url(path) and not os.path.isfile(path):
            raise FileNotFoundError(f"shard listed in {locations.manifest_location(data_dir)} not found: {path}")
        index = first
        for key, tokens, meta in read(path, entry["sha256"]):
            if check and index >= last:
                raise ValueError(f"{path}: holds more {what} than the {last - first} the manifest says")
            if check:
                _check_sample(path, key, tokens, meta, manifest)
            if index >= start and (end is None or index < end):
                yield index, tokens, meta
            index += 1
            if not check and end is not None and index >= end:  # check reads the shard to its end
                return
        if check and index != last:
            raise ValueError(f"{path}: holds {index - first} {what} but the manifest says {last - first}")


def _check_sample(path: str, key: str, tokens: np.ndarray, meta: dict, manifest: dict[str, Any]) -> None:
    """A sample of another L or tokenizer than the manifest's is refused, naming the shard and sample."""
    seq_len, vocab = manifest["seq_len"], manifest["tokenizer"]["vocab_size"]
    what = "group" if "segments" in meta else "segment"
    lengths = [s["length"] for s in meta["segments"]] if "segments" in meta else [meta["length"]]
    if max(lengths, default=0) > seq_len:
        raise ValueError(f"{path}: {what} {key} has {max(lengths)} targets but the manifest says "
                         f"seq_len={seq_len} (shard made with another L?)")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"{path}: {what} {key} has token id {int(tokens.max())} outside the manifest's "
                         f"vocabulary [0, {vocab}) (shard made with another tokenizer?)")


def pad_rows(rows: list[np.ndarray], width: Optional[int], pad_id: int, *, n_rows: int = 0,
             dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows (row r: int [n_r + 1]) into one array: (tokens [B, width], lengths [B]).

    width None: the longest row's; lengths[r] = n_r, the row's number of targets. With n_rows > len(rows),
    the extra rows are all padding with length 0 (B = max(len(rows), n_rows)).
    """
    width = max((len(r) for r in rows), default=0) if width is None else width
    tokens = np.full((max(len(rows), n_rows), width), pad_id, dtype=dtype)   # [B, width]
    lengths = np.zeros(len(tokens), dtype=np.int64)                          # [B]
    for r, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {r} has {len(row)} tokens, more than the padded width {width}")
        tokens[r, :len(row)] = row
        lengths[r] = max(len(row) - 1, 0)
    return tokens, lengths


# ----------------------------------------------------------------------------- manifest

def _check_fields(obj: dict, fields: dict[str, type], where: str) -> None:
    for name, typ in fields.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
        value = obj[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{where}: field {name!r} should be {typ.__name__}, got {value!r}")


def read_manifest(directory: str) -> dict[str, Any]:
    """Load and validate `directory/manifest.json` (either format; `directory` may be a URL, see
    trime_dist/core/locations.py); returns the manifest dict.

    Raises FileNotFoundError when the manifest is missing (the directory is incomplete) and
    ValueError naming the file and field when it is malformed.
    """
    path = locations.manifest_location(directory)
    if locations.is_url(path):
        manifest = _json_of(locations.read_bytes(path, "shard manifest"), path)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory} is not a complete shard directory "
                                f"(run `trime prepare` / `trime group`, or it was interrupted)")
    else:
        locations.check_inside(path, directory, path)
        manifest = read_json(path, "shard manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: manifest should be a JSON object")
    fmt = manifest.get("format")
    if fmt not in _FORMAT_FIELDS:
        raise ValueError(f"{path}: unknown format {fmt!r}, expected one of {sorted(_FORMAT_FIELDS)}")
    _check_fields(manifest, {**_COMMON_FIELDS, **_FORMAT_FIELDS[fmt]}, path)
    _check_fields(manifest["tokenizer"], _TOKENIZER_FIELDS, f"{path} [tokenizer]")
    shard_fields = dict(_SHARD_FIELDS, groups=int) if fmt == GROUPS_FORMAT else _SHARD_FIELDS
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: shards[{i}] should be an object")
        _check_fields(entry, shard_fields, f"{path} shards[{i}]")
    # every name is checked before any file it names is read (SECURITY.md); in a local folder, symlinks too
    check = locations.check_manifest_name if locations.is_url(directory) else \
        functools.partial(locations.member_path, directory)
    check(manifest["tokenizer"]["file"], path, "tokenizer.file")
    for i, entry in enumerate(manifest["shards"]):
        check(entry["path"], path, f"shards[{i}].path")
    total = sum(e["segments"] for e in manifest["shards"])
    if total != manifest["segments"]:
        raise ValueError(f"{path}: shards hold {total} segments but the manifest says {manifest['segments']}")
    return manifest


def _json_of(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: shard manifest is not valid JSON ({e})") from None


def manifest_sha256(directory: str) -> str:
    """sha256 of the data's manifest.json (a run records which data it was made from)."""
    return locations.sha256_of(locations.manifest_location(directory))


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically (call LAST: it marks the directory complete)."""
    atomic_write_json(os.path.join(directory, MANIFEST), manifest)


def shard_paths(directory: str, manifest: dict[str, Any]) -> list[str]:
    """Shard paths (or URLs) in manifest order (= stream order for segment shards)."""
    return [locations.resolve(directory, e["path"]) for e in manifest["shards"]]


def verify_shard(entry: dict[str, Any], directory: str) -> None:
    """Check one manifest shard entry against its file; ValueError/FileNotFoundError name the shard."""
    path = locations.resolve(directory, entry["path"])
    if not locations.is_url(path) and not os.path.isfile(path):
        raise FileNotFoundError(f"shard listed in {locations.manifest_location(directory)} not found: {path}")
    digest = locations.sha256_of(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: shard checksum mismatch (sha256 {digest[:12]}..., the manifest says "
                         f"{entry['sha256'][:12]}...): the file is corrupt or was modified")


def read_tokenizer(directory: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of the data's tokenizer file (local, URL or pipe:), checked against the manifest's sha256."""
    tok = manifest["tokenizer"]
    return locations.read_checked(locations.resolve(directory, tok["file"]), tok["sha256"], "tokenizer")
