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
# its teardown, so the buffers that appeared during the test are removed then.
# The stages unlink their own (trime_dist.core.shm_buffers); this catches those of killed ranks.
_SHM_BUFFERS = ALL_BUFFERS_GLOB


@pytest.fixture(autouse=True)
def _remove_leaked_deepspeed_buffers():
    before = set(glob.glob(_SHM_BUFFERS))
    yield
    for path in set(glob.glob(_SHM_BUFFERS)) - before:
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
