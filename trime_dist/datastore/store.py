"""A complete datastore as eval reads it: metadata, values, keys (memmapped per part) and the faiss index."""
from __future__ import annotations

import os

import numpy as np

from trime_dist.core.constants import IGNORE_INDEX, METRICS
from trime_dist.core.io import read_json
from trime_dist.core.locations import member_path
from trime_dist.datastore import index as dsi

FORMAT = "trime-datastore/v1"
KEY_TYPE = "last_ffn_input"
META_FILE = "datastore.json"


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
        if self.metric not in METRICS:
            raise ValueError(f"{meta_path}: metric {self.meta.get('metric')!r}, expected one of {', '.join(METRICS)}")
        # names in the metadata stay inside the datastore's folder (SECURITY.md: a downloaded store is data)
        self._files = {(i, name): member_path(path, p[name], meta_path, f"parts[{i}].{name}")
                       for i, p in enumerate(self.meta["parts"]) for name in ("keys", "values")}
        self._index_file = member_path(path, self.meta["index"], meta_path, "index")
        self.first_ids = np.array([p["first_id"] for p in self.meta["parts"]], dtype=np.int64)
        self.check_parts()
        self.values = np.concatenate([load_part_array(self._files[i, "values"])
                                      for i in range(len(self.meta["parts"]))]) if load_values else None
        self._index = None
        self._exact = None   # an ExactIndex after use_exact_search()
        self._faiss_device = None   # where the faiss index searches: None = the CPU (see use_faiss_on)
        self.search_where = "CPU faiss"
        self.faiss_shard = None          # (lo, hi, world_size) after use_faiss_shard(): the index holds ids [lo, hi)
        self._id_offset = 0         # added to the index's ids (a Flat shard numbers its vectors from 0)

    def check_parts(self) -> None:
        """Every part's keys [n_p, D] and values [n_p] open and have the sizes the metadata implies."""
        ends = list(self.first_ids[1:]) + [self.meta["count"]]
        for i, (first, end) in enumerate(zip(self.first_ids, ends)):
            n = int(end - first)
            for name, shape in (("keys", (n, self.meta["dim"])), ("values", (n,))):
                arr = load_part_array(self._files[i, name])
                if arr.shape != shape:
                    raise ValueError(f"{self._files[i, name]}: shape {arr.shape}, expected {shape} "
                                     f"from {META_FILE}; the datastore is damaged, rebuild it")

    @property
    def id(self) -> str:
        return self.meta["datastore_id"]

    @property
    def metric(self) -> str:
        """ip or l2 (core/constants.py METRICS); stores written before --metric existed say inner_product."""
        metric = self.meta.get("metric", "ip")
        return "ip" if metric == "inner_product" else metric

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
            keys = load_part_array(self._files[int(p), "keys"])
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
            index = dsi.load_search_index(self._index_file, nprobe, mmap=not self.meta["ondisk"])
            self._index, self.search_where = dsi.to_search_device(index, self._faiss_device or "cpu")
        dsi.set_nprobe(self._index, nprobe)
        return self._index

    def use_faiss_on(self, device, nprobe: int = 1) -> str:
        """Load the faiss index for searching on `device`: a CUDA device moves it to that GPU when faiss has GPU
        support (datastore/index.py to_search_device), anything else keeps it on the CPU. Returns where it
        searches (one line for the log)."""
        self._faiss_device = device
        self._index = None
        self.index(nprobe)
        return self.search_where

    def use_faiss_shard(self, device, nprobe: int, rank: int, world_size: int) -> str:
        """Load only this rank's 1/world_size of the index's entries (datastore/index.py load_search_shard; ids
        as exact.shard_range deals the keys): every search is then a collective over the ranks' shards, merged
        (exact.search_over_shards). Returns where it searches (for the log)."""
        from trime_dist.datastore.exact import shard_range

        lo, hi = shard_range(int(self.meta["count"]), rank, world_size)
        shard, self._id_offset = dsi.load_search_shard(self._index_file, nprobe, lo, hi,
                                                       mmap=not self.meta["ondisk"])
        self._index, self.search_where = dsi.to_search_device(shard, device)
        self.faiss_shard = (lo, hi, world_size)
        return self.search_where

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores [N, k] similarities (q·k, or -||q - k||^2 for an l2 store), best first, ids [N, k], labels [N, k];
        id -1 / label IGNORE_INDEX where missing). After use_faiss_shard: this rank's shard only."""
        scores, ids = dsi.search(self.index(nprobe), queries, k)
        if self._id_offset:
            ids = np.where(ids >= 0, ids + self._id_offset, -1)
        labels = np.where(ids >= 0, self.values[np.maximum(ids, 0)], IGNORE_INDEX).astype(np.int64)
        return scores, ids, labels

    def use_exact_search(self, device, rank: int = 0, world_size: int = 1) -> None:
        """Search with the keys themselves on `device` (datastore/exact.py), instead of the faiss index."""
        import torch

        from trime_dist.datastore.exact import ExactIndex

        self._exact = ExactIndex(self, device, rank, world_size, metric=self.metric)
        self._values_on_device = torch.from_numpy(self.values.astype(np.int32)).to(device)   # [count]

    @property
    def collective(self) -> bool:
        """True when a search is a collective (the exact search sharded over ranks): every rank must call
        search_tensor the same number of times, with its own queries (possibly none)."""
        return (self._exact is not None and self._exact.world_size > 1) or \
            (self.faiss_shard is not None and self.faiss_shard[2] > 1)

    def search_tensor(self, queries, k: int, nprobe: int):
        """search() for a tensor of queries [N, D]: (scores, ids, labels) tensors on the queries' device,
        from the exact search when use_exact_search() was called, else from the faiss index (on the CPU)."""
        import torch

        if self.faiss_shard is not None and self.faiss_shard[2] > 1:
            from trime_dist.datastore.exact import _pad_to_k, search_over_shards

            def search_shard(q, k):   # [n, D] -> this shard's ([n, k], [n, k]) on q's device, padded like faiss
                s, i, _ = self.search(q.float().cpu().numpy(), k, nprobe)
                return _pad_to_k(torch.from_numpy(s).to(q.device), torch.from_numpy(i).to(q.device), k)

            scores, ids = search_over_shards(queries, k, search_shard, self.faiss_shard[2])
            labels = torch.from_numpy(np.where(ids.cpu().numpy() >= 0, self.values[ids.clamp(min=0).cpu().numpy()],
                                               IGNORE_INDEX).astype(np.int64))
            return scores, ids, labels.to(queries.device)
        if self._exact is None:
            scores, ids, labels = self.search(queries.float().cpu().numpy(), k, nprobe)
            return tuple(torch.from_numpy(a).to(queries.device) for a in (scores, ids, labels))
        scores, ids = self._exact.search(queries, k)
        labels = torch.where(ids >= 0, self._values_on_device[ids.clamp(min=0)].long(), IGNORE_INDEX)
        return scores.to(queries.device), ids.to(queries.device), labels.to(queries.device)


def load_part_array(path: str) -> np.ndarray:
    """A memmapped .npy part; a missing, truncated or corrupt file is a one-line error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datastore part not found: {path}")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # numpy: bad header, or data shorter than the header says
        raise ValueError(f"{path}: not a readable .npy array, truncated or corrupt ({e})") from None


def open_datastore(path: str, load_values: bool = True) -> Datastore:
    return Datastore(path, load_values)
