"""Progress on long work: a tqdm bar on a terminal, and plain log lines when stderr is not one (a file, CI,
``nohup``), so progress stays visible there too."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` / iteration, writing one line to stderr at every tenth of
    the work and at least every ``interval`` seconds: ``desc: n/total (pct%) postfix, elapsed, ~left``."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 initial: int = 0, interval: float = 30.0) -> None:
        self.iterable, self.desc, self.n, self.interval = iterable, desc, initial, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.start = self.last = time.perf_counter()
        self.start_n, self.printed_n, self.postfix, self.closed = initial, initial, "", False
        self.step = max(1, (self.total or 0) // 10)
        self.next_line = initial + self.step

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n >= self.next_line or now - self.last >= self.interval:
            self._line(now)
            while self.next_line <= self.n:
                self.next_line += self.step

    def _line(self, now: float) -> None:
        self.last, self.printed_n = now, self.n
        elapsed = now - self.start
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        left = ""
        if self.total and self.n > self.start_n:
            left = f", ~{_duration(elapsed / (self.n - self.start_n) * (self.total - self.n))} left"
        print(f"{self.desc}: {done} {self.postfix}".rstrip() + f", {_duration(elapsed)} elapsed{left}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """The final line, unless the last one already showed where the work ended."""
        if not self.closed and self.n != self.printed_n:
            self._line(time.perf_counter())
        self.closed = True


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             enabled: bool = True, initial: int = 0, unit: str = "it", leave: bool = True):
    """A progress bar (tqdm) on a terminal, :class:`LineProgress` elsewhere, nothing when not ``enabled``."""
    from tqdm.auto import tqdm
    if not enabled or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, disable=not enabled, initial=initial, unit=unit, leave=leave)
    return LineProgress(iterable, total=total, desc=desc, initial=initial)
