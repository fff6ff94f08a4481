"""Batches of requests sent to PostgreSQL from the reactor itself, without a thread.

A batch of requests is one statement (``p2p_batch``, :mod:`p2p.indexer.pgrules`),
so it needs no transaction of its own on the node's side, only a round trip:
:class:`StatementPipe` sends it over a libpq connection in non-blocking mode
(``psycopg.pq``, the libpq wrapper psycopg is built on), watched by the reactor
like any socket (``IReadDescriptor``/``IWriteDescriptor``). One statement is
in flight at a time; the items that arrive meanwhile wait and go together in the
next one (up to ``max_batch``), ordered by their key (the user: every batch
locks users in one order). A batch leaves at the end of the reactor's turn (as
the SQLite path's group commit does): the requests read in one turn go
together, instead of the first alone and the others a whole round trip later.
Nothing waits on the reactor: sending, reading and parsing are done as the
socket allows.

Why not the thread pool: a node's Python time per request is what limits it, and
a database thread shares the interpreter lock with the reactor; each hand-over
of a batch and of its results costs both threads (bench/cluster_load.py). The
connection itself is made in a thread (libpq's connect blocks), once, and again
after the server went away.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: A batch that the server aborted as a deadlock or a serialization failure changed
#: nothing: sent again, at most this many times.
ATTEMPTS = 5
#: SQLSTATEs of those two.
_RETRY = {b"40P01", b"40001"}


class StatementFailed(Exception):
    """The server refused the statement (its message), or the connection is gone."""


@implementer(IReadDescriptor, IWriteDescriptor)
class StatementPipe:
    """Items in, one statement per batch of them out, each item's result back."""

    log = Logger()

    def __init__(
        self,
        uri: str,
        reactor,
        statement: Callable[[list[Any]], tuple[bytes, list[bytes]]],
        results: Callable[[bytes], list[Any]],
        max_batch: int = 64,
    ) -> None:
        self.uri = uri
        self.reactor = reactor
        self.statement = statement
        self.results = results
        self.max_batch = max_batch
        self.pgconn = None
        self._queue: deque[tuple[str, Any, Deferred]] = deque()
        self._inflight: list[tuple[str, Any, Deferred]] | None = None
        self._attempt = 0
        self._alone = 0  # batches of one item to send next (after a batch failed)
        self._received: list[Any] = []
        self._connecting = False
        self._pump_call = None  # the turn's end, when a batch is to leave then
        self._fd = -1
        self.closed = False

    # --- The caller's side ------------------------------------------------------

    def submit(self, key: str, item: Any) -> Deferred:
        """Send ``item`` in the next batch; a Deferred of its result."""
        d: Deferred = Deferred()
        if self.closed:
            d.errback(StatementFailed("the store is closed"))
            return d
        self._queue.append((key, item, d))
        self._pump_soon()
        return d

    def close(self) -> None:
        """Fail what waits, close the connection."""
        self.closed = True
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()
        self._pump_call = None
        self._drop(StatementFailed("the store is closed"))
        queued, self._queue = self._queue, deque()
        for _key, _item, d in queued:
            d.errback(StatementFailed("the store is closed"))

    # --- Sending ------------------------------------------------------------------

    def _pump_soon(self) -> None:
        """Send the waiting items at the end of this reactor turn (they and whatever
        else the turn reads go together)."""
        if self._pump_call is None and self._inflight is None:
            self._pump_call = self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        call, self._pump_call = self._pump_call, None
        if call is not None and call.active():
            call.cancel()
        if self._inflight is not None or not self._queue or self.closed:
            return
        if self.pgconn is None:
            self._connect()
            return
        size = 1 if self._alone else min(len(self._queue), self.max_batch)
        if self._alone:
            self._alone -= 1
        batch = sorted((self._queue.popleft() for _ in range(size)), key=lambda i: i[0])
        self._attempt = 0
        self._send(batch)

    def _send(self, batch: list[tuple[str, Any, Deferred]]) -> None:
        query, params = self.statement([item for _key, item, _d in batch])
        self._inflight = batch
        self._received = []
        try:
            self.pgconn.send_query_params(query, params)
            self.doWrite()
        except Exception:
            self._lost(Failure())

    def _connect(self) -> None:
        if self._connecting:
            return
        self._connecting = True

        def connect():
            from psycopg import pq

            pgconn = pq.PGconn.connect(self.uri.encode())
            if pgconn.status != pq.ConnStatus.OK:
                message = pgconn.get_error_message()
                pgconn.finish()
                raise StatementFailed(" ".join(message.split()))
            pgconn.nonblocking = 1
            return pgconn

        def connected(pgconn) -> None:
            self._connecting = False
            if self.closed:
                pgconn.finish()
                return
            self.pgconn = pgconn
            self._fd = os.dup(pgconn.socket)
            self.reactor.addReader(self)
            self._pump()

        def failed(failure: Failure) -> None:
            # Every waiting item gets its error now; the next one tries to connect again.
            self._connecting = False
            queued, self._queue = self._queue, deque()
            for _key, _item, d in queued:
                d.errback(failure)

        deferToThread(connect).addCallbacks(connected, failed)

    # --- IWriteDescriptor / IReadDescriptor -----------------------------------------

    def fileno(self) -> int:
        # A duplicate of libpq's socket: libpq closes its own when the connection fails,
        # and the reactor must be able to stop watching it all the same.
        return self._fd

    def logPrefix(self) -> str:
        return "p2p-indexer postgresql"

    def doWrite(self) -> None:
        """Hand libpq's buffered output to the socket; watch for room while some is left."""
        if self.pgconn is None:
            return None
        if self.pgconn.flush() == 0:
            self.reactor.removeWriter(self)
        else:
            self.reactor.addWriter(self)
        return None

    def doRead(self) -> None:
        pgconn = self.pgconn
        if pgconn is None:
            return None
        from psycopg import pq

        try:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    self._done()
                    break
                self._received.append(result)
        except Exception:
            self._lost(Failure())
            return None
        if pgconn.status == pq.ConnStatus.BAD:
            self._lost(Failure(StatementFailed("the connection to the server is gone")))
        return None

    def connectionLost(self, reason) -> None:
        self._lost(reason)

    # --- Results -----------------------------------------------------------------

    def _done(self) -> None:
        from psycopg import pq

        batch, self._inflight = self._inflight, None
        received, self._received = self._received, []
        if batch is None:
            return
        result = received[-1] if received else None
        if result is not None and result.status == pq.ExecStatus.TUPLES_OK:
            # Decoded whole before any item hears: a result that cannot be read (bad
            # JSON, a bad reference, too few or too many values) fails every item of
            # the batch, as the server's refusal would, instead of leaving them unfired.
            try:
                values = list(self.results(result.get_value(0, 0)))
                if len(values) != len(batch):
                    raise ValueError(f"{len(values)} results for {len(batch)} requests")
            except Exception as e:
                self.log.failure("a batch's result could not be read")
                failure = Failure(StatementFailed(f"unreadable result: {e}"))
                for _key, _item, d in batch:
                    d.errback(failure)
            else:
                for (_key, _item, d), value in zip(batch, values, strict=True):
                    d.callback(value)
        else:
            state = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            message = result.error_message.decode("utf-8", "replace") if result else "no result"
            if state in _RETRY and self._attempt < ATTEMPTS - 1:
                self._attempt += 1
                self._send(batch)
                return
            if len(batch) > 1:
                # One of them fails the statement: each again alone, so it fails alone.
                self._queue.extendleft(reversed(batch))
                self._alone += len(batch)
            else:
                batch[0][2].errback(StatementFailed(" ".join(message.split())))
        self._pump_soon()

    def _lost(self, reason) -> None:
        """The connection is gone: what was in flight fails (it may or may not have
        committed: no reply is sent for it either way); the next batch connects again."""
        self.log.warn(
            "connection to the database lost: {why}",
            why=" ".join(str(getattr(reason, "value", reason)).split()),
        )
        self._drop(reason)
        self._pump()

    def _drop(self, reason) -> None:
        pgconn = self.pgconn
        if pgconn is not None:
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
            os.close(self._fd)
            self.pgconn, self._fd = None, -1
            pgconn.finish()
        batch, self._inflight = self._inflight, None
        if batch:
            failure = reason if isinstance(reason, Failure) else Failure(StatementFailed(reason))
            for _key, _item, d in batch:
                d.errback(failure)
