"""One shell's standing with the indexer: the connected user, what that user
published, and the peer server that serves it.

The commands read and change this state; the peer server asks
:meth:`Session.is_published` before serving a file. A shell has at most one
connected user (protocol.md section 5).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2p import wire


class Output(Protocol):
    """Where the shell writes: result lines, notes for humans, a progress stream."""

    def line(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...

    def progress_stream(self) -> Any | None: ...


class Indexer(Protocol):
    """Asks the indexer one operation; fires with ``(code, rows)``."""

    def request(self, op: str, user: str, *args: str | int) -> Deferred: ...


class Session:
    """The connected user (or None), the names it published and its peer server.

    ``server_factory(share_dir, is_published, reactor=...)`` builds the peer
    file server started by CONNECT.
    """

    log = Logger()

    def __init__(
        self,
        indexer: Indexer,
        output: Output,
        share_dir: Path,
        peer_listen: str,
        reactor: Any,
        server_factory: Callable[..., Any],
    ) -> None:
        self.indexer = indexer
        self.output = output
        self.share_dir = Path(share_dir)
        self.peer_listen = peer_listen
        self.reactor = reactor
        self.server_factory = server_factory
        #: The user this shell is connected as, or None.
        self.user: str | None = None
        #: Files the connected user has published (what the peer server may serve).
        self.published: set[str] = set()
        self.server: Any = None

    def is_published(self, name: str) -> bool:
        """Whether the peer server may serve ``name`` (the connected user published it)."""
        return self.user is not None and name in self.published

    @defer.inlineCallbacks
    def go_online(self, user: str, server: Any):
        """``user`` is connected and ``server`` serves its files; learn what it
        published in earlier sessions, to serve those too."""
        self.user = user
        self.server = server
        self.published = set()
        try:
            code, rows = yield self.indexer.request("LIST_CONTENT", user, user)
        except Exception as exc:
            self.output.note(f"could not list the files {user} published before: {reason(exc)}")
            return
        if code != wire.OK or rows is None:
            self.output.note(f"could not list the files {user} published before (code {code})")
            return
        if self.user == user:
            self.published.update(row[0] for row in rows)

    @defer.inlineCallbacks
    def go_offline(self):
        """No user is connected any more: forget it and stop serving."""
        server, self.server = self.server, None
        self.user = None
        self.published = set()
        if server is not None:
            yield quietly(server.stop())

    @defer.inlineCallbacks
    def close(self):
        """Disconnect the connected user from the indexer, then go offline.

        Never fails: the shell is ending whatever the indexer says.
        """
        user = self.user
        if user is not None:
            try:
                code, _rows = yield self.indexer.request("DISCONNECT", user)
            except Exception as exc:
                self.output.note(f"could not disconnect {user}: {reason(exc)}")
            else:
                if code == wire.OK:
                    self.output.note(f"disconnected {user}")
                else:
                    self.output.note(f"could not disconnect {user} (code {code})")
        yield self.go_offline()


def reason(exc: BaseException) -> str:
    """A one-line, bounded description of ``exc`` for a note."""
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300] if text else type(exc).__name__


def quietly(d: Deferred) -> Deferred:
    """``d`` with any failure logged and dropped (stopping a server must not break QUIT)."""
    return defer.maybeDeferred(lambda: d).addErrback(
        lambda f: Session.log.failure("stopping the peer server failed", f)
    )
