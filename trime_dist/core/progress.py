"""The one progress display of every stage: rank 0 only; a tqdm bar on a terminal, a plain line every N seconds
in a log file (no carriage-return redraws), nothing on the other ranks.

N is TRIME_PROGRESS_EVERY_S (default 30; 0 = a line at every update). The lines go through `logging`, so they
carry the time stamp of the other log lines and land in the stage's log files too. Where a stage only knows its
own rank's share of the work (prepare's bytes, group's blocks, datastore encode's keys), `scale` = job / share
makes rank 0's bar an estimate of the whole job, without a collective per item. No torch here.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

log = logging.getLogger(__name__)

EVERY_ENV = "TRIME_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0

T = TypeVar("T")


def every_s_from_env() -> float:
    """Seconds between progress lines in a log file: TRIME_PROGRESS_EVERY_S, else 30."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{EVERY_ENV}={raw!r}: expected seconds between progress lines, a number >= 0")
    return value


class Progress:
    """What every stage calls; this base shows nothing (the ranks other than 0)."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Bar(Progress):
    """tqdm on a terminal; counts are kept in the caller's units and shown times `scale` (whole numbers)."""

    def __init__(self, total, desc, unit, initial, scale, unit_scale, leave):
        from tqdm import tqdm

        self.scale, self.done = scale, float(initial)
        self.bar = tqdm(total=None if total is None else round(total * scale), initial=round(initial * scale),
                        desc=desc, unit=unit, unit_scale=unit_scale, leave=leave, dynamic_ncols=True)

    def update(self, n: float = 1) -> None:
        self.done += n
        self.bar.update(round(self.done * self.scale) - self.bar.n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Lines(Progress):
    """One line per `every_s` seconds of `clock` (checked at each update) and a final line at close (none when
    the `with` block ends by an exception)."""

    def __init__(self, total, desc, unit, initial, scale, unit_scale, every_s, clock, write):
        self.total, self.desc, self.unit, self.scale, self.unit_scale = total, desc, unit, scale, unit_scale
        self.every_s, self.clock, self.write = every_s, clock, write
        self.done = self.start_done = float(initial)
        self.start = self.last = clock()
        self.postfix = ""
        self.closed = False

    def _count(self, n: float) -> str:
        """n of the caller's units as the job's count: 1.23MB with unit_scale (unit B), else 1,234."""
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(n * self.scale) + self.unit
        return f"{round(n * self.scale):,}"

    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed                                 # caller's units per s
        done = self._count(self.done) + ("" if self.total is None else f"/{self._count(self.total)}")
        if self.unit_scale:
            text = f"{self.desc}: {done}"
            speed = f"{self._count(rate)}/s"
        else:
            text = f"{self.desc}: {done} {self.unit}"
            speed = f"{rate * self.scale:.3g} {self.unit}/s"
        text += (f" ({100 * self.done / self.total:.0f}%)" if self.total else "") + f", {speed}"
        if final:
            text += f", elapsed {_interval(elapsed)}"
        elif self.total is not None and rate > 0:
            text += f", ETA {_interval(max(self.total - self.done, 0) / rate)}"
        return text + self.postfix

    def update(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.write(self.line(now))

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.write(self.line(self.clock(), final=True))

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        self.closed = True  # an error (or a loop left early) ends it without a final line


def _interval(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def show_progress(total: Optional[float], desc: str, unit: str = "it", *, rank: int, initial: float = 0,
             scale: float = 1.0, unit_scale: bool = False, leave: bool = True, tty: Optional[bool] = None,
             every_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
             write: Optional[Callable[[str], None]] = None) -> Progress:
    """The progress of `total` items (None = unknown) for `rank`: a tqdm bar on rank 0 when stderr is a terminal
    (`tty`), else lines every `every_s` seconds (default: TRIME_PROGRESS_EVERY_S) through `write` (log.info);
    nothing on other ranks. `scale`: the job's work per unit of this rank's (shown as an estimate)."""
    if rank != 0:
        return Progress()
    if scale != 1.0:
        desc = f"{desc} (job, est. from rank 0)"
    if tty if tty is not None else sys.stderr.isatty():
        return _Bar(total, desc, unit, initial, scale, unit_scale, leave)
    return _Lines(total, desc, unit, initial, scale, unit_scale, every_s_from_env() if every_s is None else every_s,
                  clock, write or log.info)


def track(items: Iterable[T], desc: str, unit: str = "it", *, rank: int, total: Optional[float] = None,
          **kwargs) -> Iterator[T]:
    """`items` one by one, the progress updated after each (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with show_progress(total, desc, unit, rank=rank, **kwargs) as bar:
        for item in items:
            yield item
            bar.update(1)
