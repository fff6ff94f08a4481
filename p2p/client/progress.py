"""A one-line terminal progress bar for downloads: bytes, rate, time left.

Redrawn in place with ``\\r`` at most ``MAX_REDRAWS_PER_SECOND`` times a second,
and cleared by ``finish()`` so the next line the shell prints starts clean.
The shell uses it only when stdout is a terminal.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Callable
from typing import TextIO

MAX_REDRAWS_PER_SECOND = 10
BAR_WIDTH = 24
MIN_BAR_WIDTH = 10
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


def _fit(label: str, done: float | None, rest: list[str], width: int | None) -> str:
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
        self.total = total
        self.label = label
        self.clock = clock
        self.started = clock()
        self.received = 0
        self._last_draw = float("-inf")
        self._width = 0  # length of the last line drawn, to clear it

    def update(self, received: int, total: int | None = None) -> None:
        """Record progress; redraw unless the last redraw was under 0.1 s ago."""
        self.received = received
        if total is not None:
            self.total = total
        now = self.clock()
        if now - self._last_draw < 1.0 / MAX_REDRAWS_PER_SECOND:
            return
        self._last_draw = now
        self._draw(self.render(now))

    def render(self, now: float | None = None) -> str:
        """The line as it would be drawn now (without ``\\r``)."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-6)
        rate = self.received / elapsed
        done, parts = None, []
        if self.total:
            done = min(self.received / self.total, 1.0)
            parts.append(f"{done * 100:3.0f}%")
            parts.append(f"{human_bytes(self.received)} / {human_bytes(self.total)}")
        else:
            parts.append(human_bytes(self.received))
        parts.append(f"{human_bytes(rate)}/s")
        if self.total and rate > 0:
            left = max(self.total - self.received, 0) / rate
            parts.append(f"{human_duration(left)} left")
        width = self.columns() if self.columns is not None else None
        return _fit(self.label, done, parts, width)

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
