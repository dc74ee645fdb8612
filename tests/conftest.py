import os
import sys

# tests import their small helpers (shard_fixtures, dist_helpers) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
