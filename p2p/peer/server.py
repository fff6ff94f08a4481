"""The peer's file server: classic ``GET_FILE`` and the extensions ``FETCH``,
``RANGE`` and ``PIECES``.

protocol.md section 2. One request per connection:

- ``GET_FILE\\0<name>\\0``: code 0 then the raw bytes until close; 1 no such
  file (or not shared); 2 any other error.
- ``FETCH\\0<name>\\0<offset>\\0``: code 0, the total size as a decimal string
  and NUL, bytes ``[offset, size)``, close; 1; 2; 3 bad offset; 4 busy.
- ``RANGE\\0<name>\\0<offset>\\0<length>\\0``: code 0, the total size and NUL,
  exactly ``length`` bytes from ``offset``, close; 1; 2; 3 bad range (not
  numbers, length 0, past the end: nothing served); 4 busy.
- ``PIECES\\0<name>\\0``: code 0, the total size and NUL, the piece size
  (``wire.piece_size``) and NUL, the raw SHA-256 of each piece, close; 1 (also
  for a file published without a hash); 2. The digests come from a
  :class:`PieceSource` (the client's cache, or computed in a thread).

With ``max_uploads``, a transfer beyond that many under way is refused at once:
4 ("busy, ask again later") to FETCH and RANGE, 2 to a classic GET_FILE (PIECES
is not a transfer of the file and is not counted). An ``uploads`` watcher is
told when each transfer starts and ends (the client's notices on stderr). With
``max_upload_rate`` (bytes per second), every transfer of this server together
keeps to that rate (one :class:`~p2p.peer.ratelimit.TokenBucket`).
- any other operation: closed without a reply byte (what a classic peer sees
  when it is asked for something it does not know).

A requester that stays silent mid-request is dropped after ``request_timeout``,
and one that trickles its request (a byte now and then, each inside that
timeout) is dropped once ``request_deadline`` has passed since it connected;
a transfer that makes no progress for ``idle_timeout`` (a stalled downloader)
is dropped too. The file is streamed by a pull producer (``sender.py``), so a
slow downloader never makes this process hold more than one chunk of the file.

Given ``is_current(name, stat_result)``, a published file is served only while
it is still what was published: for a file whose size and SHA-256 were
published (protocol.md section 8) and that changed since, it answers False and
the request gets 1, as for a file that is not shared; the client meanwhile
hashes the file again and publishes it again (``p2p.client.session``).

Given an identity (the user this shell is connected as), the same port also
speaks TLS (extension, protocol.md "TLS, claimed names, LIST_PEERS"): a
connection whose first byte starts a TLS handshake gets a TLS 1.3 server
presenting that identity's certificate, and inside it the same one request as
above; any other first byte is the classic plaintext protocol, unchanged, so
classic downloaders keep working. Every guard applies to both alike: the
request timeouts run from the first byte (before it, a silence of
``request_timeout`` is cut too), the cap counts each connection once, and the
``sendfile`` fast path never applies to TLS (the bytes must be encrypted here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import tls, wire
from p2p.listening import DEFAULT_MAX_PER_SOURCE, ConnectionCap, listen
from p2p.peer.metrics import PeerMetrics
from p2p.peer.ratelimit import TokenBucket
from p2p.peer.sender import make_producer
from p2p.peer.share import NotShared, open_shared

#: Seconds a transfer may go without the downloader taking a byte.
DEFAULT_IDLE_TIMEOUT = 120.0
#: Seconds a requester has for its whole request (a few hundred bytes), however it trickles.
DEFAULT_REQUEST_DEADLINE = 3 * wire.DEFAULT_TIMEOUT

#: Fields of each request after the operation.
_ARGUMENTS = {op.encode(): count for op, count in wire.PEER_ARGUMENTS.items()}
#: The requests that transfer the file (counted against ``max_uploads``, paced by the cap).
_TRANSFERS = frozenset({wire.GET_FILE, wire.FETCH, wire.RANGE})
#: The requests whose reply carries the size (the extensions): a busy peer answers them 4.
_SIZED = frozenset({wire.FETCH, wire.RANGE, wire.PIECES})


class NoPieces(Exception):
    """The file has no piece list to serve: it was published without a hash (reply 1)."""


class PieceSource(Protocol):
    """Gives the piece digests of a published file (PIECES), so that this layer needs
    nothing of the client: ``pieces(name, fd, size)`` fires with the concatenated raw
    SHA-256 of each piece of the open file ``fd`` (``wire.piece_size(size)``), or
    fails with :class:`NoPieces`; ``fd`` stays open until it fires."""

    def pieces(self, name: str, fd: int, size: int) -> Deferred[bytes]: ...


@implementer(IHalfCloseableProtocol)
class PeerRequestProtocol(protocol.Protocol, TimeoutMixin):
    """Serves one GET_FILE, FETCH, RANGE or PIECES request, then closes.

    Half-closeable: a downloader may shut down its sending side once its
    request is out (classic clients do); that must not cut the file it asked for.
    """

    log = Logger()
    #: The address the factory admitted this connection from (``ConnectionCap``).
    source_addr: object = None

    def __init__(self, server: PeerServer) -> None:
        self.server = server
        self.fields: list[bytes] = []
        self.reader = wire.FieldReader(wire.MAX_NAME)
        self.producer = None
        self.answered = False
        self.callLater = server.reactor.callLater  # TimeoutMixin's clock
        #: The sniffing protocol this request waits behind until the first byte, if any.
        self.outer: protocol.Protocol | None = None

    def abort(self) -> None:
        """Drop the connection now, whether or not its first byte has arrived."""
        holder = self if self.transport is not None else self.outer
        if holder is not None and holder.transport is not None:
            holder.transport.abortConnection()

    # --- connection life ---------------------------------------------------

    def connectionMade(self) -> None:
        self._since = self.server.reactor.seconds()
        self.setTimeout(min(self.server.request_timeout, self.server.request_deadline))

    def connectionLost(self, reason) -> None:
        self.setTimeout(None)
        self.server.factory.connection_closed(self.source_addr)
        self.server._connections.discard(self)
        waiters, self.server._lost_waiters = self.server._lost_waiters, []
        for waiter in waiters:
            waiter()

    def readConnectionLost(self) -> None:
        """The requester sent EOF: keep serving a complete request, else close."""
        if not self.answered:
            self.answered = True
            self.setTimeout(None)
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Never half-closed from this side; nothing to do."""

    def timeoutConnection(self) -> None:
        self._note("timed out")
        self.transport.abortConnection()

    def _where(self) -> str:
        """The requester's address, ``host:port``."""
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def _note(self, fmt: str, **fields) -> None:
        """Log one event of this connection, prefixed with the requester's address."""
        link = "tls" if tls.is_tls(self.transport) else "plain"
        self.log.info("peer {peer} ({link}): " + fmt, peer=self._where(), link=link, **fields)

    def _tell(self, event: str, *args: object) -> None:
        """Tell the server's upload watcher, if any; its failure is logged, not raised."""
        watcher = self.server.uploads
        if watcher is None:
            return
        try:
            getattr(watcher, event)(self._where(), *args)
        except Exception:
            self.log.failure("the upload watcher failed")

    # --- request -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return  # bytes after a complete request are ignored
        # Activity restarts the silence timer, but never past the request deadline.
        left = self.server.request_deadline - (self.server.reactor.seconds() - self._since)
        if left <= 0:
            self.timeoutConnection()
            return
        self.setTimeout(min(self.server.request_timeout, left))
        # Fed in slices no longer than the limit, so an overrun is only ever
        # detected in a slice without NUL and no completed field is lost with it.
        step = self.reader.limit
        try:
            for start in range(0, len(data), step):
                self.fields.extend(self.reader.feed(data[start : start + step]))
                if self.fields and len(self.fields) > _ARGUMENTS.get(self.fields[0], 0):
                    break  # the request is complete (or its operation unknown)
        except wire.FieldTooLong:
            self._malformed()
            return
        if not self.fields:
            return
        op = self.fields[0]
        # A field whose NUL came in the same slice can be complete yet over the
        # limit: refuse it exactly as if it had arrived in pieces (code 2).
        if any(len(f) > step for f in self.fields[: _ARGUMENTS.get(op, 0) + 1]):
            self._malformed()
            return
        if op not in _ARGUMENTS:
            self.answered = True
            self._count(None)
            self.transport.loseConnection()  # unknown operation: no reply byte
            return
        if len(self.fields) > _ARGUMENTS[op]:
            self.answered = True
            self._serve(op.decode(), self.fields[1 : _ARGUMENTS[op] + 1])

    def _malformed(self) -> None:
        """A field overran its limit: no reply for a bad operation, else code 2."""
        self.answered = True
        if self.fields and self.fields[0] in _ARGUMENTS:
            self._reply(wire.PEER_ERROR)
        else:
            self._count(None)
            self.transport.loseConnection()

    def _count(self, code: int | None) -> None:
        """Count this request's answer ``code`` (None: no reply byte), when counting."""
        metrics = self.server.metrics
        if metrics is not None:
            op = self.fields[0] if self.fields else b""
            metrics.answered(op.decode() if op in _ARGUMENTS else None, code)

    def _reply(self, code: int) -> None:
        self._count(code)
        self.setTimeout(None)
        self.transport.write(wire.encode_code(code))
        self.transport.loseConnection()

    def _serve(self, op: str, args: list[bytes]) -> None:
        self.setTimeout(None)
        try:
            name = wire.decode_field(args[0], wire.FieldKind.FILE)
        except wire.BadField:
            self._note("{op} malformed name", op=op)
            self._reply(wire.PEER_ERROR)
            return
        limit = self.server.max_uploads
        if op in _TRANSFERS and limit is not None and self.server.uploading >= limit:
            self._note("{op} {name!r} refused: {n} uploads under way", op=op, name=name, n=limit)
            self._reply(wire.PEER_BUSY if op in _SIZED else wire.PEER_ERROR)
            return
        try:
            published = self.server.is_published(name)
        except Exception:
            self.log.failure("is_published({name!r}) raised", name=name)
            self._reply(wire.PEER_ERROR)
            return
        if not published:
            self._note("{op} {name!r} not published", op=op, name=name)
            self._reply(wire.PEER_NO_FILE)
            return
        try:
            fd, size = open_shared(self.server.share_dir, name)
        except NotShared:
            self._note("{op} {name!r} not shared", op=op, name=name)
            self._reply(wire.PEER_NO_FILE)
            return
        except OSError as exc:
            self._note("{op} {name!r}: {exc}", op=op, name=name, exc=exc)
            self._reply(wire.PEER_ERROR)
            return
        current = self._current(name, fd)
        if current is not True:
            os.close(fd)
            if current is None:
                self._reply(wire.PEER_ERROR)
                return
            self._note("{op} {name!r} changed since it was published", op=op, name=name)
            self._reply(wire.PEER_NO_FILE)
            return
        if op == wire.PIECES:
            self._pieces(fd, size, name)
            return
        header = wire.encode_code(wire.PEER_OK)
        offset, end = 0, size
        if op != wire.GET_FILE:
            offset, end = _range(args[1:], size)
            if offset < 0:
                os.close(fd)
                self._note("{op} {name!r}: bad offset or range", op=op, name=name)
                self._reply(wire.PEER_BAD_OFFSET)
                return
            header += wire.encode_field(size)
        self._send(fd, offset, end, header, name, size)

    def _pieces(self, fd: int, size: int, name: str) -> None:
        """PIECES: the digests from the server's :class:`PieceSource`, then close."""
        source = self.server.pieces
        if source is None:
            os.close(fd)
            self._reply(wire.PEER_NO_FILE)
            return
        self.setTimeout(self.server.idle_timeout)  # computing may take a while: not forever

        def answer(digests: bytes) -> None:
            if len(digests) != wire.PIECE_DIGEST * wire.piece_count(size):
                raise ValueError(f"{len(digests)} bytes of digests for {size} bytes")
            self._count(wire.PEER_OK)
            self.setTimeout(None)
            self.transport.write(
                wire.encode_code(wire.PEER_OK)
                + wire.encode_fields(size, wire.piece_size(size))
                + digests
            )
            self.transport.loseConnection()
            self._note("sent the pieces of {name!r}", name=name)

        def refuse(failure: Failure) -> None:
            if failure.check(NoPieces):
                self._note("PIECES {name!r}: published without a hash", name=name)
                self._reply(wire.PEER_NO_FILE)
            else:
                self.log.failure("the pieces of {name!r}", failure, name=name)
                self._reply(wire.PEER_ERROR)

        def closed(result):
            os.close(fd)
            return result

        d = defer.maybeDeferred(source.pieces, name, fd, size).addBoth(closed)
        d.addCallbacks(answer, refuse).addErrback(refuse)
        d.addErrback(lambda f: self.log.failure("answering PIECES", f))

    def _current(self, name: str, fd: int) -> bool | None:
        """Whether the open file is still what was published (True without a check);
        None if the check failed."""
        check = self.server.is_current
        if check is None:
            return True
        try:
            return bool(check(name, os.fstat(fd)))
        except Exception:
            self.log.failure("is_current({name!r}) raised", name=name)
            return None

    # --- transfer ----------------------------------------------------------

    def _send(self, fd: int, offset: int, end: int, header: bytes, name: str, size: int) -> None:
        """Send ``header`` then bytes ``[offset, end)`` of the file (``size`` bytes in all)."""
        self._count(wire.PEER_OK)
        self.server.uploading += 1
        if end == size:
            self._tell("started", name, size, offset)
        else:
            self._tell("started", name, size, offset, end)
        self.setTimeout(self.server.idle_timeout)
        self.producer = make_producer(
            self.transport,
            fd,
            offset,
            end,
            header,
            on_progress=lambda _count: self.resetTimeout(),
            use_sendfile=self.server.use_sendfile,
            bucket=self.server.bucket,
            clock=self.server.reactor,
        )

        def finished(result):
            os.close(fd)
            self.setTimeout(None)
            self.transport.unregisterProducer()
            self.server.uploading -= 1
            complete = not isinstance(result, Failure)
            seconds = self.server.reactor.seconds() - self._since
            self._tell("ended", name, self.producer.sent, complete, seconds)
            metrics = self.server.metrics
            if metrics is not None:
                metrics.uploaded(complete, self.producer.sent, seconds)
            if isinstance(result, Failure):
                self._note(
                    "{name!r} cut: {why}",
                    name=name,
                    why=repr(result.value),
                )
                self.transport.abortConnection()
            else:
                self._note("sent {name!r} ({n} bytes)", name=name, n=result)
                self.transport.loseConnection()

        self.producer.start().addBoth(finished)


