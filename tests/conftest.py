import glob
import os
import sys

import pytest

from trime_dist.core.shm_buffers import ALL_BUFFERS_GLOB

# tests import their small helpers (shard_fixtures, dist_helpers, cli_runner) as top-level modules
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's CPU all-reduce leaves a 64 MB shared-memory buffer per rank in /dev/shm that nothing
# unlinks; a few hundred 2-rank runs fill the machine's memory. Every test's ranks have exited by
# its teardown, so the buffers that appeared during the test are removed then, unless a live process
# still maps one: that is another test run's rank (two suites on one machine), which must keep it.
# The stages unlink their own (trime_dist.core.shm_buffers); this catches those of killed ranks.
_SHM_BUFFERS = ALL_BUFFERS_GLOB


def _mapped_paths() -> set[str]:
    """Files mapped by any live process we can read (/proc/PID/maps)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5
                              and "/dev/shm/" in line)
        except (OSError, IndexError):
            pass
    return mapped


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_buffers():
    before = set(glob.glob(_SHM_BUFFERS))
    yield
    new = set(glob.glob(_SHM_BUFFERS)) - before
    if not new:
        return
    in_use = _mapped_paths()
    for path in new - in_use:
        try:
            os.remove(path)
        except OSError:
            pass


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is (`pytest -m gpu` runs only them) and are skipped, saying why, elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device (torch {torch.__version__} sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
