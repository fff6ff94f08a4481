"""One shell's standing with the indexer: the connected user, its peer server,
and the local state (identities, what was published from here) in its home.

The commands read and change this state; the peer server asks
:meth:`Session.is_published` before serving a file, which reads the record of
what this client published (never the indexer's listing: anyone could publish
in a user's name there), then :meth:`Session.is_current`: a file that changed
since its size and SHA-256 were published is refused, hashed again off the
reactor and published again (``PUBLISH_FILE`` mode ``replace``), so this peer
never serves bytes that fail a downloader's check. A shell has at most one
connected user (protocol.md section 5).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2p import wire
from p2p.client import content
from p2p.client.content import Claim, Stamp
from p2p.client.home import Home
from p2p.client.indexer_client import UnknownOperation
from p2p.peer.server import NoPieces
from p2p.peer.share import NotShared, open_shared


class Output(Protocol):
    """Where the shell writes: result lines, notes for humans, a progress stream."""

    def line(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...

    def progress_stream(self) -> Any | None: ...


class Indexer(Protocol):
    """Asks the indexer one operation; fires with ``(code, rows)``.

    ``identity=`` (keyword) names the identity the request is made with
    (default: the one kept for ``user``); ``classic`` is True once the indexer
    is known to speak only the classic protocol.
    """

    classic: bool

    def request(self, op: str, user: str, *args: str | int, **kw: Any) -> Deferred: ...


class Session:
    """The connected user (or None), its peer server, and the client's home.

    ``server_factory(share_dir, is_published, reactor=..., identity=...)`` builds
    the peer file server started by CONNECT (``identity`` only if it takes it).
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
        home: Home | None = None,
    ) -> None:
        self.indexer = indexer
        self.home = home if home is not None else Home()
        self.output = output
        self.share_dir = Path(share_dir)
        self.peer_listen = peer_listen
        self.reactor = reactor
        self.server_factory = server_factory
        #: The user this shell is connected as, or None.
        self.user: str | None = None
        self.server: Any = None
        #: The port the peer server listens on (what CONNECT announced), or None.
        self.port: int | None = None
        #: Renews the connected user's lease (``p2p.client.lease.Lease``, set by the shell):
        #: ``start()`` when a user connects, ``stop()`` before it goes.
        self.lease: Any = None
        #: Sizes and SHA-256 of the files published from here, computed off the reactor.
        self.content = content.for_reactor(
            self.home.content_cache_file, reactor, self.home.pieces_dir
        )
        #: Fires when the piece digests missing at CONNECT are computed (:meth:`prepare_pieces`).
        self.pieces_ready: Deferred = defer.succeed(None)
        #: Names being hashed and published again because they changed (one at a time each).
        self.refreshing: dict[str, Deferred] = {}

    def is_published(self, name: str) -> bool:
        """Whether the peer server may serve ``name``: the connected user published it
        from this share directory with this client (the record in the home)."""
        user = self.user
        if user is None:
            return False
        try:
            return name in self.home.published(user, self.share_dir)
        except Exception:
            self.log.failure("cannot read what {user} published", user=user)
            return False

    def is_current(self, name: str, st: Any) -> bool:
        """Whether the file ``name``, as ``st`` (its ``os.stat_result``) shows it, is still
        what the connected user published. If not, it is hashed and published again
        (:meth:`republish`) and False is returned: the request is refused meanwhile."""
        user = self.user
        if user is None:
            return False
        try:
            claim = self.home.claim(user, self.share_dir, name)
        except Exception:
            self.log.failure("cannot read what {user} published", user=user)
            return False
        if claim is None or Stamp.of(st) == claim.content.stamp:
            return True  # nothing was claimed of it (classic PUBLISH), or unchanged
        self.republish(user, name, claim)
        return False

    def pieces(self, name: str, fd: int, size: int) -> Deferred[bytes]:
        """The piece digests of the published file ``name``, open as ``fd`` (the peer
        server's :class:`~p2p.peer.server.PieceSource`, asked after ``is_current``):
        from ``$P2P_HOME/pieces``, else read from ``fd`` in a thread. Fails with
        NoPieces for a file published without a hash (nothing to check them against)."""
        user = self.user
        claim = self.home.claim(user, self.share_dir, name) if user is not None else None
        if claim is None or claim.content.size != size:
            return defer.fail(NoPieces(name))

        def changed(failure):
            failure.trap(content.FileChanging)
            raise NoPieces(name)  # not what was published after all: as a stale file

        return self.content.pieces_of(claim.content.sha256, fd, size).addErrback(changed)

    def republish(self, user: str, name: str, claim: Claim) -> Deferred:
        """Hash ``name`` again and publish it again with its new size and SHA-256;
        fires when done (at most one at a time per name)."""
        running = self.refreshing.get(name)
        if running is not None:
            return running
        self.output.note(
            f"{name} changed since {user} published it: refusing it to peers until it is "
            "hashed and published again"
        )
        d = self._republish(user, name, claim)
        self.refreshing[name] = d
        d.addErrback(lambda f: self.log.failure("publishing {name} again", f, name=name))
        d.addBoth(lambda _: self.refreshing.pop(name, None))
        return d

    @defer.inlineCallbacks
    def _republish(self, user: str, name: str, claim: Claim):
        try:
            found = yield self.content.identify(self.share_dir / name)
        except OSError as exc:
            self.output.note(f"{name} cannot be read to publish it again: {reason(exc)}")
            return
        text = claim.description
        new_claim: Claim | None = Claim(text, found)
        try:
            code, _rows = yield self.indexer.request(
                "PUBLISH_FILE", user, name, text, found.size, found.sha256, "replace"
            )
        except UnknownOperation:  # the indexer no longer knows it: DELETE, then PUBLISH
            yield self.indexer.request("DELETE", user, name)
            code, _rows = yield self.indexer.request("PUBLISH", user, name, text)
            new_claim = None
        except Exception as exc:
            self.output.note(f"{name} could not be published again: {reason(exc)}")
            return
        if code != wire.OK:
            self.output.note(f"{name} could not be published again: the indexer answered {code}")
            return
        if self.user == user:
            self.home.add_published(user, self.share_dir, name, new_claim)
        self.output.note(
            f"{name} published again by {user}: {found.size} bytes, SHA-256 {found.sha256}"
        )

    def go_online(self, user: str, server: Any, port: int | None = None) -> None:
        """``user`` is connected and ``server`` serves its files on ``port``."""
        self.user = user
        self.server = server
        self.port = port
        self.renew_lease()
        self.pieces_ready = self.prepare_pieces()

    @defer.inlineCallbacks
    def prepare_pieces(self):
        """Compute, one file at a time in the thread, the piece digests of the connected
        user's published files that have none kept (published before PIECES existed, or
        the cache was removed), so that a downloader's first PIECES need not wait for a
        whole read. Never fails; stops when the user goes or the client ends."""
        user = self.user
        try:
            names = sorted(self.home.published(user, self.share_dir)) if user else []
        except Exception:
            names = []
        for name in names:
            if self.user != user or self.content.stopping.is_set():
                return
            try:
                yield self._prepare(user, name)
            except Exception:
                self.log.failure("the pieces of {name}", name=name)

    @defer.inlineCallbacks
    def _prepare(self, user: str, name: str):
        claim = self.home.claim(user, self.share_dir, name)
        if claim is None or self.content.has_pieces(claim.content.sha256):
            return
        try:
            fd, size = open_shared(self.share_dir, name)
        except (NotShared, OSError):
            return  # not there (yet): computed on demand if it comes
        try:
            if Stamp.of(os.fstat(fd)) == claim.content.stamp:
                yield self.content.pieces_of(claim.content.sha256, fd, size)
        except (content.FileChanging, content.Interrupted):
            pass  # changed meanwhile (republished), or the client is ending
        finally:
            os.close(fd)

    def renew_lease(self) -> None:
        """(Re)start renewing the connected user's lease: once now, then periodically."""
        if self.lease is not None and self.user is not None:
            self.lease.start()

    def hold_lease(self) -> None:
        """Stop renewing (before this shell disconnects its user: its answer is ours)."""
        if self.lease is not None:
            self.lease.stop()

    @defer.inlineCallbacks
    def go_offline(self):
        """No user is connected any more: forget it and stop serving."""
        self.hold_lease()
        server, self.server = self.server, None
        self.user = None
        self.port = None
        if server is not None:
            yield quietly(server.stop())

    @defer.inlineCallbacks
    def close(self):
        """Disconnect the connected user from the indexer, then go offline.

        Never fails: the shell is ending whatever the indexer says.
        """
        user = self.user
        self.hold_lease()
        self.content.stop()
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
