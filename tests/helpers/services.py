"""Starting a service a test fixture needs (the one-node SLURM, the two-node cluster): where it cannot be
started the tests skip with the reason; in CI (CI=true) that is a failure."""
from __future__ import annotations

import os
from typing import Callable, Optional

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str, reason: str):
    if IN_CI:
        pytest.fail(f"CI=true but {what} is unavailable: {reason}")
    pytest.skip(reason)


def started(make: Callable, reason: Optional[str], what: str):
    """make().start(), or skip/fail (see unavailable) when `reason` says it cannot run here or the start fails."""
    if reason:
        unavailable(what, reason)
    service = make()
    try:
        service.start()
    except Exception as e:  # noqa: BLE001 -- any start failure is reported the same way
        service.stop()
        unavailable(what, f"could not start {what}: {e}")
    return service
