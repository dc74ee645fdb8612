"""Run outputs people look at: metrics.jsonl (one object per step), summary JSON, loss-curve PNG."""
from __future__ import annotations

import json
import os
from typing import Optional


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            kept = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            from trime_dist.core.io import atomic_write_text

            atomic_write_text(path, "".join(kept))
        elif resume_step is None and os.path.exists(path):
            os.remove(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def plot_loss_curve(metrics_path: str, png_path: str) -> Optional[str]:
    """Training loss (TRIME and plain CE) and validation perplexity against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "valid_ce_ppl" in r]
    if not train:
        return None
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (objective)")
    ax_loss.plot(steps, [r["ce_loss"] for r in train], label="train CE loss", alpha=0.7)
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("nats/token"), ax_loss.legend()
    if valid:
        vsteps = [r["step"] for r in valid]
        ax_ppl.plot(vsteps, [r["valid_ce_ppl"] for r in valid], "o-", label="valid ppl (no memory)")
        ax_ppl.plot(vsteps, [r["valid_memory_ppl"] for r in valid], "o-", label="valid ppl (memory)")
        ax_ppl.set_yscale("log"), ax_ppl.set_xlabel("step"), ax_ppl.set_ylabel("perplexity"), ax_ppl.legend()
    fig.tight_layout()
    from trime_dist.core.io import atomic_path

    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png_path
