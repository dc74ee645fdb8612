"""The two-node cluster (tests/helpers/two_hosts.py) for every test file that needs it: one per session, and a
work folder both nodes see. Where it cannot be started the tests skip with the reason; in CI (CI=true) that
is a failure."""
from __future__ import annotations

import pytest

from cli_runner import run_trime
from services import started
from two_hosts import TIMES, TwoHosts, unavailable_reason


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    c = started(lambda: TwoHosts(str(tmp_path_factory.mktemp("two_hosts"))), unavailable_reason(),
                "the two-node cluster")
    yield c
    c.stop()
    if TIMES:
        print("\nwall time, one host vs two nodes:\n" + "\n".join(
            f"  {k}: {v.get('one', float('nan')):.1f}s vs {v.get('two', float('nan')):.1f}s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def work(cluster, tmp_path_factory):
    """A folder both nodes see (one file system): the built-in corpus and its prepared splits (one process)."""
    root = tmp_path_factory.mktemp("two_hosts_work")
    run_trime(["corpus", "--out", root / "corpus", "--scale", "0.05"], cwd=str(root))
    for split, tok in (("train", ["--vocab-size", "300"]), ("valid", ["--tokenizer", "data/train/tokenizer.json"])):
        run_trime(["prepare", "--input", f"corpus/{split}", "--output", f"data/{split}", "--seq-len", "32", *tok],
                  cwd=str(root))
    return root
