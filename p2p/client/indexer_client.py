"""Client of the indexer: TLS by default, the classic protocol when that is all it speaks.

``IndexerClient.request(op, user, *args)`` stamps the request with the time
service's DATETIME, sends it, reads the code (and, after code 0 of a listing
operation, the listing) and fires with ``(code, rows_or_None)``. Anything else
(refused, timed out, reply cut short, malformed reply, a changed indexer key)
is a failure: the shell prints the command's plain FAIL line.

Over TLS (protocol.md, "Extension: TLS, claimed names, LIST_PEERS") the client
holds one connection per identity: requests naming a user whose identity is
kept in the :class:`~p2p.client.home.Home` go on a connection that presented
it, the others on an anonymous one. Each connection carries one request at a
time (later ones wait their turn) and is closed after ``wire.CLIENT_IDLE``
seconds without one, before the indexer would close it. The indexer's key is
pinned in ``known_indexers`` on first use and must match ever after.

An indexer that closes, resets or ignores the TLS handshake is a *classic*
indexer: the client says once on stderr that names are not protected there and
speaks the classic protocol to it for the rest of the session, one request per
connection (protocol.md section 1). It never does so with an indexer whose key
is pinned: that one spoke TLS before, and plaintext now would be a downgrade.

Several nodes of one directory may be given (``-s host1:9090,host2:9090``,
:mod:`p2p.client.nodes`). A node that does not answer (connection refused, timed
out, reset before a reply; the kept connection holding the lease lost) is left
for the next one in the list. A request is sent again to the next node only when
that cannot do it twice: when it never went out (the connection or the handshake
failed), or when it changes nothing (``wire.READ_OPS``: listings, ALIVE, HOLD).
A change whose reply was lost after it went out fails (the shell prints its FAIL
line and says the outcome is unknown): a REGISTER sent again could come back 1,
"user already exists", for the user's own new name. Once another node answers,
the connections to the node left are closed, so a held lease is held again there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import tls, wire
from p2p.client.home import Home
from p2p.client.nodes import Node, Nodes
from p2p.client.time_client import advanced
from p2p.keepalive import keep_alive

#: Fields per row of the listings that follow code 0.
LISTING_COLUMNS: dict[str, int] = {
    "LIST_USERS": 3,
    "LIST_CONTENT": 2,
    "LIST_PEERS": 4,
    "LIST_FILES": 4,
    "SEARCH": 6,
    "SOURCES": 4,
}
#: Replies with a fixed number of fields (no count) after code 0: the lease in seconds.
FIXED_FIELDS: dict[str, int] = {"ALIVE": 1, "HOLD": 1}
#: Operations stamped without asking the time service: a heartbeat comes every few
#: seconds, so it gets the last stamp advanced by the time elapsed since (``time_client.advanced``).
ESTIMATED_STAMP_OPS = frozenset({"ALIVE", "HOLD"})

Row = tuple[str, ...]
Reply = tuple[int, list[Row] | None]

#: ``identity=`` default of :meth:`IndexerClient.request`: the one kept for the request's user.
KEPT = object()


class IndexerError(Exception):
    """The indexer could not be asked or did not answer properly."""


class ReplyCut(IndexerError):
    """The connection closed before the whole reply arrived."""


class BadReply(IndexerError):
    """The reply broke the protocol (a count that is not a number, a field too long)."""


class UnknownOperation(IndexerError):
    """The indexer closed without a reply byte to an extension operation: it does not know it."""


class IndexerKeyChanged(IndexerError):
    """The indexer's key is not the one pinned for it: an impostor, or a new key."""


class _Unanswered(ReplyCut):
    """The connection closed before the first reply byte."""

    def __init__(self) -> None:
        super().__init__("the indexer closed the connection without replying")


class _NotTLS(Exception):
    """The TLS handshake did not complete (closed, reset or timed out): a classic indexer?"""


class _NotReached(IndexerError):
    """A node could not be reached, or did not complete its handshake: nothing was sent."""


