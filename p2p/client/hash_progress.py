"""Progress of PUBLISH while it reads a large file to hash it.

Hashing runs in a thread (``content.ContentCache.identify``), which reports the
bytes read through :meth:`HashProgress.read` (a plain assignment, safe from any
thread); the reactor looks at that figure on its own clock. Nothing is shown for
a file hashed within :data:`QUIET` seconds. Past that, in a terminal whose stdout
shows progress, a bar like a download's (:class:`~p2p.client.progress.ProgressBar`);
otherwise one stderr note then and one every :data:`NOTE_EVERY` seconds. Either
way a last stderr note gives the size, the time and the rate.
"""

from __future__ import annotations

from typing import Any

from p2p.client.progress import ProgressBar, human_bytes, human_duration
from p2p.client.words import quote

#: Seconds of hashing before anything is shown.
QUIET = 1.0
#: How often the figure is looked at (the bar redraws at most this often).
TICK = 0.25
#: Seconds between two notes when there is no bar.
NOTE_EVERY = 10.0


class HashProgress:
    """Shows the hashing of ``name`` (``size`` bytes) for ``output`` on ``clock``."""

    def __init__(self, output: Any, name: str, size: int, clock: Any) -> None:
        self.output = output
        self.name = name
        self.size = size
        self.clock = clock
        self.started = clock.seconds()
        #: Bytes read so far (set from the hashing thread).
        self.done = 0
        self.shown = False
        self._bar: ProgressBar | None = None
        self._next_note = 0.0
        self._call = clock.callLater(QUIET, self._tick)

    def read(self, count: int) -> None:
        """Called from the hashing thread: ``count`` bytes read so far."""
        self.done = count

    def _tick(self) -> None:
        self._call = None
        now = self.clock.seconds()
        if not self.shown:
            self.shown = True
            stream = self.output.progress_stream()
            if stream is not None:
                columns = getattr(stream, "columns", None)
                label = f"hashing {self.name}"
                self._bar = ProgressBar(
                    stream, self.size, label, clock=self.clock.seconds, columns=columns
                )
            else:
                self.output.note(
                    f"PUBLISH: hashing {quote(self.name)} ({human_bytes(self.size)}) "
                    "before publishing it; the shell keeps serving meanwhile"
                )
                self._next_note = now + NOTE_EVERY
        if self._bar is not None:
            self._bar.update(self.done, self.size)
        elif now >= self._next_note:
            self._next_note = now + NOTE_EVERY
            percent = self.done * 100 // self.size if self.size else 100
            self.output.note(
                f"PUBLISH: hashing {quote(self.name)}: {percent}% "
                f"({human_bytes(self.done)} of {human_bytes(self.size)})"
            )
        self._call = self.clock.callLater(TICK, self._tick)

    def end(self, result: Any = None) -> Any:
        """Hashing is over (``result`` passes through): stop, and if anything was shown,
        say how long it took."""
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._bar is not None:
            self._bar.finish()
            self._bar = None
        if self.shown:
            seconds = self.clock.seconds() - self.started
            rate = self.done / seconds if seconds > 0 else 0.0
            self.output.note(
                f"PUBLISH: hashed {quote(self.name)}: {human_bytes(self.done)} in "
                f"{human_duration(seconds)} ({human_bytes(rate)}/s)"
            )
        return result
