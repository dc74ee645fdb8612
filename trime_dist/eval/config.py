"""`trime eval`'s config: the data, the flags every row starts from, and the rows (`--memory` / `--setting`)."""
from __future__ import annotations

from dataclasses import dataclass

from trime_dist.core.config import opt
from trime_dist.core.constants import LAYOUTS
from trime_dist.core.constants import DEVICES

SEARCHES = ("faiss", "exact")


@dataclass
class EvalConfig:
    model: str = opt("", "trained run directory (or its model/ directory)")
    data: str = opt("", "prepared segment shards to evaluate (e.g. the test split): a folder or its URL "
                       "(http(s), a manifest.json URL, pipe:); required")
    memory: list[str] = opt(doc="one row per memory setting", factory=lambda: ["local"], choices=LAYOUTS)
    datastore: str = opt("", "datastore directory (external memory, kNN interpolation)")
    k: int = opt(1024, "neighbours per query")
    nprobe: int = opt(32, "IVF lists probed per search")
    temperature: float = opt(1.0, "τ of the memory similarities")
    mem_size: int = opt(1024, "long-term cache size (keys) for long / external")
    knn_lambda: float = opt(0.0, "kNN-LM interpolation weight λ (0 = off)")
    knn_temperature: float = opt(1.0, "τ_knn of the kNN distribution")
    rescore: bool = opt(False, "recompute the neighbours' inner products from the stored keys, as kNN-LM recomputes "
                        "its distances (an IVF-PQ index returns those of compressed keys)")
    tau_search: str = opt("", "comma-separated τ values tried on --valid; the best is used")
    valid: str = opt("", "validation split for --tau-search")
    context_window: int = opt(0, "sliding context: inputs per window that are context only")
    batch_size: int = opt(8, "windows per forward pass (and per batched search)")
    max_segments: int = opt(0, "evaluate only the first N segments (0 = all)")
    setting: list[str] = opt(doc="a row with its own fields (name, model, memory, datastore, k, nprobe, temperature, "
                                 "mem_size, knn_lambda, knn_temperature, rescore) over the flags' values; repeatable; "
                                 "replaces --memory", factory=list, repeat=True, metavar="KEY=VAL,...")
    sweep: list[str] = opt(doc="KEY=V1,V2,...: every row once per value of KEY (mem_size, k, temperature, "
                               "knn_lambda, knn_temperature, nprobe), named ROW@KEY=V, in the same pass over the data; "
                               "repeatable (all combinations)", factory=list, repeat=True, metavar="KEY=V1,V2,...")
    out: str = opt("", "write the rows as JSON here")
    threads: int = opt(0, "torch / faiss threads (0 = leave as is)")
    device: str = opt("auto", "where the model runs: auto = the GPU when CUDA is available (bf16 autocast), "
                      "else cpu", choices=DEVICES)
    search: str = opt("faiss", "datastore search: faiss = the store's index (CPU); exact = every key in the "
                      "device's memory, exact top-k with torch (fp16 keys: 2 x count x dim bytes)",
                      choices=SEARCHES)

    def taus(self) -> list[float]:
        """The τ grid of --tau-search (empty: no search)."""
        return [float(t) for t in self.tau_search.split(",") if t.strip()]
