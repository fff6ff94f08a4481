"""Client of the indexer: one request per TCP connection (protocol.md section 1).

``IndexerClient.request(op, user, *args)`` stamps the request with the time
service's DATETIME, connects, sends it, reads the code (and, after code 0 of
LIST_USERS / LIST_CONTENT, the listing), closes, and fires with
``(code, rows_or_None)``. Anything else (refused, timed out, reply cut short,
malformed reply) is a failure: the shell prints the command's plain FAIL line.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, endpoints, protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from p2p import wire

#: Fields per row of the listings that follow code 0.
LISTING_COLUMNS: dict[str, int] = {"LIST_USERS": 3, "LIST_CONTENT": 2}

Row = tuple[str, ...]
Reply = tuple[int, list[Row] | None]


class IndexerError(Exception):
    """The indexer could not be asked or did not answer properly."""


class ReplyCut(IndexerError):
    """The connection closed before the whole reply arrived."""


class BadReply(IndexerError):
    """The reply broke the protocol (a count that is not a number, a field too long)."""


class _RequestProtocol(protocol.Protocol):
    """Sends one request and parses its reply; fires ``finished`` once."""

    def __init__(self, request: bytes, columns: int | None) -> None:
        self.request = request
        self.columns = columns
        self.finished: Deferred = Deferred(self._cancel)
        self.code: int | None = None
        self.count: int | None = None
        self.fields: list[bytes] = []
        self.reader = wire.FieldReader(wire.MAX_FIELD)

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        try:
            self._consume(data)
        except (wire.FieldTooLong, ValueError) as exc:
            self._done(Failure(BadReply(str(exc))))

    def _consume(self, data: bytes) -> None:
        if self.code is None:
            self.code = data[0]
            data = data[1:]
            if self.code != wire.OK or self.columns is None:
                self._done((self.code, None))
                return
        self.fields.extend(self.reader.feed(data))
        if self.count is None and self.fields:
            raw = self.fields.pop(0)
            if not raw.isdigit():
                raise ValueError(f"listing count is not a number: {raw[:20]!r}")
            self.count = int(raw)
        if self.count is not None and len(self.fields) >= self.count * self.columns:
            texts = [f.decode("utf-8", "replace") for f in self.fields]
            rows = [
                tuple(texts[i : i + self.columns])
                for i in range(0, self.count * self.columns, self.columns)
            ]
            self._done((self.code, rows))

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
            self.finished.errback(ReplyCut("the indexer closed the connection before replying"))


class IndexerClient:
    """Asks one indexer; every request opens its own connection.

    ``timestamp`` returns a Deferred DATETIME string (the time service's answer);
    ``timeout`` bounds the whole exchange, connecting included.
    """

    def __init__(
        self,
        host: str,
        port: int,
        timestamp: Callable[[], Deferred],
        reactor=None,
        timeout: float = wire.DEFAULT_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.host = host
        self.port = port
        self.timestamp = timestamp
        self.reactor = reactor
        self.timeout = timeout

    @defer.inlineCallbacks
    def request(self, op: str, user: str, *args: str | int):
        """Send ``op`` for ``user``; fires with ``(code, rows or None)``."""
        if op not in wire.OPS:
            raise ValueError(f"unknown indexer operation {op!r}")
        datetime = yield self.timestamp()
        payload = wire.encode_request(op, datetime, user, *args)
        proto = _RequestProtocol(payload, LISTING_COLUMNS.get(op))
        endpoint = endpoints.HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeout
        )
        exchange = endpoints.connectProtocol(endpoint, proto).addCallback(lambda _: proto.finished)
        exchange.addTimeout(self.timeout, self.reactor)
        try:
            result = yield exchange
        except defer.TimeoutError as exc:
            raise IndexerError(
                f"no reply from the indexer at {self.host}:{self.port} in {self.timeout:g}s"
            ) from exc
        return result
