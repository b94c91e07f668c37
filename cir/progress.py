"""Progress of a long job, readable where it runs: a bar with rate and ETA at a terminal, and
without one (a log file, a batch scheduler, a pipe) a plain line every ``every_s`` seconds, since a
bar there is either invisible or thousands of carriage returns in the log. A job shorter than one
interval prints nothing without a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``update(n)`` as work is done, ``close()`` at the end (also as a context manager).

    Args:
        prog: the command, first on every line (``cir index``).
        what: what is counted (``embedding``), shown before the counts.
        total: the amount of work, for the share and the ETA (None: unknown, rate only).
        unit: the thing counted (``product``).
        every_s: seconds between lines without a terminal.
        tty: whether ``stream`` is a terminal (default: ask it).
    """

    def __init__(self, prog: str, what: str, total: int | None, unit: str, stream: TextIO | None = None,
                 every_s: float = 30.0, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prog, self.what, self.total, self.unit = prog, what, total, unit
        self.stream = stream or sys.stderr
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.lines = 0
        self.start = self.last = clock()
        is_tty = self.stream.isatty() if tty is None else tty
        self.bar = tqdm(total=total, desc=what, unit=unit, file=self.stream) if is_tty else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def expect(self, n: int) -> None:
        """``n`` more items of work, learnt as the job goes (a converter reads one file at a time)."""
        self.total = (self.total or 0) + n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def _line(self, now: float, final: bool = False) -> None:
        self.lines += 1
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        counts = f"{self.done}/{self.total} {self.unit}s ({self.done / self.total:.0%})" if self.total else \
            f"{self.done} {self.unit}s"
        tail = f"in {_duration(elapsed)}" if final else (
            f"ETA {_duration((self.total - self.done) / rate)}" if self.total and rate > 0 else "")
        print(f"{self.prog}: {self.what} {counts}, {rate:.1f}/s{', ' + tail if tail else ''}", file=self.stream,
              flush=True)

    def close(self) -> None:
        """Ends the bar; without a terminal, a last line with the time taken, where the job was long
        enough to print any line (a short job says nothing: its caller's own output follows)."""
        if self.bar is not None:
            self.bar.close()
        elif self.lines:
            self._line(self.clock(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.bar is not None:
            self.bar.close()
