"""The indexer's wire side: one request per TCP connection (protocol.md section 1), or
any number, one after another, on a TLS connection (the TLS extension).

:class:`IndexerProtocol` reads ``OP``, ``DATETIME``, ``USER`` and the
operation's arguments as NUL-terminated fields, checking each against its limit
as soon as it arrives: an oversized, empty or non-UTF-8 field gets the
operation's "any other error" code at once and the connection is closed; an
unknown ``OP`` is closed without a reply byte. A complete request goes to the
:class:`IndexerFactory`, which applies it to the directory and queues its reply.

Group commit: the factory collects the replies of one reactor turn, commits
their changes in one SQLite transaction, and only then writes the reply bytes,
so every acknowledged change is durable. The operator lines of the turn are
written in one go as well.

Liveness (protocol.md section 7): with a :class:`p2p.indexer.liveness.Liveness`
in ``factory.liveness``, a CONNECT for a user recorded as connected waits for a
probe of the address recorded; a dead peer's entry is replaced and the CONNECT
answered 0. A user whose client is gone is dropped through
:meth:`IndexerFactory.expire`, committed with the turn like any change.

Over TLS (:func:`p2p.tls.is_tls`; the service's :class:`p2p.tls.SniffingFactory`
routes each connection) the connection stays open after a reply: the protocol
stops reading while a request waits for its reply, hands the reply to the
transport as its producer (a chunk at a time, no further while the transport's
buffer is full), then reads the next request. Between requests the connection
may stay silent for ``wire.TLS_IDLE_TIMEOUT``; within one, the usual timeout
applies. Each request comes with the connection's identity, the fingerprint of
its client certificate (:func:`p2p.tls.peer_fingerprint`).
"""

from __future__ import annotations

import re
import sqlite3

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IPullProducer,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import twisted_internals, wire
from p2p.console import say
from p2p.indexer.address import AddressPolicy
from p2p.indexer.directory import Directory
from p2p.indexer.liveness import Liveness
from p2p.indexer.metrics import IndexerMetrics
from p2p.indexer.store import Store
from p2p.keepalive import keep_alive
from p2p.listening import ConnectionCap
from p2p.tls import is_tls, peer_fingerprint

_K = wire.FieldKind
_CODES = [bytes((code,)) for code in range(256)]
_OK = _CODES[wire.OK]
#: The part of a large reply handed to the transport at a time (see :class:`_Rest`).
REPLY_CHUNK = 64 * 1024

# Fast acceptance of the common, plain-ASCII fields. Each pattern accepts only
# a subset of what ``wire.decode_field`` accepts for that kind; anything else
# takes the full check there.
_PRINTABLE_ASCII_NAME = re.compile(b"[!-~]{1,%d}" % wire.MAX_NAME).fullmatch
_FAST = {
    _K.USER: _PRINTABLE_ASCII_NAME,  # printable ASCII is NFC and holds no format character
    _K.NAME: _PRINTABLE_ASCII_NAME,
    _K.FILE: re.compile(b"[ -~]{1,%d}" % wire.MAX_NAME).fullmatch,  # spaces allowed
    _K.TEXT: re.compile(b"[\t -~]{1,%d}" % wire.LIMITS[_K.TEXT]).fullmatch,
    _K.DATETIME: re.compile(b"[ -~]{1,%d}" % wire.LIMITS[_K.DATETIME]).fullmatch,
}


class _Field:
    """How to read one field of a request: its kind, its limit, its fast check."""

    __slots__ = ("fast", "kind", "limit")

    def __init__(self, kind: wire.FieldKind) -> None:
        self.kind = kind
        self.limit = wire.LIMITS[kind]
        self.fast = _FAST.get(kind)

    def decode(self, raw: bytes) -> str | int:
        fast = self.fast
        if fast is not None and fast(raw) is not None:
            return raw.decode("ascii")
        return wire.decode_field(raw, self.kind)