def _range(args: list[bytes], size: int) -> tuple[int, int]:
    """``(offset, end)`` a FETCH (offset) or RANGE (offset, length) asks of a file of
    ``size`` bytes; ``(-1, -1)`` when it is not a range of it (reply 3)."""
    try:
        numbers = [wire.decode_field(raw, wire.FieldKind.OFFSET) for raw in args]
    except wire.BadField:
        return -1, -1
    offset = numbers[0]
    end = offset + numbers[1] if len(numbers) > 1 else size
    if len(numbers) > 1 and numbers[1] == 0:
        return -1, -1
    if not offset <= end <= size:
        return -1, -1
    return offset, end


class _Factory(ConnectionCap, protocol.Factory):
    def __init__(self, server: PeerServer) -> None:
        self.server = server

    @property
    def max_connections(self) -> int:
        return self.server.max_connections

    @property
    def max_per_source(self) -> int:
        return self.server.max_per_source

    def buildProtocol(self, addr) -> PeerRequestProtocol | None:
        if not self.admit(addr):
            return None
        request = PeerRequestProtocol(self.server)
        request.source_addr = addr  # whom the cap counts it against, until connectionLost
        self.server._connections.add(request)  # from now on, until connectionLost
        return request


class _Sniffing(tls.SniffingFactory):
    """TLS or plaintext by the first byte; each request learns the connection it waits
    behind, so that :meth:`PeerServer.stop` can drop it before its first byte too."""

    def buildProtocol(self, addr) -> protocol.Protocol | None:
        sniffer = super().buildProtocol(addr)
        if sniffer is not None:
            sniffer.inner.outer = sniffer
        return sniffer


