"""Names every stage shares, each defined once: the ignored-label value, objectives, memory layouts, placements,
the exit status of a training stopped by a signal.

Plain Python (no torch), so configs and `--help` can use them without heavy imports.
"""
from __future__ import annotations

# Target (and memory label) of padding and of positions that are not scored: never a prediction,
# never a memory entry. PyTorch's cross_entropy default, so F.cross_entropy agrees without arguments.
IGNORE_INDEX = -100

# Which in-batch memory a query may use (DESIGN.md §1): none = plain cross-entropy; local = earlier
# tokens of its own segment; long = local plus earlier segments of its stream; external = local
# (when use_local) plus every other segment. Training (objective masks, train loss) and `trime eval
# --memory` use these same words.
LAYOUTS = ("none", "local", "long", "external")

# objective.name (the user-facing config value) -> the memory layout it trains with.
OBJECTIVE_LAYOUTS = {"ce": "none", "trime_local": "local", "trime_long": "long", "trime_ext": "external"}
OBJECTIVES = tuple(OBJECTIVE_LAYOUTS)

# data.placement: how a group's rows are dealt to ranks: a contiguous block per rank, or every W-th row
# (interleaved: consecutive segments of a stream land on different ranks, so long memory is gathered).
PLACEMENTS = ("contiguous", "interleaved")

# Exit status of `trime train` stopped by SIGTERM / SIGUSR1 after saving a checkpoint: not done, rerun it
# with --auto-resume. The SLURM script (launcher/slurm.py) turns it into `scontrol requeue`.
EXIT_STOPPED_BY_SIGNAL = 3
# When set, rank 0 of `trime train` stopped by a signal writes this file once every rank's checkpoint is
# saved. Launchers that end the other ranks when one exits (srun --kill-on-bad-exit) may then report
# another status than EXIT_STOPPED_BY_SIGNAL; the SLURM script requeues on either.
STOPPED_MARKER_ENV = "TRIME_STOPPED_MARKER"
# Exit status of a torch stage whose peer rank died or stopped answering (core/lost_ranks.py): the error
# line names that rank; resume from the last checkpoint once the cause is fixed.
EXIT_RANK_LOST = 4

# --device of the stages that run a model (core/device.py picks it): auto = this rank's GPU when CUDA is available.
DEVICES = ("auto", "cpu", "cuda")

# `trime datastore build --metric`: how a query scores a stored key, larger = closer. ip: q·k (TRIME's datastore,
# the same similarity as training's memory); l2: -||q - k||^2 (kNN-LM's default, faiss METRIC_L2).
METRICS = ("ip", "l2")
