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
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, endpoints, protocol
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import tls, wire
from p2p.client.home import Home
from p2p.client.time_client import advanced
from p2p.keepalive import keep_alive

#: Fields per row of the listings that follow code 0.
LISTING_COLUMNS: dict[str, int] = {
    "LIST_USERS": 3,
    "LIST_CONTENT": 2,
    "LIST_PEERS": 4,
    "LIST_FILES": 4,
    "SEARCH": 6,
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
            if not raw.isdigit():
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

    def __init__(self, options: tls.ClientOptions, reactor, idle: float) -> None:
        self.options = options
        self.reactor = reactor
        self.idle = idle
        self.ready: Deferred = Deferred()
        self.alive = False
        self.ended = False
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
    """Asks one indexer (see the module docstring).

    ``timestamp`` returns a Deferred DATETIME string (the time service's
    answer); ``timeout`` bounds connecting and the wait for each reply.
    ``home`` holds the users' identities and the pinned indexer keys (None:
    no identities, and any key is accepted unless ``fingerprint`` is given);
    ``fingerprint`` pins the indexer's key explicitly (``--indexer-fingerprint``).
    ``note`` writes a line for the user (stderr). ``use_tls=False`` speaks only
    the classic protocol.
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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.host = host
        self.port = port
        self.timestamp = timestamp
        self.reactor = reactor
        self.timeout = timeout
        self.home = home
        self.fingerprint = fingerprint
        self.note = note or (lambda _text: None)
        self.idle = idle
        #: True once the indexer is known to speak only the classic protocol.
        self.classic = not use_tls
        #: Extension operations the indexer closed on unanswered: not asked again.
        self.unknown_ops: set[str] = set()
        #: The last DATETIME from ``timestamp`` and the reactor time it came at.
        self._stamped: tuple[str, float] | None = None
        self._channels: dict[str | None, _Channel] = {}
        self._locks: dict[str | None, DeferredLock] = {}

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

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
        :meth:`unhold`. Over the classic protocol the indexer answers 3."""
        code, rows = yield self.request(wire.HOLD.name, user)
        if code == wire.OK:
            channel = self._channels.get(self._key_of(user))
            if channel is None or not channel.alive:
                self.reactor.callLater(0, on_lost)
            else:
                channel.hold(on_lost, lease_seconds(rows) or wire.DEFAULT_PEER_TIMEOUT)
        return code, rows

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

    def _unanswered(self, op: str) -> IndexerError:
        if op not in wire.CLASSIC_OPS:
            self.unknown_ops.add(op)  # an indexer does not learn operations mid-session
            return UnknownOperation(f"the indexer at {self.where} does not know {op}")
        return _cut()

    def close(self) -> Deferred:
        """Close every connection; fires when they are closed."""
        channels = list(self._channels.values())
        self._channels.clear()
        return defer.gatherResults([c.close() for c in channels]).addCallback(lambda _: None)

    # --- the classic protocol: one request per connection --------------------------

    @defer.inlineCallbacks
    def _classic(self, payload: bytes, shape: tuple[int | None, int | None]):
        proto = _RequestProtocol(payload, *shape)
        endpoint = endpoints.HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeout
        )
        exchange = endpoints.connectProtocol(endpoint, proto).addCallback(lambda _: proto.finished)
        exchange.addTimeout(self.timeout, self.reactor)
        try:
            result = yield exchange
        except defer.TimeoutError as exc:
            raise self._silent() from exc
        except _Unanswered:
            raise self._unanswered(_op_of(payload)) from None
        return result

    def _silent(self) -> IndexerError:
        return IndexerError(f"no reply from the indexer at {self.where} in {self.timeout:g}s")

    # --- TLS: one connection per identity, one request at a time -------------------

    @defer.inlineCallbacks
    def _over_tls(
        self, identity: tls.Identity | None, payload: bytes, shape: tuple[int | None, int | None]
    ):
        key = _channel_key(identity)
        lock = self._locks.setdefault(key, DeferredLock())
        yield lock.acquire()
        op = _op_of(payload)
        second_chance = op not in wire.CLASSIC_OPS
        try:
            while True:
                channel = self._channels.get(key)
                fresh = channel is None or not channel.alive
                if fresh:
                    channel = yield self._open(identity)
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
                    raise self._unanswered(op) from None
                except defer.TimeoutError as exc:
                    channel.transport.abortConnection()
                    raise self._silent() from exc
                return result
        finally:
            lock.release()

    @defer.inlineCallbacks
    def _open(self, identity: tls.Identity | None):
        """A new TLS connection presenting ``identity``, the indexer's key checked."""
        explicit = self.fingerprint
        pinned = self.home.pinned_indexer(self.host, self.port) if self.home is not None else None
        options = tls.client_options(explicit or pinned, identity)
        channel = _Channel(options, self.reactor, self.idle)
        endpoint = endpoints.wrapClientTLS(
            options,
            endpoints.HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout),
        )
        yield endpoints.connectProtocol(endpoint, channel)
        try:
            yield channel.ready.addTimeout(self.timeout, self.reactor)
        except tls.FingerprintMismatch as exc:
            raise self._key_changed(exc, explicit is not None) from None
        except (_NotTLS, defer.TimeoutError) as exc:
            if channel.transport is not None:
                channel.transport.abortConnection()
            if explicit or pinned:
                raise IndexerError(
                    f"the indexer at {self.where} did not complete a TLS handshake "
                    f"({exc or 'timed out'}), yet its key is pinned: refusing to fall back "
                    "to plaintext, where names are not protected"
                ) from None
            self._go_classic()
            raise _NotTLS() from None
        self._pin(options.seen, pinned)
        return channel

    def _go_classic(self) -> None:
        if not self.classic:
            self.classic = True
            self.note(
                f"note: the indexer at {self.where} does not speak TLS (a classic indexer): "
                "requests travel in clear there and user names are not protected"
            )

    def _pin(self, seen: str | None, pinned: str | None) -> None:
        if self.home is None or seen is None or seen == pinned:
            return
        self.home.pin_indexer(self.host, self.port, seen)
        where = self.home.known_indexers_file
        if self.fingerprint:
            self.note(f"pinned key {seen} for the indexer at {self.where} in {where}")
        else:
            self.note(
                f"first contact with the indexer at {self.where}: its key fingerprint is "
                f"{seen}; pinned in {where}"
            )

    def _key_changed(self, exc: tls.FingerprintMismatch, explicit: bool) -> IndexerKeyChanged:
        if explicit:
            text = (
                f"the indexer at {self.where} presented key {exc.got}, not the key "
                f"{exc.expected} given with --indexer-fingerprint: refused"
            )
        else:
            where = self.home.known_indexers_file if self.home is not None else "known_indexers"
            text = (
                f"WARNING: the key of the indexer at {self.where} has CHANGED: refused. "
                f"It presented {exc.got}, but {exc.expected} is pinned for it in {where}. "
                "Someone may be impersonating the indexer, or its operator gave it a new key. "
                f"If the new key is genuine, remove the line '{self.where} {exc.expected}' "
                f"from {where}, or pass --indexer-fingerprint {exc.got}"
            )
        self.note(text)  # every time: a refused command must say why and how to fix it
        return IndexerKeyChanged(text)


def _channel_key(identity: tls.Identity | None) -> str | None:
    """Channels are kept per identity presented: its fingerprint, None for anonymous."""
    return identity.fingerprint if identity is not None else None


def lease_seconds(rows: list[Row] | None) -> float | None:
    """The lease in seconds from ALIVE's or HOLD's reply field, or None if it has none."""
    try:
        text = rows[0][0]
    except (TypeError, IndexError):
        return None
    return float(text) if text.isdigit() and int(text) > 0 else None


def _op_of(payload: bytes) -> str:
    return payload.split(wire.NUL, 1)[0].decode("ascii")
