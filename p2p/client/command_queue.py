"""Input lines run one at a time, in order, each to completion.

A :class:`~twisted.internet.defer.DeferredQueue` holds the lines; one
``inlineCallbacks`` consumer takes them in turn and waits for each command's
Deferred before taking the next. A command that finishes at once runs inside
``submit`` (scripts and tests see its output immediately); a slow one (a
download) holds the lines behind it without blocking the reactor.

Why not ``DeferredLock.run``: each release starts the next waiter from inside
the previous one's callback, so a few hundred quick lines (comments, HELP)
queued behind a slow command nest that deep and hit the recursion limit.
``inlineCallbacks`` resumes on already-fired Deferreds in a loop instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.logger import Logger
from twisted.python.failure import Failure


class Quit(Exception):
    """Raised by a command to end the queue: no line after it runs."""


class CommandQueue:
    """Feeds lines to ``run`` one at a time; fires :attr:`ended` after a :class:`Quit`.

    ``run(line)`` may return a Deferred (the next line waits for it) or
    anything else (done). An unexpected exception is logged and ``report``-ed,
    and the next line runs. ``on_idle`` is called whenever the last queued line
    has finished and the queue waits for input.
    """

    log = Logger()

    def __init__(self, run: Callable[[str], Any], report: Callable[[str], None]) -> None:
        self._run = run
        self._report = report
        self._lines: DeferredQueue[str] = DeferredQueue()
        self._running = False
        self.finished = False
        #: Fires (with None) once a command raised :class:`Quit`.
        self.ended: Deferred[None] = Deferred()
        #: Called whenever the queue is empty and waiting for a line (redraw the prompt).
        self.on_idle: Callable[[], None] = lambda: None
        self._consume()

    def submit(self, line: str) -> None:
        """Queue one line; it runs after the lines before it. Ignored once ended."""
        if not self.finished:
            self._lines.put(line)

    def close(self) -> None:
        """The shell is ending (a signal, the terminal closed): the lines still waiting
        never run, and later ones are ignored; the line running now finishes."""
        self.finished = True
        self._lines.pending.clear()

    @property
    def busy(self) -> bool:
        """A line is running or waiting to run."""
        return self._running or bool(self._lines.pending)

    @defer.inlineCallbacks
    def _consume(self):
        while True:
            line = yield self._lines.get()
            self._running = True
            try:
                yield defer.maybeDeferred(self._run, line)
            except Quit:
                break
            except Exception:
                self._unexpected(Failure())
            finally:
                self._running = False
            if not self._lines.pending:
                self._idle()
        self.finished = True
        self._lines.pending.clear()
        self.ended.callback(None)

    def _idle(self) -> None:
        try:
            self.on_idle()
        except Exception:  # a broken prompt must not stop the commands
            self.log.failure("the idle callback failed")

    def _unexpected(self, failure: Failure) -> None:
        self.log.failure("command failed unexpectedly", failure)
        self._report(f"internal error: {failure.getErrorMessage()}")
