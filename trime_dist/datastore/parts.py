"""The steps of `trime datastore build`: encode parts, train the index, add parts, merge.

Segments are numbered in manifest (= stream) order and cut into parts of `part_segments`
consecutive segments; part p is encoded by rank p % R. Key ids are global positions in that
order, so the store (and every id) is the same whatever the number of ranks. Every artifact is
written under a temporary name, renamed when complete, and checked before it is reused.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from trime_dist.core.io import atomic_path, atomic_write_json, read_json
from trime_dist.core.progress import Progress
from trime_dist.datastore import index as dsi

log = logging.getLogger(__name__)

KEY_DTYPE = np.float16
VALUE_DTYPE = np.int32
EXIT_ENV = "TRIME_DATASTORE_EXIT_AFTER"  # test hook: "encode:N", "train" or "add:N" ends the process there


@dataclass
class Part:
    index: int
    first_segment: int
    end_segment: int  # exclusive

    @property
    def stem(self) -> str:
        return f"p{self.index:05d}"


def plan_parts(n_segments: int, part_segments: int) -> list[Part]:
    return [Part(i, s, min(s + part_segments, n_segments))
            for i, s in enumerate(range(0, n_segments, part_segments))]


def part_paths(ds_dir: str, part: Part) -> dict[str, str]:
    d = os.path.join(ds_dir, "parts")
    return {"keys": os.path.join(d, f"keys-{part.stem}.npy"), "values": os.path.join(d, f"values-{part.stem}.npy"),
            "info": os.path.join(d, f"part-{part.stem}.json"), "index": os.path.join(d, f"index-{part.stem}.faiss"),
            "index_info": os.path.join(d, f"index-{part.stem}.json")}


def encoded_parts(ds_dir: str) -> list[str]:
    """Names of the part info files in ds_dir/parts (a part is encoded once its info file exists)."""
    d = os.path.join(ds_dir, "parts")
    return sorted(f for f in os.listdir(d) if f.startswith("part-") and f.endswith(".json")) if os.path.isdir(d) \
        else []


def remove_temp_files(ds_dir: str) -> list[str]:
    """Delete the temporary files (.NAME.XXXX.tmp, see core.io.atomic_path) a killed build left in ds_dir
    and ds_dir/parts; returns their paths. Run by rank 0 before any rank writes."""
    removed = []
    for d in (ds_dir, os.path.join(ds_dir, "parts")):
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    if removed:
        log.info("removed %d temporary files of an interrupted build in %s", len(removed), ds_dir)
    return removed


def maybe_exit(stage: str, count: int = 0) -> None:
    """Simulate a kill (tests): leave the process at once, without cleanup, after the named step."""
    spec = os.environ.get(EXIT_ENV, "")
    name, _, n = spec.partition(":")
    if name == stage and (not n or int(n) == count):
        log.warning("%s=%s: exiting after %s %d (simulated kill)", EXIT_ENV, spec, stage, count)
        logging.shutdown()
        os._exit(17)


# ----------------------------------------------------------------------------- reading segments

def iter_segment_range(data_dir: str, manifest: dict, start: int, end: int) -> Iterator[tuple[np.ndarray, dict]]:
    """(tokens int32 [n+1], meta) of segments start..end-1 in manifest order; skips shards unread."""
    from trime_dist.core import shards

    return ((tokens, meta) for _, tokens, meta in shards.iter_range(data_dir, manifest, start, end))


def count_targets(data_dir: str, manifest: dict, part: Part) -> int:
    return sum(int(meta["length"]) for _, meta in iter_segment_range(data_dir, manifest, part.first_segment,
                                                                     part.end_segment))


# ----------------------------------------------------------------------------- encoding

def _segment_pieces(data_dir: str, manifest: dict, part: Part) -> Iterator[tuple[np.ndarray, int, int]]:
    """Each segment of the part on its own: (tokens [n+1], keep_from=0, keep_to=n)."""
    for tokens, meta in iter_segment_range(data_dir, manifest, part.first_segment, part.end_segment):
        yield tokens, 0, int(meta["length"])


def _window_pieces(data_dir: str, manifest: dict, part: Part, context: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """The part's targets encoded with the sliding context windows of `trime eval --context-window` (core/
    context_windows.py): (window tokens [n+1], keep_from, keep_to), keeping the window positions that are the
    part's targets and that the window scores. A window is cut at the part's last target: the model is
    causal, so a key does not depend on later inputs."""
    from trime_dist.core.context_windows import windows_scoring

    L = int(manifest["seq_len"])
    # one segment before the part holds all the context its first window needs (a window reaches at most L
    # positions back); read two and start each stream's buffer at its first segment read
    first_read = max(0, part.first_segment - 2)
    streams: dict[int, dict] = {}   # stream -> {"start": position of buf[0], "buf": tokens, "part": [P0, P1)}
    for index, (tokens, meta) in enumerate(iter_segment_range(data_dir, manifest, first_read, part.end_segment),
                                           start=first_read):
        stream, start, length = int(meta["stream"]), int(meta["start"]), int(meta["length"])
        s = streams.get(stream)
        if s is None:
            s = streams[stream] = {"start": start, "pieces": [tokens], "next": start + length, "part": None}
        elif start != s["next"]:
            raise ValueError(f"{data_dir}: segment {index} of stream {stream} starts at {start}, expected {s['next']}")
        else:  # consecutive segments share one token
            s["pieces"].append(tokens[1:])
            s["next"] = start + length
        if index >= part.first_segment:
            s["part"] = [start if s["part"] is None else s["part"][0], start + length]
    for s in streams.values():
        if s["part"] is None:
            continue
        buf = np.concatenate(s["pieces"]).astype(np.int64)                  # tokens at positions start..
        (p0, p1), b0 = s["part"], s["start"]
        for lo, scored_from, hi in windows_scoring(p0, p1, L, context):
            if lo < b0:
                raise ValueError(f"{data_dir}: part {part.stem} needs stream positions from {lo}, read from {b0}")
            hi = min(hi, p1)
            yield buf[lo - b0:hi - b0 + 1], max(scored_from, p0) - lo, hi - lo


def _batches(pieces: Iterator[tuple[np.ndarray, int, int]], batch_size: int, pad_id: int):
    """Yield (input_ids [B, T] long, targets [B, T] int32 numpy, keep [B, T] bool) over the pieces
    (T: the longest of the batch; keep: the positions whose keys are stored)."""
    from trime_dist.core.io import batched
    from trime_dist.core.shards import pad_rows

    for batch in batched(pieces, batch_size):
        tokens, _ = pad_rows([tokens for tokens, _, _ in batch], None, pad_id)          # [B, T + 1]
        positions = np.arange(tokens.shape[1] - 1)[None, :]                             # [1, T]
        keep = (positions >= np.array([a for _, a, _ in batch])[:, None]) & \
            (positions < np.array([b for _, _, b in batch])[:, None])                    # [B, T]
        yield torch.from_numpy(tokens[:, :-1].astype(np.int64)), tokens[:, 1:].astype(VALUE_DTYPE), keep


def encode_part(model, data_dir: str, manifest: dict, part: Part, paths: dict, batch_size: int,
                device: torch.device = torch.device("cpu"), context_window: int = 0, count: Optional[int] = None,
                progress: Progress = Progress()) -> int:
    """Write keys [n, D] fp16 and values [n] int32 of one part (pads dropped); returns n. The model runs
    on `device` (where it lives; bf16 autocast on a GPU). context_window C > 0: each key is computed in the
    sliding window `trime eval --context-window C` scores its position in (up to C tokens of context from
    earlier segments of its stream), instead of in its own segment. `count`: count_targets of the part, when
    the caller has it; `progress` is told the keys of each batch."""
    from trime_dist.core.device import inference_autocast

    count = count_targets(data_dir, manifest, part) if count is None else count
    dim = model.cfg.d_model
    pad_id = int(manifest["tokenizer"]["pad_id"])
    os.makedirs(os.path.dirname(paths["keys"]), exist_ok=True)
    pieces = _window_pieces(data_dir, manifest, part, context_window) if context_window > 0 else \
        _segment_pieces(data_dir, manifest, part)
    with atomic_path(paths["keys"]) as k_tmp, atomic_path(paths["values"]) as v_tmp:
        keys = np.lib.format.open_memmap(k_tmp, mode="w+", dtype=KEY_DTYPE, shape=(count, dim))
        values = np.lib.format.open_memmap(v_tmp, mode="w+", dtype=VALUE_DTYPE, shape=(count,))
        at = 0
        for input_ids, targets, keep in _batches(pieces, batch_size, pad_id):
            with torch.inference_mode(), inference_autocast(device):
                out = model.encode(input_ids.to(device, non_blocking=True))            # [B, T, D]
                # drop the pads and round to the stored fp16 on the device: 1/2 (1/4 from fp32) of the copy
                out = out[torch.from_numpy(keep).to(device)].to(torch.float16).cpu().numpy()   # [n, D]
            n = len(out)
            if at + n > count:
                break
            keys[at:at + n] = out
            values[at:at + n] = targets[keep]
            at += n
            progress.update(n)
        if at != count:
            raise ValueError(f"{data_dir}: part {part.stem} changed while encoding (targets do not add up to the "
                             f"{count} its segments hold)")
        keys.flush(), values.flush()
        del keys, values
    atomic_write_json(paths["info"], {"part": part.index, "segments": [part.first_segment, part.end_segment],
                                      "count": count, "dim": dim, "context_window": context_window,
                                      "keys_bytes": os.path.getsize(paths["keys"]),
                                      "values_bytes": os.path.getsize(paths["values"])})
    return count


def part_is_encoded(paths: dict, part: Part, dim: int) -> bool:
    """True only if the info file exists and both arrays are whole, with the recorded shapes."""
    if not os.path.isfile(paths["info"]):
        return False
    try:
        info = read_json(paths["info"], "datastore part info")
        keys = np.load(paths["keys"], mmap_mode="r")
        values = np.load(paths["values"], mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("part %s is incomplete or corrupt (%s): encoding it again", part.stem, e)
        return False
    ok = (info.get("segments") == [part.first_segment, part.end_segment] and keys.shape == (info["count"], dim)
          and values.shape == (info["count"],) and keys.dtype == KEY_DTYPE and values.dtype == VALUE_DTYPE
          and os.path.getsize(paths["keys"]) == info["keys_bytes"]
          and os.path.getsize(paths["values"]) == info["values_bytes"])
    if not ok:
        log.warning("part %s does not match its info file: encoding it again", part.stem)
    return ok


def open_part(paths: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.load(paths["keys"], mmap_mode="r"), np.load(paths["values"], mmap_mode="r")


# ----------------------------------------------------------------------------- index steps

def part_offsets(ds_dir: str, parts: list[Part]) -> list[int]:
    """Global id of each part's first key (prefix sums of the part counts)."""
    counts = [int(read_json(part_paths(ds_dir, p)["info"], "datastore part info")["count"]) for p in parts]
    return [int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]])] if counts else []