#: A connection that could not be made: nothing was sent (DNS is an OSError of its own).
_CONNECT_FAILURES = (error.ConnectError, error.DNSLookupError, error.ConnectingCancelledError)


def reply_shape(op: str) -> tuple[int | None, int | None]:
    """``(columns, count)`` of what follows code 0 of ``op``: a listing's columns and no
    count (it comes first on the wire), one row of fixed fields, or ``(None, None)``."""
    fixed = FIXED_FIELDS.get(op)
    if fixed is not None:
        return fixed, 1
    return LISTING_COLUMNS.get(op), None


class _ReplyParser:
    """Reads one reply: a code, then after code 0 of a listing the count and the rows
    (``count`` given: that many rows follow without a count, as ALIVE's one field).

    ``extra`` tells whether bytes came after the reply (a persistent
    connection cannot be trusted after that).
    """

    def __init__(self, columns: int | None, count: int | None = None) -> None:
        self.columns = columns
        self.code: int | None = None
        self.count: int | None = count
        self.fields: list[bytes] = []
        self.reader = wire.FieldReader(wire.MAX_FIELD)
        self.extra = False

    def feed(self, data: bytes) -> Reply | None:
        """The reply once complete, else None; BadReply if it breaks the protocol."""
        try:
            return self._consume(data)
        except (wire.FieldTooLong, ValueError) as exc:
            raise BadReply(str(exc)) from exc

    def _consume(self, data: bytes) -> Reply | None:
        if self.code is None:
            self.code, data = data[0], data[1:]
            if self.code != wire.OK or self.columns is None:
                self.extra = bool(data)
                return self.code, None
        self.fields.extend(self.reader.feed(data))
        if self.count is None and self.fields:
            raw = self.fields.pop(0)
            if not wire.is_decimal(raw):
                raise ValueError(f"listing count is not a number: {raw[:20]!r}")
            self.count = int(raw)
        wanted = None if self.count is None else self.count * self.columns
        if wanted is None or len(self.fields) < wanted:
            return None
        self.extra = len(self.fields) > wanted or bool(self.reader.take_rest())
        texts = [f.decode("utf-8", "replace") for f in self.fields[:wanted]]
        step = self.columns
        return self.code, [tuple(texts[i : i + step]) for i in range(0, wanted, step)]


