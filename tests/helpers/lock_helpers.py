"""The output-lock tests' shared pieces: waiting for a job to take its lock, and the refusal line it causes."""
from __future__ import annotations

import json
import socket
import time


def wait_for_lock(proc, path, timeout=120) -> dict:
    """The lock file's record once the job `proc` has taken it."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            return json.load(open(path))
        except (FileNotFoundError, ValueError):
            time.sleep(0.005)
    raise AssertionError(f"no lock {path}; job exited {proc.poll()}: {proc.communicate()[1][-3000:]}")


def in_use_line(stage: str, out, holder: dict, lock) -> str:
    """The one line a second job prints when `holder` (a lock record) holds the output `out`."""
    return (f"trime {stage}: error: output {out} is in use by another job (host {socket.gethostname()}, "
            f"pid {holder['pid']}, started {holder['started']}: {holder['command']}); lock file {lock}")