def sample_keys(ds_dir: str, parts: list[Part], offsets: list[int], total: int, n: int, seed: int) -> np.ndarray:
    """[min(n, total), D] float32: a seeded uniform sample of all keys, read part by part."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out = []
    for part, first in zip(parts, offsets):
        keys, _ = open_part(part_paths(ds_dir, part))
        local = chosen[(chosen >= first) & (chosen < first + len(keys))] - first
        out.append(np.asarray(keys[local], dtype=np.float32))
    return np.concatenate(out, 0)


def index_part_is_added(paths: dict, count: int) -> bool:
    if not (os.path.isfile(paths["index_info"]) and os.path.isfile(paths["index"])):
        return False
    info = read_json(paths["index_info"], "datastore index part info")
    return info.get("ntotal") == count and os.path.getsize(paths["index"]) == info.get("bytes")


def add_part(ds_dir: str, part: Part, first_id: int, factory: str) -> None:
    paths = part_paths(ds_dir, part)
    keys, _ = open_part(paths)
    ntotal = dsi.add_part(os.path.join(ds_dir, "trained.index"), keys, first_id, paths["index"], factory)
    atomic_write_json(paths["index_info"], {"part": part.index, "first_id": first_id, "ntotal": ntotal,
                                            "bytes": os.path.getsize(paths["index"])})