class _RequestProtocol(protocol.Protocol):
    """Classic: sends one request, parses its reply, closes; fires ``finished`` once."""

    def __init__(self, request: bytes, columns: int | None, count: int | None = None) -> None:
        self.request = request
        self.parser = _ReplyParser(columns, count)
        self.finished: Deferred = Deferred(self._cancel)

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        try:
            reply = self.parser.feed(data)
        except BadReply:
            self._done(Failure())
            return
        if reply is not None:
            self._done(reply)

    def _done(self, result: Reply | Failure) -> None:
        if not self.finished.called:
            if isinstance(result, Failure):
                self.finished.errback(result)
            else:
                self.finished.callback(result)
        self.transport.loseConnection()

    def _cancel(self, _d: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.finished.called:
            unanswered = self.parser.code is None
            self.finished.errback(_Unanswered() if unanswered else _cut())


def _cut() -> ReplyCut:
    return ReplyCut("the indexer closed the connection before replying")


@implementer(IHandshakeListener)
class _Channel(protocol.Protocol):
    """One TLS connection to the indexer, carrying requests one at a time.

    ``ready`` fires with the channel when the handshake completes, or fails
    with :class:`_NotTLS` (or the fingerprint mismatch) if it does not.
    """

    def __init__(
        self, options: tls.ClientOptions, reactor, idle: float, node: Node | None = None
    ) -> None:
        self.options = options
        self.reactor = reactor
        self.idle = idle
        #: The indexer node this connection goes to.
        self.node = node
        self.ready: Deferred = Deferred()
        self.alive = False
        self.ended = False
        #: The client uses another node now: closed once the reply under way is in.
        self.moving = False
        self._pending: tuple[_ReplyParser, Deferred] | None = None
        self._idle_call = None
        self._closing: list[Deferred] = []
        #: While the indexer holds a lease on this connection (HOLD): called if it is lost.
        self.on_lost: Callable[[], None] | None = None

    def handshakeCompleted(self) -> None:
        self.alive = True
        self._rest()
        self.ready.callback(self)

    def ask(
        self, payload: bytes, columns: int | None, timeout: float, count: int | None = None
    ) -> Deferred:
        """Send one request; fires with its reply (``_Unanswered`` if closed before it)."""
        self._stop_idle()
        d: Deferred = Deferred(self._cancel)
        self._pending = (_ReplyParser(columns, count), d)
        self.transport.write(payload)
        return d.addTimeout(timeout, self.reactor)

    def _cancel(self, _d: Deferred) -> None:
        self._pending = None
        self.alive = False
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._pending is None:  # nothing was asked: not our protocol
            self.alive = False
            self.transport.abortConnection()
            return
        parser, d = self._pending
        try:
            reply = parser.feed(data)
        except BadReply:
            self._cancel(d)
            d.errback()
            return
        if reply is not None:
            self._pending = None
            if parser.extra:  # more than the reply: this connection cannot be trusted
                self._cancel(d)
            elif self.moving:
                self.transport.loseConnection()
            else:
                self._rest()
            d.callback(reply)

    def _rest(self) -> None:
        if self.on_lost is None:  # a held connection is never closed for being idle
            self._idle_call = self.reactor.callLater(self.idle, self.close)

    def hold(self, on_lost: Callable[[], None], lease: float) -> None:
        """The indexer holds a lease on this connection: keep it open (TCP keepalive
        tuned to ``lease`` notices a dead path) and call ``on_lost`` if it closes."""
        self.on_lost = on_lost
        self._stop_idle()
        keep_alive(self.transport, lease)

    def move_off(self) -> None:
        """The client uses another node now: close this connection, once the reply under
        way (if any) is in. A held lease is not closed on purpose: ``on_lost`` runs, and
        the lease is held again on the node the client uses."""
        self.moving = True
        self.alive = False
        self._stop_idle()
        if self._pending is None and self.transport is not None:
            self.transport.loseConnection()

    def unhold(self) -> None:
        """Nothing is held any more: an idle connection closes again after ``idle``."""
        self.on_lost = None
        if self.alive and self._pending is None and self._idle_call is None:
            self._rest()

    def _stop_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def close(self) -> Deferred:
        """Close the connection; fires when it is closed."""
        self.on_lost = None  # closed on purpose: nothing is lost
        self._stop_idle()
        self.alive = False
        if self.ended:
            return defer.succeed(None)
        d: Deferred = Deferred()
        self._closing.append(d)
        if self.transport is not None:
            self.transport.loseConnection()
        return d

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.alive = False
        self.ended = True
        self._stop_idle()
        if not self.ready.called:
            self.ready.errback(self.options.mismatch or _NotTLS(reason.getErrorMessage()))
        if self._pending is not None:
            parser, d = self._pending
            self._pending = None
            d.errback(_Unanswered() if parser.code is None else _cut())
        closing, self._closing = self._closing, []
        for d in closing:
            d.callback(None)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            self.reactor.callLater(0, on_lost)


class IndexerClient:
    """Asks one indexer, or the first answering node of several (see the module docstring).

    ``timestamp`` returns a Deferred DATETIME string (the time service's
    answer); ``timeout`` bounds connecting and the wait for each reply.
    ``home`` holds the users' identities and the pinned indexer keys (None:
    no identities, and any key is accepted unless ``fingerprint`` is given);
    ``fingerprint`` pins the indexer's key explicitly (``--indexer-fingerprint``,
    every node's). ``note`` writes a line for the user (stderr). ``use_tls=False``
    speaks only the classic protocol. ``more_nodes`` are the other nodes of the
    same directory after ``host:port``, tried in order when one does not answer.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timestamp: Callable[[], Deferred],
        reactor=None,
        timeout: float = wire.DEFAULT_TIMEOUT,
        *,
        home: Home | None = None,
        fingerprint: str | None = None,
        note: Callable[[str], None] | None = None,
        use_tls: bool = True,
        idle: float = wire.CLIENT_IDLE,
        more_nodes: Sequence[Node] = (),
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.timestamp = timestamp
        self.reactor = reactor
        self.timeout = timeout
        self.home = home
        self.fingerprint = fingerprint
        self.note = note or (lambda _text: None)
        self.idle = idle
        #: The nodes, the one asked first, the note when the client switches.
        self.nodes = Nodes([Node(host, port), *more_nodes], lambda text: self.note(text))
        #: True once the indexer is known to speak only the classic protocol.
        self.classic = not use_tls
        #: Extension operations the indexer closed on unanswered: not asked again.
        self.unknown_ops: set[str] = set()
        #: The last DATETIME from ``timestamp`` and the reactor time it came at.
        self._stamped: tuple[str, float] | None = None
        self._channels: dict[str | None, _Channel] = {}
        self._locks: dict[str | None, DeferredLock] = {}

    @property
    def host(self) -> str:
        return self.nodes.current.host

    @property
    def port(self) -> int:
        return self.nodes.current.port

    @property
    def where(self) -> str:
        return str(self.nodes.current)

    @defer.inlineCallbacks
    def request(self, op: str, user: str, *args: str | int, identity=KEPT):
        """Send ``op`` for ``user``; fires with ``(code, rows or None)``.

        Over TLS the connection presents ``identity``: by default the one kept
        in the home for ``user`` (None: anonymous).
        """
        if op not in wire.OPS:
            raise ValueError(f"unknown indexer operation {op!r}")
        if op in self.unknown_ops:
            raise UnknownOperation(f"the indexer at {self.where} does not know {op}")
        if identity is KEPT:
            identity = self._identity_of(user)
        if op in ESTIMATED_STAMP_OPS:
            datetime = self.estimated_datetime()
        else:
            datetime = yield self.timestamp()
            self._stamped = (datetime, self.reactor.seconds())
        payload = wire.encode_request(op, datetime, user, *args)
        shape = reply_shape(op)
        if not self.classic:
            try:
                result = yield self._over_tls(identity, payload, shape)
            except _NotTLS:
                pass  # a classic indexer: self.classic is now True
            else:
                return result
        result = yield self._classic(payload, shape)
        return result

    @defer.inlineCallbacks
    def hold(self, user: str, on_lost: Callable[[], None]):
        """Ask the indexer to hold ``user``'s lease on the kept connection (HOLD, protocol.md
        7.3); fires with the reply. After code 0 that connection stays open and
        ``on_lost`` is called (once) when it closes other than by :meth:`close` or
        :meth:`unhold`: lost (its node is then left for the next) or closed because
        the client moved to another node. Over the classic protocol the indexer answers 3."""
        code, rows = yield self.request(wire.HOLD.name, user)
        if code == wire.OK:
            channel = self._channels.get(self._key_of(user))
            if channel is None or not channel.alive:
                self.reactor.callLater(0, on_lost)
            else:
                lease = lease_seconds(rows) or wire.DEFAULT_PEER_TIMEOUT
                channel.hold(lambda: self._hold_lost(channel, on_lost), lease)
        return code, rows

    def _hold_lost(self, channel: _Channel, on_lost: Callable[[], None]) -> None:
        if not channel.moving and channel.node is not None:
            self.nodes.failed(channel.node, "the connection holding the lease was lost")
        on_lost()

    def unhold(self, user: str) -> None:
        """``user``'s lease is no longer held here (disconnected): forget ``on_lost``."""
        channel = self._channels.get(self._key_of(user))
        if channel is not None:
            channel.unhold()

    def _identity_of(self, user: str) -> tls.Identity | None:
        """The identity a request for ``user`` presents by default: the home's, if any."""
        return self.home.identity(user) if self.home is not None else None

    def _key_of(self, user: str) -> str | None:
        """The key of the channel a request for ``user`` travels on."""
        return _channel_key(self._identity_of(user))

    def estimated_datetime(self) -> str:
        """A DATETIME without asking the time service: the last stamp it gave, advanced
        by the time elapsed since; the local clock before the first one."""
        if self._stamped is not None:
            text, at = self._stamped
            estimate = advanced(text, self.reactor.seconds() - at)
            if estimate is not None:
                return estimate
        return wire.format_datetime()

    def _unanswered(self, op: str, node: Node) -> IndexerError:
        if op not in wire.CLASSIC_OPS:
            self.unknown_ops.add(op)  # an indexer does not learn operations mid-session
            return UnknownOperation(f"the indexer at {node} does not know {op}")
        return _cut()

    def _answered(self, node: Node) -> None:
        """``node`` replied: the client uses it if that is a switch, and leaves the other
        nodes (after a switch, or a late reply from a node that is not the one used)."""
        switched = self.nodes.answered(node)
        used = self.nodes.using
        if switched or node != used:
            for channel in list(self._channels.values()):
                if channel.node != used:
                    channel.move_off()

    def close(self) -> Deferred:
        """Close every connection; fires when they are closed."""
        channels = list(self._channels.values())
        self._channels.clear()
        return defer.gatherResults([c.close() for c in channels]).addCallback(lambda _: None)

    # --- the classic protocol: one request per connection --------------------------

    @defer.inlineCallbacks
    def _classic(self, payload: bytes, shape: tuple[int | None, int | None]):
        op = _op_of(payload)
        attempts = _Attempts(self.nodes, op)
        while True:
            node = self.nodes.current
            proto = _RequestProtocol(payload, *shape)
            endpoint = endpoints.HostnameEndpoint(
                self.reactor, node.host, node.port, timeout=self.timeout
            )
            exchange = endpoints.connectProtocol(endpoint, proto)
            exchange.addCallback(lambda _, proto=proto: proto.finished)
            exchange.addTimeout(self.timeout, self.reactor)
            try:
                result = yield exchange
            except _CONNECT_FAILURES as exc:
                attempts.not_reached(node, _connect_failure(exc))
            except defer.TimeoutError:
                if proto.transport is None:  # never connected: nothing was sent
                    attempts.not_reached(node, f"no connection in {self.timeout:g}s")
                else:
                    attempts.lost_reply(node, self._silence())
            except _Unanswered:
                if op not in wire.CLASSIC_OPS:
                    raise self._unanswered(op, node) from None
                attempts.lost_reply(node, "it closed the connection before replying")
            except ReplyCut:
                attempts.lost_reply(node, "it closed the connection in the middle of its reply")
            else:
                self._answered(node)
                return result

    def _silence(self) -> str:
        return f"no reply in {self.timeout:g}s"

    # --- TLS: one connection per identity, one request at a time -------------------

    @defer.inlineCallbacks
    def _over_tls(
        self,
        identity: tls.Identity | None,
        payload: bytes,
        shape: tuple[int | None, int | None],
    ):
        key = _channel_key(identity)
        lock = self._locks.setdefault(key, DeferredLock())
        yield lock.acquire()
        op = _op_of(payload)
        attempts = _Attempts(self.nodes, op)
        second_chance = op not in wire.CLASSIC_OPS
        try:
            while True:
                channel = self._channels.get(key)
                fresh = channel is None or not channel.alive
                if fresh:
                    node = self.nodes.current
                    try:
                        channel = yield self._open(identity, node)
                    except _NotReached as exc:
                        attempts.not_reached(node, str(exc))
                        continue
                    self._channels[key] = channel
                try:
                    result = yield channel.ask(payload, shape[0], self.timeout, shape[1])
                except _Unanswered:
                    if not fresh:
                        continue  # it closed while idle: once more on a new connection
                    if second_chance:
                        # An extension closed unanswered on a new connection: an indexer
                        # that does not know it, or one that was restarting (our HOLD
                        # right after a lost connection). Once more before concluding:
                        # the answer is remembered for the session.
                        second_chance = False
                        continue
                    if op not in wire.CLASSIC_OPS:
                        raise self._unanswered(op, channel.node) from None
                    why = "it closed the connection before replying"
                    attempts.lost_reply(channel.node, why)
                    continue
                except ReplyCut:
                    why = "it closed the connection in the middle of its reply"
                    attempts.lost_reply(channel.node, why)
                    continue
                except defer.TimeoutError:
                    channel.transport.abortConnection()
                    attempts.lost_reply(channel.node, self._silence())
                    continue
                if not channel.moving:  # a late reply from a node left meanwhile
                    self._answered(channel.node)
                return result
        finally:
            lock.release()

    @defer.inlineCallbacks
    def _open(self, identity: tls.Identity | None, node: Node):
        """A new TLS connection to ``node`` presenting ``identity``, the indexer's key
        checked. Fails with :class:`_NotReached` when it cannot be made (nothing sent)."""
        explicit = self.fingerprint
        pinned = self.home.pinned_indexer(node.host, node.port) if self.home is not None else None
        options = tls.client_options(explicit or pinned, identity)
        channel = _Channel(options, self.reactor, self.idle, node)
        endpoint = endpoints.wrapClientTLS(
            options,
            endpoints.HostnameEndpoint(self.reactor, node.host, node.port, timeout=self.timeout),
        )
        try:
            yield endpoints.connectProtocol(endpoint, channel)
        except _CONNECT_FAILURES as exc:
            raise _NotReached(_connect_failure(exc)) from None
        try:
            yield channel.ready.addTimeout(self.timeout, self.reactor)
        except tls.FingerprintMismatch as exc:
            raise self._key_changed(exc, explicit is not None, node) from None
        except (_NotTLS, defer.TimeoutError) as exc:
            if channel.transport is not None:
                channel.transport.abortConnection()
            if explicit or pinned or self._any_pinned():
                raise _NotReached(
                    f"no TLS handshake ({exc or 'timed out'}), yet its key is pinned: "
                    "not falling back to plaintext, where names are not protected"
                ) from None
            self._go_classic(node)
            raise _NotTLS() from None
        self._pin(options.seen, pinned, node)
        return channel

    def _any_pinned(self) -> bool:
        """Whether the key of any node is pinned: a directory that speaks TLS."""
        if self.home is None or not self.nodes.several:
            return False
        return any(self.home.pinned_indexer(n.host, n.port) for n in self.nodes.nodes)

    def _go_classic(self, node: Node) -> None:
        if not self.classic:
            self.classic = True
            self.note(
                f"note: the indexer at {node} does not speak TLS (a classic indexer): "
                "requests travel in clear there and user names are not protected"
            )

    def _pin(self, seen: str | None, pinned: str | None, node: Node) -> None:
        if self.home is None or seen is None or seen == pinned:
            return
        self.home.pin_indexer(node.host, node.port, seen)
        where = self.home.known_indexers_file
        if self.fingerprint:
            self.note(f"pinned key {seen} for the indexer at {node} in {where}")
        else:
            self.note(
                f"first contact with the indexer at {node}: its key fingerprint is "
                f"{seen}; pinned in {where}"
            )

    def _key_changed(
        self, exc: tls.FingerprintMismatch, explicit: bool, node: Node
    ) -> IndexerKeyChanged:
        if explicit:
            text = (
                f"the indexer at {node} presented key {exc.got}, not the key "
                f"{exc.expected} given with --indexer-fingerprint: refused"
            )
        else:
            where = self.home.known_indexers_file if self.home is not None else "known_indexers"
            text = (
                f"WARNING: the key of the indexer at {node} has CHANGED: refused. "
                f"It presented {exc.got}, but {exc.expected} is pinned for it in {where}. "
                "Someone may be impersonating the indexer, or its operator gave it a new key. "
                f"If the new key is genuine, remove the line '{node} {exc.expected}' "
                f"from {where}, or pass --indexer-fingerprint {exc.got}"
            )
        self.note(text)  # every time: a refused command must say why and how to fix it
        return IndexerKeyChanged(text)


