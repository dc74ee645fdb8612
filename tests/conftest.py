import os
import sys

# tests import their small helpers (shard_fixtures, dist_helpers, cli_runner) as top-level modules
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
