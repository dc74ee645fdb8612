"""A progress watchdog for torch stages: when a rank makes no progress for `timeout_s` (it waits in a
collective for a rank that hangs, e.g. on a process group whose timeout it does not control), it names
the ranks that do not answer in one line and ends the process with EXIT_RANK_LOST.

Process-group timeouts do not cover this: DeepSpeed creates its own groups (ZeRO's data-parallel
group) with torch's 30-minute default, and a blocked NCCL/gloo call cannot be interrupted from Python.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

from trime_dist.core.launch_env import DistEnv, where


class ProgressWatchdog:
    """Call beat() at each unit of progress (an optimizer step, a checkpoint); stop() when done."""

    def __init__(self, timeout_s: float, env: DistEnv, stage: str, during: str):
        self.timeout_s, self.env, self.stage, self.during = timeout_s, env, stage, during
        self._last = time.monotonic()
        self._heartbeat = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="trime-progress-watchdog", daemon=True)

    def start(self) -> ProgressWatchdog:
        from trime_dist.core.lost_ranks import Heartbeat

        self.beat()
        self._heartbeat = Heartbeat(self.env, self.stage, self.during).start()  # (how the others tell this rank is alive)
        if self.env.world_size > 1 and self.timeout_s > 0:  # one process has nobody to wait for
            self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        from trime_dist.core.constants import EXIT_RANK_LOST
        from trime_dist.core.lost_ranks import describe_lost, find_lost_ranks

        lost = find_lost_ranks(self.env)
        line = (f"trime {self.stage}: error: {where(self.env)}: no progress for {idle:.0f} s during "
                f"{self.during} (limit {self.timeout_s:.0f} s); {describe_lost(lost, self.env)}; stopping this rank")
        print(line, file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_RANK_LOST)  # the main thread is blocked in C++: nothing else can end it
