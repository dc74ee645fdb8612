"""The faiss side of the datastore: build, train, add, merge, load and search inner-product or L2 indexes.

The only module that imports faiss. Every function takes and returns plain numpy arrays or file
paths; files are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from trime_dist.core.constants import METRICS
from trime_dist.core.io import atomic_path

log = logging.getLogger(__name__)


_FACTORY = re.compile(r"^(Flat|IVF(\d+),PQ(\d+)(x\d+)?(fs)?|IVF(\d+),Flat)$")


def _faiss():
    # faiss's loader logs "Could not load library with AVX2 support" at INFO while it looks for the old per-ISA
    # modules; the module it then loads has the AVX2 / AVX-512 kernels (dynamic dispatch: see
    # faiss.get_compile_options()), so the line only misleads.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def check_factory(factory: str, dim: int) -> None:
    """Accept 'Flat', 'IVF{nlist},Flat' and 'IVF{nlist},PQ{m}[x{bits}][fs]' with m dividing dim
    (fs = faiss fast-scan: 4-bit codes scanned with SIMD, several times faster to search on CPU)."""
    match = _FACTORY.match(factory)
    if not match:
        raise ValueError(f"--factory {factory!r}: expected 'Flat', 'IVF{{nlist}},Flat' or "
                         "'IVF{{nlist}},PQ{{m}}[x{{bits}}][fs]'")
    m = match.group(3)
    if m is not None and dim % int(m):
        raise ValueError(f"--factory {factory!r}: PQ{m} needs m to divide the key dimension {dim}")


def min_train_keys(factory: str) -> tuple[int, str]:
    """(fewest training keys faiss accepts, what sets it): nlist IVF lists, 2**bits PQ centroids (k-means
    needs at least one point per centroid). A valid factory (check_factory) is assumed."""
    match = _FACTORY.match(factory)
    nlist = int(match.group(2) or match.group(6) or 0)
    bits = int(match.group(4)[1:]) if match.group(4) else 8
    need = [(nlist, f"nlist {nlist}")] + ([(2 ** bits, f"PQ {bits}-bit codes ({2 ** bits} centroids)")]
                                          if match.group(3) else [])
    return max(need)


def check_factory_fits(factory: str, n_keys: int, train_sample: int, where: str) -> None:
    """Refuse, before any work, an index that needs more training keys than the build will have."""
    need, what = min_train_keys(factory)
    n_train = min(n_keys, train_sample)
    if need > n_train:
        limit = f"the {n_keys} keys to store in {where}" if n_train == n_keys else f"--train-sample {train_sample}"
        raise ValueError(f"--factory {factory!r}: {what} needs >= {need} training keys, more than {limit}; "
                         "choose a smaller index")


def needs_training(factory: str) -> bool:
    return factory != "Flat"


def uses_ids(factory: str) -> bool:
    """IVF indexes store explicit ids; a Flat index numbers vectors in insertion order."""
    return factory != "Flat"


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")


def _faiss_metric(metric: str):
    check_metric(metric)
    faiss = _faiss()
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def build_empty_index(factory: str, dim: int, metric: str = "ip"):
    faiss = _faiss()
    index = faiss.index_factory(dim, factory, _faiss_metric(metric))
    if "PQ" in factory and not factory.endswith("fs"):
        # The factory turns on polysemous training (a code reordering for Hamming pre-filtering, which
        # we never use); it is ~30x the cost of the PQ training itself.
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    return index


def train_index(factory: str, sample: np.ndarray, out_path: str, seed: int = 0, metric: str = "ip") -> None:
    """Train an empty `factory` index of `metric` on `sample` [n, D] float32 (GPU faiss when present); save it."""
    faiss = _faiss()
    index = build_empty_index(factory, sample.shape[1], metric)
    if needs_training(factory):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if faiss.get_num_gpus() > 0:
            log.info("training %s on %d keys with GPU faiss", factory, len(sample))
            gpu = faiss.index_cpu_to_all_gpus(index)
            gpu.train(sample)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            log.info("training %s on %d keys (CPU faiss)", factory, len(sample))
            index.train(sample)
    write_index(index, out_path)


def write_index(index, path: str) -> None:
    with atomic_path(path) as tmp:
        _faiss().write_index(index, tmp)


def read_index(path: str, mmap: bool = False):
    """A faiss index file; a missing, truncated or corrupt file is a one-line error naming it."""
    faiss = _faiss()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"faiss index not found: {path}")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0)
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:  # faiss's message is a multi-line C++ trace
        reason = re.sub(r"^Error in .* at \S+:\d+: (Error: )?", "", " ".join(str(e).split())) or "unreadable"
        raise ValueError(f"{path}: not a readable faiss index, truncated or corrupt ({reason})") from None


def add_part(trained_path: str, keys: np.ndarray, first_id: int, out_path: str, factory: str,
             batch: int = 65536) -> int:
    """Add keys [n, D] (ids first_id, first_id+1, ...) to a copy of the trained index; save it."""
    index = read_index(trained_path)
    for i0 in range(0, len(keys), batch):
        block = np.ascontiguousarray(keys[i0:i0 + batch], dtype=np.float32)   # [b, D]
        if uses_ids(factory):
            ids = np.arange(first_id + i0, first_id + i0 + len(block), dtype=np.int64)
            index.add_with_ids(block, ids)
        else:
            index.add(block)
    write_index(index, out_path)
    return int(index.ntotal)


def merge_parts(trained_path: str, part_paths: list[str], out_path: str, factory: str,
                ondisk: bool = False) -> int:
    """Merge part indexes (in part order) into one index at out_path; returns its ntotal.

    In memory: `merge_from` appends each part's vectors (Flat) or inverted lists (IVF) in order,
    which is exactly the order one process adding all keys would produce. With `ondisk`, IVF
    lists go to `index.ivfdata` next to out_path (faiss.contrib.ondisk), so RAM use stays small.
    """
    if ondisk:
        if not uses_ids(factory):
            raise ValueError("--ondisk needs an IVF factory (a Flat index has no inverted lists)")
        from faiss.contrib.ondisk import merge_ondisk

        ivfdata = os.path.join(os.path.dirname(os.path.abspath(out_path)), "index.ivfdata")
        os.makedirs(os.path.dirname(ivfdata), exist_ok=True)
        if os.path.exists(ivfdata):  # a merge killed half-way: start over
            os.remove(ivfdata)
        index = read_index(trained_path)
        merge_ondisk(index, part_paths, ivfdata)
        write_index(index, out_path)
        return int(index.ntotal)
    index = read_index(trained_path)
    for path in part_paths:
        part = read_index(path)
        index.merge_from(part, 0)
    write_index(index, out_path)
    return int(index.ntotal)


def load_search_index(path: str, nprobe: int, mmap: bool = True):
    """The merged index, ready to search (nprobe set on IVF indexes)."""
    index = read_index(path, mmap=mmap)
    set_nprobe(index, nprobe)
    return index


def load_search_shard(path: str, nprobe: int, lo: int, hi: int, mmap: bool = True) -> tuple[object, int]:
    """(an index of only the entries of the index at `path` whose ids are in [lo, hi), the offset to add to the
    ids it returns), like one of faiss's IndexShards: the shards' merged top-k is the whole index's top-k.
    An IVF index keeps its quantizer (the same lists are probed) and each list's entries of those ids, with the
    same codes (the same scores); a Flat index keeps vectors lo..hi-1. A fast-scan index is refused."""
    faiss = _faiss()
    full = read_index(path, mmap=mmap)
    try:
        ivf = faiss.extract_index_ivf(full)
    except RuntimeError:   # Flat: ids are positions
        shard = faiss.IndexFlat(full.d, full.metric_type)
        if hi > lo:
            shard.add(full.reconstruct_n(lo, hi - lo))
        return shard, lo
    if isinstance(ivf, faiss.IndexIVFFastScan):
        raise ValueError(f"{path}: a fast-scan index (PQ...fs) cannot be split into shards here (its lists are "
                         "packed in blocks); search a replica on every rank (--search faiss)")
    # an empty copy: the clone takes empty lists in place of the full ones (not read, not copied)
    lists, own, empty = ivf.invlists, ivf.own_invlists, faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)
    try:
        shard = faiss.clone_index(full)
    finally:
        ivf.replace_invlists(lists, own)
    shard_ivf = faiss.extract_index_ivf(shard)
    shard.ntotal = shard_ivf.ntotal = 0
    ivf.copy_subset_to(shard_ivf, faiss.InvertedLists.SUBSET_TYPE_ID_RANGE, lo, hi)
    shard.ntotal = shard_ivf.ntotal
    set_nprobe(shard, nprobe)
    return shard, 0


def set_nprobe(index, nprobe: int) -> None:
    try:
        _faiss().extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        if hasattr(index, "nprobe"):   # a GPU IVF index (not an IndexIVF)
            index.nprobe = nprobe
        # else Flat: no lists to probe


def gpu_faiss_available() -> bool:
    """True when the installed faiss has GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_search_device(index, device) -> tuple[object, str]:
    """(the index to search, where it searches, for the log): on a CUDA `device`, with GPU faiss, a copy on that
    GPU with float16 lookup tables (the paper's setting; IVF-PQ) and float16 coarse / Flat storage; otherwise the
    CPU index itself, with the reason."""
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    if getattr(device, "type", str(device)) != "cuda":
        return index, f"CPU faiss ({threads} threads)"
    if not gpu_faiss_available():
        return index, f"CPU faiss ({threads} threads; this faiss has no GPU support)"
    gpu_id = 0 if device.index is None else int(device.index)
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True                 # IVF-PQ: float16 lookup tables; Flat / IVF-Flat: float16 storage
    try:
        gpu = faiss.index_cpu_to_gpu(resources, gpu_id, index, options)
    except RuntimeError as e:                 # e.g. a code size GPU faiss has no kernel for
        log.warning("GPU faiss cannot take this index (%s); searching it with CPU faiss", " ".join(str(e).split()))
        return index, f"CPU faiss ({threads} threads; GPU faiss refused the index)"
    gpu.referenced_resources = resources      # the resources live as long as the index
    return gpu, f"GPU faiss on cuda:{gpu_id} (float16 lookup tables)"


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, k] float32, best first, ids [N, k] int64; -1 where fewer than k were found).

    A score is a similarity, larger = closer: q·k for an inner-product index, -||q - k||^2 for an L2 one
    (faiss returns squared distances; kNN-LM scores its neighbours with their negative)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, max(int(index.ntotal), 1))
    scores, ids = index.search(queries, k)
    return (-scores if index.metric_type == _faiss().METRIC_L2 else scores), ids


def brute_force_search(keys: np.ndarray, queries: np.ndarray, k: int,
                       metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over keys [M, D] with faiss.knn (reference for tests and recall); scores as search()."""
    scores, ids = _faiss().knn(np.ascontiguousarray(queries, dtype=np.float32),
                               np.ascontiguousarray(keys, dtype=np.float32), k, _faiss_metric(metric))
    return (-scores if metric == "l2" else scores), ids


def set_threads(n: int) -> None:
    if n > 0:
        _faiss().omp_set_num_threads(n)