#: For each OP (as bytes): its spec and the fields after OP, worked out once.
_PLANS: dict[bytes, tuple[wire.OpSpec, tuple[_Field, ...]]] = {
    raw: (op, tuple(_Field(kind) for kind in op.fields)) for raw, op in wire.OPS_BY_BYTES.items()
}


@implementer(IPushProducer)  # of its replies, over TLS
class IndexerProtocol(Protocol, TimeoutMixin):
    """Reads one request, hands it to the factory, and writes the reply it is given.

    Over TLS it then reads the next request, and so on (see the module's doc).
    """

    #: Over TLS: serve requests one after another instead of closing after one.
    keep_open = False
    _identity: str | None = None
    _idle = False  # between requests on a kept connection: the idle timeout runs
    _pending = b""  # bytes after a request that waits for its reply (kept connection)
    _out: memoryview | None = None  # the reply not yet handed to the transport (kept)
    _head: bytes = b""  # the reply code, written with the first piece of ``_out``
    _paused = False  # the transport's buffer is full: hand it no more (kept)
    held: frozenset[str] | set[str] = frozenset()  # users whose lease this connection holds
    lost = False  # the connection is closed
    _close_when_answered = False  # close once the request under way is answered
    began = 0.0  # when the first byte of the request under way arrived (0: none yet)

    def __init__(self, factory: IndexerFactory, addr: object = None) -> None:
        self.factory = factory
        self.addr = addr  # whom the factory's cap counts this connection against
        self.callLater = factory.reactor.callLater  # TimeoutMixin's clock
        #: When the connection was accepted (built then; started at its first byte).
        self._accepted = factory.reactor.seconds()
        self._buffer = b""  # the start of a field whose NUL has not arrived
        self._limit = wire.MAX_OP  # the limit of that field
        self._op: wire.OpSpec | None = None
        self._fields: tuple[_Field, ...] = ()
        self._values: list = []
        self._done = False  # the request is complete or refused: read nothing more

    # --- Connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        if is_tls(self.transport):
            self.keep_open = True
            self.transport.registerProducer(self, True)
            # TLS 1.3 sends its session tickets apart from the first reply: without
            # this, Nagle holds that reply until the client's delayed ACK (40 ms).
            set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
        # The first request (and the TLS handshake) has the usual time since the accept.
        waited = self.factory.reactor.seconds() - self._accepted
        self.setTimeout(max(self.factory.timeout - waited, 0.0))
        # The request has usually arrived already: read it now if we may.
        twisted_internals.read_now(self.transport)

    def connectionLost(self, reason=None) -> None:
        self._done = True
        self.setTimeout(None)
        self.factory.connection_closed(self.addr)
        self.lost = True
        for user in self.held:
            self.factory.directory.leases.release(user, self)

    def lease_ended(self, user: str) -> None:
        """``user``'s lease this connection held ended by a request on another
        connection (a DISCONNECT, a new CONNECT): close, so the client learns it now
        (section 7.3); after the reply of a request under way, if any."""
        if user not in self.held:
            return
        self.held.discard(user)
        if self.held or self.lost:
            return
        if self._idle:
            self._close_kept(None)
        else:
            self._close_when_answered = True

    def hold(self, user: str, lease: float) -> None:
        """This connection now holds ``user``'s lease (HOLD): it is not closed for being
        idle, and TCP keepalive (tuned to the lease) tells when the host is gone."""
        if not self.held:
            self.held = set()
            keep_alive(self.transport, lease)
        self.held.add(user)

    def timeoutConnection(self) -> None:
        """Silent for too long (mid-request, or not reading its reply): cut it.

        Idle between requests on a kept connection is no fault: it is closed cleanly.
        """
        self._done = True
        if self._idle:
            self._close_kept(None)
            return
        self.transport.abortConnection()

    @property
    def identity(self) -> str | None:
        """The fingerprint of the connection's client certificate (None: plaintext, or none).

        Asked when a request is complete: by then the TLS handshake is over.
        """
        if self.keep_open and self._identity is None:
            self._identity = peer_fingerprint(self.transport)
        return self._identity

    # --- Reading -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split off NUL-terminated fields, each checked against its own limit.

        ``find`` never looks further than the current field's limit, so a huge
        chunk without NUL costs no more than a short one, and the kept tail is
        never longer than the longest field.
        """
        if self._done:
            if self.keep_open:  # the next request, already: read after this reply
                self._pending += data
            return
        if self._idle:  # a new request starts: it has the usual time
            self._idle = False
            self.setTimeout(self.factory.timeout)
        if not self.began:
            self.began = self.factory.reactor.seconds()
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        start = 0
        find = data.find
        while True:
            end = find(b"\0", start, start + self._limit + 1)
            if end < 0:
                if len(data) - start > self._limit:
                    self._refuse()
                else:
                    self._buffer = data[start:]
                return
            if self._take(data[start:end]):
                if self.keep_open:
                    self._pending = data[end + 1 :]
                return
            start = end + 1

    def _take(self, raw: bytes) -> bool:
        """Accept one complete field; True once the request is finished either way."""
        op = self._op
        if op is None:
            plan = _PLANS.get(raw)
            if plan is None:
                self._refuse()
                return True
            self._op, self._fields = plan
            self._limit = self._fields[0].limit
            return False
        values = self._values
        fields = self._fields
        try:
            values.append(fields[len(values)].decode(raw))
        except wire.BadField:
            self._refuse()
            return True
        count = len(values)
        if count == 2 and op.name not in wire.UNAUDITED_OPS:  # DATETIME and USER: the
            # operator line (not for the heartbeat: 10,000 users would print 500 lines a second)
            self.factory.note(f"s> {op.name} FROM {values[1]}")
        if count == len(fields):
            self._done = True
            # Read nothing before this one's reply: on a kept connection, no next request;
            # on a classic one, a client that half-closed after its request must not lose
            # its reply (an EOF read now would end the connection before a reply that
            # comes after a database round trip, as on PostgreSQL).
            self.transport.pauseProducing()
            self.factory.submit(self, op, values)
            return True
        self._limit = fields[count].limit
        return False

    def _refuse(self) -> None:
        """Bad input: the operation's error code (none for an unknown OP), then close.

        After a code the connection is half-closed (the code, then our FIN) and
        what the sender still sends is read and dropped for ``wire.REFUSAL_DRAIN``
        seconds, then the connection is cut: closing on unread bytes would reset
        it, and a reset can destroy the code before the sender reads it.
        """
        self._done = True
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.refused(self)
        if self.keep_open:
            self._close_kept(None if self._op is None else _CODES[self._op.error])
            return
        if self._op is None:
            self.transport.loseConnection()
            return
        self.transport.write(_CODES[self._op.error])
        if IHalfCloseableDescriptor.providedBy(self.transport):
            self.transport.loseWriteConnection()
            self.setTimeout(wire.REFUSAL_DRAIN)
        else:
            self.transport.loseConnection()

    # --- Replying ------------------------------------------------------------

    def reply(self, code: bytes, body: bytes = b"") -> None:
        """Send the reply (the code, and the listing after 0) and close; the timeout still
        guards the write. On a kept (TLS) connection, read the next request instead.

        ``body`` is the directory's shared listing: a long one is never copied
        whole, only handed to the transport a chunk at a time (the code goes
        with the first), so a crowd of readers that never read costs one
        listing, not one each. A short reply goes out in one piece: the fast
        path (when allowed) sends it straight on the socket and closes at once.
        """
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.answered(self, code)
        transport = self.transport
        if transport is None or not transport.connected or transport.disconnecting:
            return
        if len(body) <= REPLY_CHUNK:
            code, body = code + body if body else code, b""
        if self.keep_open:
            self._head, self._out = (code, memoryview(body)) if body else (b"", memoryview(code))
            self._hand_over()
            return
        if body:
            _Rest(transport, body, head=code).start()
            return
        data = twisted_internals.send_last(transport, code)
        if data is None:
            return
        transport.write(bytes(data))
        transport.loseConnection()

    def reply_later(self, body: bytes, code: bytes) -> None:
        """:meth:`reply`, with the body first: the result of a Deferred listing."""
        self.reply(code, body)

    @property
    def op(self) -> wire.OpSpec | None:
        return self._op

    # --- A kept (TLS) connection ----------------------------------------------

    def _hand_over(self) -> None:
        """Write the reply a chunk at a time while the transport takes more; once all of
        it is written, read the next request.

        A listing is one shared bytes object: written whole, every connection
        would hold its own copy in its buffer (see :class:`_Rest`).
        """
        out = self._out
        while out and not self._paused:
            chunk, out = next_chunk(self._head, out)
            self._out, self._head = out, b""
            self.transport.write(chunk)
        if out is not None and not out and not self._paused:
            self._out = None
            self._next_request()

    def _next_request(self) -> None:
        """Start over for the next request, with what already came of it."""
        self._buffer = b""
        self._limit = wire.MAX_OP
        self._op = None
        self._fields = ()
        self._values = []
        self._done = False
        self._idle = True
        self.began = 0.0
        if self._close_when_answered:
            self._close_kept(None)
            return
        self.setTimeout(None if self.held else self.factory.idle_timeout)
        pending, self._pending = self._pending, b""
        self.transport.resumeProducing()
        if pending:
            self.dataReceived(pending)

    def _close_kept(self, last: bytes | None) -> None:
        """Write ``last`` (if any) and close the TLS connection (it waits for no producer)."""
        self._out = None
        self.transport.unregisterProducer()
        if last is not None:
            self.transport.write(last)
        self.transport.loseConnection()

    # IPushProducer: the transport's buffer is full, then empty again.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._out is not None:
            self._hand_over()

    def stopProducing(self) -> None:
        self._out = None


def _dropped(body: bytes | Deferred) -> bytes:
    """No body, for a reply that became its error code: a later listing is ignored."""
    if isinstance(body, Deferred):
        body.addErrback(lambda _: None)
    return b""


def next_chunk(head: bytes, rest: memoryview) -> tuple[bytes, memoryview]:
    """The next piece of a reply to write: ``head`` (the code, before the first piece) and
    as much of ``rest`` as fills one chunk; and what is left of ``rest``."""
    room = REPLY_CHUNK - len(head)
    return head + rest[:room], rest[room:]


@implementer(IPullProducer)
class _Rest:
    """The rest of a large reply, one chunk each time the transport has sent the last.

    A listing is one shared bytes object; writing all of it would give every
    connection its own copy in the transport's buffer, so a crowd of clients
    that ask for LIST_USERS and never read could hold the listing times the
    connection cap. This way each holds at most one chunk.
    """

    def __init__(self, transport, data: bytes | memoryview, head: bytes = b"") -> None:
        self.transport = transport
        self.data = memoryview(data)
        self.head = head  # the reply code, sent with the first chunk

    def start(self) -> None:
        # Read nothing more, as loseConnection would: an EOF from a client that
        # half-closed after its request must not end the reply early.
        self.transport.pauseProducing()
        self.transport.registerProducer(self, False)  # asks for the first chunk at once

    def resumeProducing(self) -> None:
        chunk, self.data = next_chunk(self.head, self.data)
        self.head = b""
        if chunk:
            self.transport.write(chunk)
        if not self.data:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        self.data = memoryview(b"")


class IndexerFactory(ConnectionCap, ServerFactory):
    """Shared state of all connections: the directory, the cap, the group commit."""

    noisy = False
    log = Logger()
    #: Counts requests by operation and code, and their latency (None: not counted).
    metrics: IndexerMetrics | None = None

    def __init__(
        self,
        directory: Directory,
        reactor: IReactorTime,
        timeout: float = wire.DEFAULT_TIMEOUT,
        max_connections: int = wire.DEFAULT_MAX_CONNECTIONS,
        policy: AddressPolicy | None = None,
        max_per_source: int | None = None,
    ) -> None:
        self.directory = directory
        self.store: Store = directory.store
        self.reactor = reactor
        self.timeout = timeout
        #: How long a kept (TLS) connection may stay silent between requests.
        self.idle_timeout = wire.TLS_IDLE_TIMEOUT
        self.max_connections = max_connections
        self.max_per_source = max_per_source  # None: sources are not counted apart
        self.policy = policy or AddressPolicy("127.0.0.1")
        #: This turn's replies: (protocol, code byte, shared listing or b"", or a Deferred
        #: of the listing: a SEARCH, replied to when its store's search process answers).
        self._replies: list[tuple[IndexerProtocol, bytes, bytes | Deferred]] = []
        self._lines: list[str] = []
        self._flush_call = None
        self.stopped = False
        #: Memory may not match the store (a reload after a failure failed too).
        self.stale = False
        #: Drops users whose client is gone (None: everyone stays until DISCONNECT).
        self.liveness: Liveness | None = None
        #: The connection whose request is being applied (see :meth:`_lease_ended`).
        self._asking: IndexerProtocol | None = None
        #: This turn's HOLDs answered 0, by connection (one request at a time each): the
        #: user and its lease's number, held when the answer is sent.
        self._holds: dict[IndexerProtocol, tuple[str, int | None]] = {}

    @property
    def directory(self) -> Directory:
        return self._directory

    @directory.setter
    def directory(self, directory: Directory) -> None:
        self._directory = directory
        directory.leases.on_end = self._lease_ended

    def _lease_ended(self, proto: IndexerProtocol, user: str) -> None:
        """A lease ``proto`` held ended by a request: unless that request came on
        ``proto`` itself, it closes so its client learns it (section 7.3)."""
        if proto is not self._asking:
            proto.lease_ended(user)
        else:
            proto.held.discard(user)

    # --- Connections ------------------------------------------------------------

    def buildProtocol(self, addr) -> IndexerProtocol | None:
        """A protocol, or None (the port closes the socket at once) beyond a cap."""
        return IndexerProtocol(self, addr) if self.admit(addr) else None

    # --- Requests -----------------------------------------------------------------

    def note(self, line: str) -> None:
        """Queue an operator line for the end of this reactor turn."""
        self._lines.append(line)
        self._flush_soon()

    def submit(self, proto: IndexerProtocol, op: wire.OpSpec, values: list) -> None:
        """Apply a complete, valid request; its reply goes out after the group commit.

        A CONNECT for a user recorded as connected first waits for a probe of
        the recorded address: a peer that does not answer is stale, and the
        CONNECT replaces it.
        """
        if op is wire.HOLD and not proto.keep_open:
            proto.reply(_CODES[op.error])  # only a kept connection can hold a lease
            return
        if op is wire.CONNECT and self.liveness is not None and not self.stopped:
            stale = self.directory.stale_address(values[1], proto.identity)
            if stale is not None:
                probe = self.liveness.probe(values[1])
                probe.addCallback(self._connect_probed, proto, values, stale)
                return
        self._apply(proto, op, values)

    def _connect_probed(
        self, answered: bool, proto: IndexerProtocol, values: list, stale: tuple[str, int]
    ) -> None:
        """The probe of a CONNECT's recorded address is over: apply the CONNECT."""
        self._apply(proto, wire.CONNECT, values, None if answered else stale)

    def expire(self, user: str) -> None:
        """Drop ``user``, whose client is gone: a DISCONNECT, committed with this turn."""
        if self.stopped or self.stale:
            return
        try:
            self.directory.expire(user, wire.format_datetime())
        except sqlite3.Error:
            self.log.failure("store write failed; {user} stays connected", user=user)
            self._recover()
            return
        self._flush_soon()

    def _apply(
        self,
        proto: IndexerProtocol,
        op: wire.OpSpec,
        values: list,
        stale: tuple[str, int] | None = None,
    ) -> None:
        """Apply a request to the directory and queue its reply for the group commit.

        ``stale``: the address a CONNECT found dead; forgotten first, if still recorded.
        """
        if self.stopped or (self.stale and not self._recover()):
            # The store is closed, or memory cannot be trusted: answer the error code.
            proto.reply(_CODES[op.error])
            return
        datetime, user, *args = values
        address = self.connect_address(proto, args[0]) if op is wire.CONNECT else None
        self._asking = proto  # whose request ends a lease it may hold: not closed for it
        try:
            if stale is not None:
                self.directory.forget_stale(user, stale)
            code, body = self.directory.handle(op, datetime, user, args, address, proto.identity)
        except sqlite3.Error:
            self.log.failure("store write failed; answering with the error code")
            self._recover()
            code, body = op.error, b""
        finally:
            self._asking = None
        if op is wire.HOLD and code == wire.OK:  # held once the turn's answers stand
            self._holds[proto] = (user, self.directory.leases.number.get(user))
        self._replies.append((proto, _CODES[code], body))
        self._flush_soon()

    def connect_address(self, proto: IndexerProtocol, port: int) -> tuple[str, int]:
        """The address a CONNECT on ``proto`` records: its source IP (as the policy
        records it) and the port it announced."""
        # A peer on a UNIX socket has no IP: it is on this host, like loopback.
        source = getattr(proto.transport.getPeer(), "host", None) or "127.0.0.1"
        return (self.policy.record_ip(source), port)

    def _flush_soon(self) -> None:
        """Commit and reply at the end of this reactor turn."""
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Print this turn's lines, commit its changes, then send its replies."""
        self._flush_call = None
        lines, self._lines = self._lines, []
        replies, self._replies = self._replies, []
        if lines:
            say("\n".join(lines))
        if self.store.in_transaction:
            changes = self.store.changes
            try:
                self.store.commit()
            except sqlite3.Error:
                self.log.failure("commit failed; the turn's requests get their error code")
                self._recover()
                # A turn of reads only (their audit records, the search index's upkeep)
                # changed nothing: their answers stand, their records are held.
                replies = [
                    (p, code, body)
                    if not changes and p.op.name in wire.READ_OPS
                    else (p, _CODES[p.op.error], _dropped(body))
                    for p, code, body in replies
                ]
        holds, self._holds = self._holds, {}
        leases = self.directory.leases
        for proto, code, body in replies:
            if code == _OK and proto.op is wire.HOLD and not proto.lost:
                user, number = holds.get(proto, (None, None))
                if user is not None:
                    proto.hold(user, leases.timeout)
                    if number is not None and leases.number.get(user) == number:
                        leases.hold(user, proto)  # still the lease it was given
                    else:  # ended later in this turn by another connection's DISCONNECT
                        proto.lease_ended(user)  # (and a new CONNECT): 7.3's close
            if isinstance(body, Deferred):  # a SEARCH its store answers later
                body.addCallbacks(proto.reply_later, self._answer_failed, (code,), None, (proto,))
            else:
                proto.reply(code, body)

    def _answer_failed(self, failure: Failure, proto: IndexerProtocol) -> None:
        """A reply the store was to give later could not be given: the error code.

        (A database error is the store's, which says so once: a full disk, say.)
        """
        if failure.check(sqlite3.Error):
            self.log.debug("answering {op} failed: {error}", op=proto.op.name, error=failure.value)
        else:
            self.log.failure("answering {op} failed", failure, op=proto.op.name)
        proto.reply(_CODES[proto.op.error])

    def stop(self) -> None:
        """Commit and answer what is pending; later requests get their error code."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self.flush()
        self.stopped = True

    def _recover(self) -> bool:
        """Drop the open transaction and make memory match the store again.

        Every reply of this turn becomes its error code first: their changes
        were rolled back. If the store cannot even be read, memory is marked
        stale and every request is refused until a later reload succeeds, so a
        rolled-back change is never visible nor acknowledged.
        """
        self._replies = [(p, _CODES[p.op.error], _dropped(b)) for p, _, b in self._replies]
        try:
            self.store.rollback()
            self.directory.load()
        except sqlite3.Error:
            if not self.stale:  # once, not once per refused request
                self.log.failure("cannot reload the directory; refusing requests until it can")
            self.stale = True
            return False
        self.stale = False
        return True
