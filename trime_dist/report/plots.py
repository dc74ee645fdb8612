"""The report's figures (matplotlib, written atomically as PNG): training curves of every run on one
figure, and perplexity against τ, the long-memory size and k from eval rows."""
from __future__ import annotations

import math
from collections import defaultdict

from trime_dist.report.collect import Run

SWEPT = ("mem_size", "k", "temperature")   # eval row fields a sweep varies (`trime eval --sweep`)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    from trime_dist.core.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    return path


def training_curves(runs: list[Run], path: str) -> str | None:
    """Training loss and validation perplexity of every run against tokens seen, one figure."""
    runs = [r for r in runs if any("loss" in rec for rec in r.records)]
    if not runs:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        train = [r for r in run.records if "loss" in r]
        tokens_at = {r["step"]: r.get("tokens_seen", r["step"]) for r in train} | {0: 0}
        ax_loss.plot([r.get("tokens_seen", r["step"]) for r in train], [r["loss"] for r in train],
                     label=f"{run.name} ({run.objective})")
        # a CE model is scored as it will be used: without memory
        key = "valid_ce_ppl" if run.objective == "ce" else "valid_memory_ppl"
        valid = [r for r in run.records if key in r and r["step"] in tokens_at]
        if valid:
            ax_ppl.plot([tokens_at[r["step"]] for r in valid], [r[key] for r in valid], "o-", label=run.name)
    ax_loss.set_xlabel("tokens seen"), ax_loss.set_ylabel("training loss (nats/token)"), ax_loss.legend(fontsize=8)
    ax_ppl.set_xlabel("tokens seen"), ax_ppl.set_ylabel("validation perplexity (TRIME runs: with memory)")
    ax_ppl.set_yscale("log")
    if ax_ppl.lines:
        ax_ppl.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def sweep_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{swept field: {series label: [(value, ppl), ...]}} from rows that differ only in that field, plus
    "tau (valid)" from each row's τ search."""
    out: dict[str, dict] = defaultdict(dict)
    for field in SWEPT:
        groups = defaultdict(list)
        for r in rows:
            key = tuple((k, str(r.get(k))) for k in ("model", "memory", "datastore", "knn_lambda", "data", *SWEPT)
                        if k != field)
            if r.get(field) is not None:
                groups[key].append(r)
        for group in groups.values():
            values = sorted({g[field] for g in group})
            if len(values) > 1:
                label = f"{group[0]['name'].split('@')[0]} ({group[0]['memory']})"
                out[field][label] = sorted((g[field], g["ppl"]) for g in group)
    for r in rows:
        if r.get("tau_search"):
            out["tau (valid)"][r["name"]] = sorted((float(t), math.exp(loss)) for t, loss in r["tau_search"].items())
    return dict(out)


def sweep_figure(series: dict, path: str) -> str | None:
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (field, lines) in zip(axes[0], series.items()):
        for label, points in lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
        ax.set_xlabel(field), ax.set_ylabel("perplexity"), ax.legend(fontsize=8)
        if field in ("mem_size", "k"):   # symlog: a size of 0 (no long memory) stays on the axis
            ax.set_xscale("symlog", base=2, linthresh=1)
    fig.tight_layout()
    return _save(fig, path)