class ReplyLost(ReplyCut):
    """A request went out and no whole reply came back (closed, cut, silent), from any
    node that could be asked. A change may or may not have been done: it is not sent
    again (another node could do it twice)."""


class _Attempts:
    """One request's tries over the nodes: each node at most once after it failed.

    :meth:`not_reached` (nothing was sent) and :meth:`lost_reply` (sent, no reply) leave
    the node and return when the request may go to the next one; otherwise they raise
    the request's failure.
    """

    def __init__(self, nodes: Nodes, op: str) -> None:
        self.nodes = nodes
        self.op = op
        self.failures: dict[Node, str] = {}

    def not_reached(self, node: Node, why: str) -> None:
        self._failed(node, why)
        if self.nodes.current in self.failures:
            raise IndexerError(self._none_answers())

    def lost_reply(self, node: Node, why: str) -> None:
        self._failed(node, why)
        if self.op in wire.READ_OPS and self.nodes.current not in self.failures:
            return  # it changes nothing: the next node may as well answer it
        if self.op in wire.READ_OPS:
            raise ReplyLost(self._none_answers())
        after = f"; the next request goes to {self.nodes.current}" if self.nodes.several else ""
        raise ReplyLost(
            f"the indexer at {node} did not answer {self.op} ({why}): it may or may not have "
            f"been done, and is not sent again{after}"
        )

    def _failed(self, node: Node, why: str) -> None:
        self.failures[node] = why
        self.nodes.failed(node, why)

    def _none_answers(self) -> str:
        if len(self.failures) == 1:
            ((node, why),) = self.failures.items()
            return f"the indexer at {node} does not answer: {why}"
        each = "; ".join(f"{node}: {why}" for node, why in self.failures.items())
        return f"no indexer node answers ({each})"


