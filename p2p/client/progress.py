"""Download progress: a :class:`Meter` (bytes, a recent rate, time left, stalled)
and a one-line terminal progress bar drawn from it.

Redrawn in place with ``\\r`` at most ``MAX_REDRAWS_PER_SECOND`` times a second,
and cleared by ``finish()`` so the next line the shell prints starts clean.
The shell uses it only when stdout is a terminal.
"""

from __future__ import annotations

import time
import unicodedata
from collections import deque
from collections.abc import Callable
from typing import TextIO

MAX_REDRAWS_PER_SECOND = 10
BAR_WIDTH = 24
MIN_BAR_WIDTH = 10
#: Seconds over which the rate is measured (recent, so a slowdown shows).
RATE_WINDOW = 5.0
#: Seconds without a byte after which a transfer shows as stalled.
STALL_AFTER = 5.0
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in _UNITS:
        if abs(count) < 1024 or unit == _UNITS[-1]:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; hours when needed."""
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _graphic(done: float, width: int) -> str:
    filled = int(done * width)
    return f"[{'#' * filled}{' ' * (width - filled)}]"


def columns_of(text: str) -> int:
    """Terminal columns ``text`` takes: wide (East Asian) characters 2, combining marks 0."""
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        for ch in text
    )


def _shorten(label: str, columns: int) -> str:
    """``label`` cut to ``columns`` columns, ending in ``…`` when cut."""
    if columns_of(label) <= columns:
        return label
    out, used = [], 1  # room for the ellipsis
    for ch in label:
        used += columns_of(ch)
        if used > columns:
            break
        out.append(ch)
    return "".join(out) + "…"


def fit_line(label: str, done: float | None, rest: list[str], width: int | None) -> str:
    """The bar's line, narrower than ``width``: a line that wraps cannot be redrawn
    in place with ``\\r``, so each redraw would add a row. To fit, the ``[###  ]``
    graphic narrows, then goes, then the label is shortened, then the line is cut."""
    tail = "  ".join(rest)
    if done is not None:
        line = f"{label}  {_graphic(done, BAR_WIDTH)} {tail}"
        if not width or columns_of(line) < width:
            return line
        narrower = BAR_WIDTH - (columns_of(line) - (width - 1))
        if narrower >= MIN_BAR_WIDTH:
            return f"{label}  {_graphic(done, narrower)} {tail}"
    line = f"{label}  {tail}"
    if not width or columns_of(line) < width:
        return line
    limit = width - 1  # keep off the last column, where some terminals wrap early
    room = limit - len(tail) - 2
    if room >= 8:
        return _shorten(label, room) + "  " + tail
    return _shorten(_shorten(label, 8) + "  " + tail, limit)


class Meter:
    """Bytes received over time: progress, a recent rate, time left, and whether the
    transfer is stalled.

    The rate is measured over the last ``window`` seconds, not since the start, so
    a peer that slows down or freezes shows it; after ``stall_after`` seconds
    without a byte the transfer is *stalled* and no rate or time left is claimed.
    """

    def __init__(
        self,
        now: float,
        total: int | None = None,
        window: float = RATE_WINDOW,
        stall_after: float = STALL_AFTER,
    ) -> None:
        self.started = now
        self.total = total
        self.received = 0
        self.window = window
        self.stall_after = stall_after
        #: When the last new byte was counted.
        self.last_change = now
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])

    def update(self, received: int, total: int | None, now: float) -> None:
        """Record that ``received`` bytes (of ``total``, if known) have arrived by ``now``."""
        if total is not None:
            self.total = total
        if received != self.received:
            self.last_change = now
        self.received = received
        self._samples.append((now, received))
        # Keep one sample at or before the window's start: the rate's base.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def fraction(self) -> float | None:
        """How much of the total has arrived (0..1), or None when the total is unknown."""
        if not self.total:
            return None
        return min(self.received / self.total, 1.0)

    def stalled_for(self, now: float) -> float | None:
        """Seconds since the last byte, once that is ``stall_after`` or more; else None."""
        quiet = now - self.last_change
        return quiet if quiet >= self.stall_after else None

    def rate(self, now: float) -> float:
        """Bytes per second over the last ``window`` seconds (0 when stalled)."""
        if self.stalled_for(now) is not None:
            return 0.0
        base_time, base_bytes = self._samples[0]
        return (self.received - base_bytes) / max(now - base_time, 1e-6)

    def left(self, now: float) -> float | None:
        """Seconds until the end at the current rate; None if unknown or stalled."""
        rate = self.rate(now)
        if not self.total or rate <= 0:
            return None
        return max(self.total - self.received, 0) / rate

    def describe(self, now: float) -> list[str]:
        """``["42%", "42.0 MiB / 100.0 MiB", "12.3 MiB/s", "0:05 left"]``; when stalled,
        the rate and time left are ``"stalled 0:12"`` (no byte for that long)."""
        parts = []
        done = self.fraction()
        if done is not None:
            parts.append(f"{done * 100:3.0f}%")
            parts.append(f"{human_bytes(self.received)} / {human_bytes(self.total or 0)}")
        else:
            parts.append(human_bytes(self.received))
        stalled = self.stalled_for(now)
        if stalled is not None:
            parts.append(f"stalled {human_duration(stalled)}")
            return parts
        parts.append(f"{human_bytes(self.rate(now))}/s")
        left = self.left(now)
        if left is not None:
            parts.append(f"{human_duration(left)} left")
        return parts


class ProgressBar:
    """``label [#####     ]  42.0 MiB / 100.0 MiB  12.3 MiB/s  0:05 left``."""

    def __init__(
        self,
        stream: TextIO,
        total: int | None,
        label: str,
        clock: Callable[[], float] = time.monotonic,
        columns: Callable[[], int | None] | None = None,
    ) -> None:
        self.stream = stream
        #: The terminal's width, asked at every redraw (it may be resized); None: unknown.
        self.columns = columns
        self.label = label
        self.clock = clock
        self.meter = Meter(clock(), total)
        self._last_draw = float("-inf")
        self._width = 0  # length of the last line drawn, to clear it

    @property
    def received(self) -> int:
        return self.meter.received

    def update(self, received: int, total: int | None = None) -> None:
        """Record progress; redraw unless the last redraw was under 0.1 s ago."""
        now = self.clock()
        self.meter.update(received, total, now)
        if now - self._last_draw < 1.0 / MAX_REDRAWS_PER_SECOND:
            return
        self._last_draw = now
        self._draw(self.render(now))

    def render(self, now: float | None = None) -> str:
        """The line as it would be drawn now (without ``\\r``)."""
        now = self.clock() if now is None else now
        width = self.columns() if self.columns is not None else None
        return fit_line(self.label, self.meter.fraction(), self.meter.describe(now), width)

    def _draw(self, line: str) -> None:
        pad = max(self._width - columns_of(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = columns_of(line)

    def finish(self) -> None:
        """Erase the bar and return the cursor to the start of the line."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
