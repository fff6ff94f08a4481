"""How every service fails at start: one line on the terminal, no traceback, status 1.

twistd starts its service with ``privilegedStartService`` then ``startService``;
an exception raised there goes up through twistd's runner and ends as
Python's traceback on ``sys.stderr``, which twistd has pointed into its log
when given ``--logfile``: the operator sees nothing, or a page of frames.
twistd itself refuses to start (a pid file in use, a bad option) with
``SystemExit``, which the interpreter turns into an exit status without a
traceback; the services do the same here.

- A service that knows better than the exception what went wrong and what to
  do raises :class:`StartFailure` with its whole line (``indexer cannot start:
  ix.db is ...: restore ...``). Any other exception is worded by
  :func:`failure_text`: an ``OSError`` names its file and the usual fix, a
  port that cannot be listened on names the port.
- :class:`StartGuard` is the mixin of the service twistd starts (the top of
  each plugin's tree): it says the line with :func:`p2p.console.say` (the real
  stdout, whatever twistd's log) and raises ``SystemExit(1)``. Nested in
  another guarded service (the stack), it only rewords the failure under its
  own label and lets the outer one say it, so there is still one line.
- :class:`ListenFailure` is the mixin of a :class:`p2p.listening.ListeningService`
  whose port cannot be opened at start: the failure becomes its line (with
  the listening description and what to do) instead of a line of its own.

Public Twisted API only; this module imports only the foundation.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from p2p.console import say

#: What to do about a port that cannot be listened on.
PORT_FIX = "stop the program that holds it, or choose another --listen"
#: What to do about a listening description that is not one.
ENDPOINT_FIX = "give --listen a server endpoint such as tcp:PORT or unix:PATH"

#: What to do about a file, by the errno of the failure.
FILE_FIXES = {
    errno.EACCES: "give this user read and write access to it, or choose another path",
    errno.EPERM: "give this user read and write access to it, or choose another path",
    errno.EROFS: "its file system is read-only: choose a path on a writable one",
    errno.ENOSPC: "its disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EFBIG: "it would pass the file size limit (ulimit -f): raise it or free some space",
    errno.EISDIR: "it is a folder: give the path of a file",
    errno.ENOTDIR: "a part of its path is not a folder: fix the path",
    errno.ENOENT: "its folder does not exist: create it or fix the path",
}


class StartFailure(Exception):
    """A start-up failure worded for the operator: who, what, which file or port, what to do.

    The message is the line to say after ``s> `` (e.g. ``indexer cannot start: ...``).
    """


def file_problem(path: object, exc: OSError) -> str:
    """``PATH: what the system said: what to do``, for a file that cannot be used."""
    fix = FILE_FIXES.get(exc.errno or 0, "check the file and its folder")
    return f"{path}: {exc.strerror or exc}: {fix}"


def failure_text(label: str, exc: BaseException) -> str:
    """The one line (without ``s> ``) saying why ``label`` cannot start."""
    if isinstance(exc, StartFailure):
        return str(exc)
    if isinstance(exc, CannotListenError):
        where = f"{exc.interface or '*'}:{exc.port}"
        return f"{label} cannot listen on {where}: {_reason(exc.socketError)}: {PORT_FIX}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{label} cannot start: {file_problem(exc.filename, exc)}"
    return f"{label} cannot start: {_reason(exc)}"


def _reason(exc: object) -> str:
    text = " ".join(str(exc).split()).rstrip(".")  # one line, whatever the exception held
    return text or type(exc).__name__


class StartGuard:
    """Mixin for the service twistd starts: a failure at start is one line and status 1.

    ``label`` names the service in the line. Put it first in the bases, so it
    wraps the start methods of the rest.
    """

    label = "service"
    parent = None  # set by setServiceParent

    def privilegedStartService(self) -> None:
        with self.start_guard():
            super().privilegedStartService()  # type: ignore[misc]

    def startService(self) -> None:
        with self.start_guard():
            super().startService()  # type: ignore[misc]

    @contextmanager
    def start_guard(self) -> Iterator[None]:
        """Turn any exception raised inside into this service's start-up failure."""
        try:
            yield
        except Exception as exc:
            text = failure_text(self.label, exc)
            if self._nested():
                raise StartFailure(text) from exc
            self.cannot_start(text)

    def _nested(self) -> bool:
        """True inside another guarded service, which then says the line."""
        parent = self.parent
        while parent is not None:
            if isinstance(parent, StartGuard):
                return True
            parent = getattr(parent, "parent", None)
        return False

    def cannot_start(self, text: str) -> NoReturn:
        """Say ``s> text`` on the terminal and end twistd with status 1, without traceback."""
        say(f"s> {text}")
        raise SystemExit(1)


class ListenFailure:
    """Mixin for a ListeningService: a port that cannot be opened at start is its
    :class:`StartFailure` (the description and what to do), said once by the guard.

    A port that fails later (an endpoint answering after the start) is said as
    the ListeningService says it.
    """

    label: str
    description: str
    _starting = False

    def privilegedStartService(self) -> None:
        self._starting = True
        try:
            super().privilegedStartService()  # type: ignore[misc]
        finally:
            self._starting = False

    def cannot_listen(self, failure: Failure) -> None:
        if not self._starting:
            super().cannot_listen(failure)  # type: ignore[misc]
            return
        fix = PORT_FIX if failure.check(CannotListenError) else ENDPOINT_FIX
        raise StartFailure(
            f"{self.label} cannot listen on {self.description}: "
            f"{_reason(failure.getErrorMessage())}: {fix}"
        ) from failure.value