def _connect_failure(exc: BaseException) -> str:
    """Why a connection could not be made, in a few words."""
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.TimeoutError | error.TCPTimedOutError):
        return "connecting timed out"
    if isinstance(exc, error.DNSLookupError):
        return "its name does not resolve"
    return str(exc).strip() or type(exc).__name__


@dataclass(frozen=True)
class Source:
    """One owner of a file with a given SHA-256 (a row of SOURCES): where to ask for it."""

    owner: str
    name: str
    host: str
    port: int


class SourcesRefused(IndexerError):
    """The indexer answered SOURCES with an error ``code`` (1 no such user, 2 not
    connected, 3 bad hash or a claimed name without its key)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the indexer refused SOURCES (code {code})")
        self.code = code


@defer.inlineCallbacks
def ask_sources(indexer: Any, user: str, sha256: str):
    """The connected owners of a file with ``sha256`` (64 lowercase hex digits) besides
    ``user`` (SOURCES, protocol.md 8.6): fires with a list of :class:`Source`, by owner
    then file name, at most ``wire.MAX_SOURCES``.

    ``indexer`` is anything with ``request(op, user, *args)`` (an :class:`IndexerClient`,
    the shell's ``session.indexer``); ``user`` is the connected user asking. Call it as
    ``sources = yield ask_sources(session.indexer, session.user, sha256)``. Fails with
    :class:`UnknownOperation` when the indexer does not know SOURCES (a classic one:
    download from the named owner only; it is not asked again in the session),
    :class:`SourcesRefused` for an error code, :class:`IndexerError` when it could not
    be asked. Rows whose port is not a port are left out.
    """
    code, rows = yield indexer.request("SOURCES", user, sha256)
    if code != wire.OK:
        raise SourcesRefused(code)
    found = []
    for owner, name, host, port in rows or ():
        if wire.is_decimal(port) and 0 < int(port) < 65536:
            found.append(Source(owner, name, host, int(port)))
    return found


def _channel_key(identity: tls.Identity | None) -> str | None:
    """Channels are kept per identity presented: its fingerprint, None for anonymous."""
    return identity.fingerprint if identity is not None else None


def lease_seconds(rows: list[Row] | None) -> float | None:
    """The lease in seconds from ALIVE's or HOLD's reply field, or None if it has none."""
    try:
        text = rows[0][0]
    except (TypeError, IndexError):
        return None
    return float(text) if wire.is_decimal(text) and int(text) > 0 else None


def _op_of(payload: bytes) -> str:
    return payload.split(wire.NUL, 1)[0].decode("ascii")