class UploadWatcher(Protocol):
    """Told of each transfer of the peer server (``who``: the downloader's address).

    ``started`` gets ``end`` only for a RANGE that stops before the end of the file.
    """

    def started(self, who: str, name: str, size: int, offset: int, end: int = ...) -> None: ...

    def ended(self, who: str, name: str, sent: int, complete: bool, seconds: float) -> None: ...


class PeerServer:
    """Serves the published files of one user from ``share_dir`` to other peers.

    With ``identity`` (the user's :class:`p2p.tls.Identity`) the port serves
    TLS as that user beside classic plaintext; without it, plaintext only.
    ``is_current(name, stat_result)``: False refuses a published file that
    changed since it was published (answered 1). ``pieces`` answers PIECES
    (None: every PIECES is answered 1). ``max_upload_rate``: bytes per second
    all transfers together may send (None: no cap; with one, no ``sendfile``).
    """

    def __init__(
        self,
        share_dir: Path,
        is_published: Callable[[str], bool],
        reactor=None,
        *,
        request_timeout: float = wire.DEFAULT_TIMEOUT,
        request_deadline: float = DEFAULT_REQUEST_DEADLINE,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_connections: int = wire.DEFAULT_MAX_CONNECTIONS,
        max_per_source: int = DEFAULT_MAX_PER_SOURCE,
        use_sendfile: bool = True,
        identity: tls.Identity | None = None,
        is_current: Callable[[str, os.stat_result], bool] | None = None,
        metrics: PeerMetrics | None = None,
        max_uploads: int | None = None,
        uploads: UploadWatcher | None = None,
        pieces: PieceSource | None = None,
        max_upload_rate: int | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.share_dir = Path(share_dir)
        #: Where requests and uploads are counted (None: not counted).
        self.metrics = metrics
        self.is_published = is_published
        #: Whether an open published file is still what was published (None: not checked).
        self.is_current = is_current
        self.reactor = reactor
        self.request_timeout = request_timeout
        self.request_deadline = request_deadline
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        #: Connections one address may hold open (``ConnectionCap``).
        self.max_per_source = max_per_source
        self.use_sendfile = use_sendfile
        self.identity = identity
        #: At most this many transfers at once (None: no limit); beyond, requests get busy.
        self.max_uploads = max_uploads
        #: Told when each transfer starts and ends (None: nobody).
        self.uploads = uploads
        #: Transfers under way.
        self.uploading = 0
        #: Where PIECES gets the digests (None: answered 1).
        self.pieces = pieces
        #: The cap every transfer shares (None: as fast as the downloaders take).
        self.bucket = TokenBucket(max_upload_rate, reactor) if max_upload_rate else None
        #: Builds (and caps) the request protocols, plaintext or inside TLS.
        self.factory = _Factory(self)
        #: What the port listens with: ``factory`` itself, or TLS sniffing in front of it.
        self.listening_factory: protocol.Factory = (
            self.factory
            if identity is None
            else _Sniffing(
                self.factory, tls.server_options(identity), reactor, timeout=request_timeout
            )
        )
        if metrics is not None:
            metrics.watch(lambda: self.factory.open_connections)
        self._port = None
        self._connections: set[PeerRequestProtocol] = set()
        self._lost_waiters: list[Callable[[], None]] = []

    @property
    def connections(self) -> frozenset[PeerRequestProtocol]:
        """The connections open right now (for tests and diagnostics)."""
        return frozenset(self._connections)

    def listen(self, endpoint: str) -> Deferred[int]:
        """Listen on a server endpoint string (``tcp:0:interface=0.0.0.0``); fires with the port."""

        def listening(port):
            self._port = port
            return getattr(port.getHost(), "port", 0)

        return defer.maybeDeferred(
            listen, self.reactor, endpoint, self.listening_factory
        ).addCallback(listening)

    def stop(self) -> Deferred[None]:
        """Stop listening and drop every open transfer; fires when all are closed."""
        port, self._port = self._port, None
        stopped = (
            defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        )
        for conn in list(self._connections):
            conn.abort()
        return stopped.addCallback(lambda _: self._all_closed())

    def _all_closed(self) -> Deferred[None]:
        if not self._connections:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()

        def check():
            if self._connections:
                self._lost_waiters.append(check)
            elif not d.called:
                d.callback(None)

        self._lost_waiters.append(check)
        return d
