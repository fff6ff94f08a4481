"""The indexer's PostgreSQL store: one database shared by any number of indexer nodes.

With ``--db postgresql://...`` (a libpq connection URI) memory is no longer the
truth: every request reads and writes the database inside one transaction of
its own (:meth:`PgStore.transact`), and the cross-node rules come from the
database: a row lock on the user (``SELECT ... FOR UPDATE``), unique keys and
``INSERT ... ON CONFLICT``. A reply is sent after its transaction committed,
so whatever one node acknowledged is what the next request to any node sees,
and a node killed at any point leaves nothing half-done.

The transactions run in a Twisted thread pool of our own with psycopg's
synchronous API, one connection per thread (docs/architecture.md says why
this, not psycopg's asyncio API): the reactor never waits for the database.

The audit outbox (protocol.md 3.3): a request's record is inserted at the end
of its transaction, numbered from the one counter row, whose row lock is held
until the commit; so numbers are given in commit order, and a reader never sees
``seq`` N+1 committed while N may still come. One node at a time is the
*leader* (:class:`Leadership`: ``pg_try_advisory_lock`` on a connection of its
own; when that session dies the lock goes with it and another node takes
over): only the leader's relay reads the outbox (:meth:`PgStore.outbox_pending`
answers from rows fetched in a thread), and only the leader expires leases.
Every node sends with the database's one sender id, so a row that a dead
leader sent and a new one sends again is stored once by the logger.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

#: What ``--db`` starts with when it names a PostgreSQL database.
SCHEMES = ("postgresql://", "postgres://")
#: Threads (each with its own connection) running the requests' transactions.
DEFAULT_THREADS = 1
#: The advisory lock keys: the schema's creation, and the relay's (and expiry's) leader.
SCHEMA_LOCK = 0x70327001
LEADER_LOCK = 0x70327002
#: Seconds between two looks for leadership, and two reads of the outbox by the leader.
LEADER_TICK = 1.0
OUTBOX_POLL = 0.1
#: Outbox rows the leader keeps fetched ahead of the relay, at most.
OUTBOX_AHEAD = 4096
#: Attempts of a transaction that the server aborted as a deadlock or a serialization
#: failure (each one changed nothing), before the request gets its error code.
ATTEMPTS = 5
#: Works run in one transaction at most (see :meth:`PgStore.transact`).
MAX_BATCH = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
CREATE SEQUENCE IF NOT EXISTS connect_order;
CREATE TABLE IF NOT EXISTS users (
    name text PRIMARY KEY,
    ip text,
    port integer,
    identity text,
    connected bigint,
    lease_until double precision,
    lease_kind smallint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS users_connected ON users (connected) WHERE ip IS NOT NULL;
CREATE INDEX IF NOT EXISTS users_lease ON users (lease_until) WHERE ip IS NOT NULL;
CREATE TABLE IF NOT EXISTS files (
    id bigserial PRIMARY KEY,
    owner text NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    name text NOT NULL,
    description text NOT NULL,
    size bigint,
    sha256 text,
    words tsvector NOT NULL,
    UNIQUE (owner, name)
);
CREATE INDEX IF NOT EXISTS files_words ON files USING gin (words);
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256) WHERE sha256 IS NOT NULL;
CREATE TABLE IF NOT EXISTS outbox (seq bigint PRIMARY KEY, record text NOT NULL);
CREATE TABLE IF NOT EXISTS outbox_counter (
    id integer PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL
);
INSERT INTO outbox_counter (id, seq) VALUES (1, 0) ON CONFLICT DO NOTHING;
"""

#: A transaction's audit records, numbered by the counter row (locked until it commits).
_ADD_RECORDS = """
WITH next AS (UPDATE outbox_counter SET seq = seq + %(n)s WHERE id = 1 RETURNING seq)
INSERT INTO outbox (seq, record)
SELECT next.seq - %(n)s + r.n, r.record
FROM next, unnest(%(records)s::text[]) WITH ORDINALITY AS r(record, n)
"""


def insert_records(cursor, records: list[str]) -> None:
    """Write ``records`` into the outbox in ``cursor``'s transaction, numbered after
    every committed one: the counter row stays locked until this transaction ends,
    so the numbers follow the commits (see the module's doc)."""
    cursor.execute(_ADD_RECORDS, {"n": len(records), "records": records})


#: The audit records of the transaction a pool thread is running, and its memo.
_pending = threading.local()


def batch_memo() -> dict:
    """What the works of the batch a pool thread is running share (the rows its
    ``prepare`` hook read, listings already built); empty at each attempt's start."""
    return _pending.memo


def is_postgres(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database (a libpq URI) rather than a file."""
    return db.startswith(SCHEMES)


def shown(uri: str) -> str:
    """``uri`` as the operator may read it: without a password."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(uri)
    except Exception:
        return "postgresql://..."
    if "password" not in params:
        return uri
    params["password"] = "***"
    return make_conninfo(**params)


#: libpq settings a node adds to its URI unless the URI sets them: a database host that
#: vanishes (no FIN, no RST) fails the connection attempt, the request waiting on it and
#: a stopping node's last answers within seconds instead of hanging on TCP's defaults
#: (connect: forever; a lost peer: about 15 minutes). Ignored over a Unix socket.
TIMEOUT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "20000",
}


def with_timeouts(uri: str) -> str:
    """``uri`` with :data:`TIMEOUT_DEFAULTS` for what it does not set itself."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(uri)
    return make_conninfo(**{**TIMEOUT_DEFAULTS, **params})


class PgStore:
    """Connections to the shared database, the requests' transactions, the outbox."""

    log = Logger()
    #: No group commit: each request's transaction commits before its reply
    #: (the factory's flush finds nothing to commit).
    in_transaction = False
    changes = False

    def __init__(self, uri: str, threads: int = DEFAULT_THREADS, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.uri = with_timeouts(uri)
        self.path = shown(uri)  # what messages name
        self.reactor = reactor
        self.threads = threads
        self.pool: ThreadPool | None = None
        self._local = threading.local()
        self._connections: list[Any] = []
        self._connections_lock = threading.Lock()
        self._sender_id = ""
        self._listeners: list[Callable[[], None]] = []
        #: Outbox rows fetched by the leader and not yet deleted, ascending.
        self._rows: list[tuple[int, str]] = []
        self._fetching = False
        self._fetch_again = False
        self._deleted_through = 0
        self.leadership: Leadership | None = None
        #: The cluster's connected users, as counted at the last leadership tick.
        self.connected_users = 0
        #: ``prepare(cursor, works)``: called first for each batch with the (work, args)
        #: of its works in order; applies what it can in one statement (the directory:
        #: its requests) and returns the positions of the works that need no
        #: transaction of their own after it.
        self.prepare: Callable[[Any, list[tuple]], set[int]] | None = None
        #: More SQL run with the schema at open (the directory's functions).
        self.schema_extra: list[str] = []
        #: Called at close, first (the directory's statement pipe).
        self.closers: list[Callable[[], None]] = []
        #: Works waiting for a thread, and how many threads run a batch.
        self._queue: deque[tuple] = deque()
        self._busy = 0

    # --- Life cycle ---------------------------------------------------------

    def open(self) -> None:
        """Create the tables if needed (once, under a lock: nodes may start together),
        read the cluster's sender id, start the thread pool. Blocking: at start only."""
        if self.pool is not None:
            return
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA)
            for extra in self.schema_extra:
                conn.execute(extra)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('sender_id', %s) ON CONFLICT DO NOTHING",
                (uuid.uuid4().hex,),
            )
            self._sender_id = conn.execute(
                "SELECT value FROM meta WHERE key = 'sender_id'"
            ).fetchone()[0]
        self.pool = ThreadPool(1, self.threads, name="p2p-indexer-postgresql")
        self.pool.start()

    def close(self) -> None:
        """Stop the leadership and the threads, close every connection."""
        for closer in self.closers:
            closer()
        if self.leadership is not None:
            self.leadership.stop()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.close()

    def meta(self, key: str, make: Callable[[], str]) -> str:
        """The cluster-wide value ``key`` of ``meta``; the first node to ask stores
        ``make()`` (the TLS identity every node presents). Blocking: at start only."""
        import psycopg

        with psycopg.connect(self.uri, autocommit=True) as conn:
            found = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            if found is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (key, make()),
                )
                found = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
        return found[0]

    # --- Transactions ---------------------------------------------------------

    def _connection(self):
        """This thread's connection (made, or made again after a failure, on demand)."""
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            import psycopg

            conn = psycopg.connect(self.uri, autocommit=True)
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def transact(self, work: Callable[..., Any], *args: Any, key: str = "") -> Deferred:
        """Run ``work(cursor, *args)`` in a transaction in a pool thread; fires with its
        result once committed (or fails, with nothing of it committed or unknown).

        Works wait in a queue while every thread is busy; a thread that is free takes
        all that wait (up to :data:`MAX_BATCH`) into one transaction, in the order of
        their ``key`` (the user: every batch locks users in one order, so batches on
        different nodes cannot deadlock on them). One commit and two thread hops then
        serve the whole batch: under load the cost per request falls as batches grow,
        while a lone request still runs at once. A batch that fails for another reason
        than a lost connection is run again one work per transaction, so one failing
        work fails alone.
        """
        if self.pool is None:
            raise RuntimeError("the store is not open")
        d = Deferred()
        self._queue.append((key, work, args, d))
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        """Hand the waiting works to free threads, as batches."""
        while self._queue and self._busy < self.threads and self.pool is not None:
            size = min(len(self._queue), MAX_BATCH)
            batch = [self._queue.popleft() for _ in range(size)]
            self._busy += 1
            self.pool.callInThread(self._run_batch, batch)

    def _run_batch(self, batch: list[tuple]) -> None:
        """In a pool thread: run ``batch``, then deliver each result on the reactor."""
        try:
            results = self._execute(batch)
        except Exception:
            failure = Failure()
            results = [(False, failure)] * len(batch)
        self.reactor.callFromThread(self._deliver, batch, results)

    def _deliver(self, batch: list[tuple], results: list[tuple[bool, Any]]) -> None:
        self._busy -= 1
        for (_key, _work, _args, d), (ok, value) in zip(batch, results, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        self._dispatch()

    def _execute(self, batch: list[tuple]) -> list[tuple[bool, Any]]:
        """In a pool thread: ``batch``; the results of its works, in its order.

        First the ``prepare`` hook, as one statement (its own transaction): it says
        which works it did whole, and those are final. The others (a search, the
        liveness upkeep) then run in one transaction, their audit records at its end.
        A batch of requests alone is so one statement, one round trip to the server.
        """
        import psycopg

        order = sorted(range(len(batch)), key=lambda i: batch[i][0])
        items = [batch[i] for i in order]
        _pending.memo = {}
        done: set[int] = set()
        if self.prepare is not None:
            try:
                done = self._attempts(lambda cursor: self.prepare(cursor, [i[1:3] for i in items]))
            except psycopg.OperationalError:
                raise  # the connection is lost: every work fails
            except Exception:
                if len(items) == 1:
                    raise
                return self._alone_each(batch, order)  # nothing of it was written
        results: list[Any] = [None] * len(batch)
        rest = [n for n in range(len(items)) if n not in done]
        for n in done:
            _key, work, args, _d = items[n]
            results[order[n]] = (True, work(None, *args))  # reads what prepare left
        if rest:
            self._transactions(items, rest, order, results)
        return results

    def _transactions(
        self, items: list[tuple], rest: list[int], order: list[int], results: list[Any]
    ) -> None:
        """The works ``rest`` (positions in ``items``) in one transaction, their audit
        records at its end; if it fails otherwise than by a lost connection, each again
        in a transaction of its own, so one failing work fails alone."""
        import psycopg

        def run(positions: list[int]) -> list[Any]:
            def transaction(cursor) -> list[Any]:
                _pending.records = []
                with cursor.connection.transaction():
                    out = [items[n][1](cursor, *items[n][2]) for n in positions]
                    records, _pending.records = _pending.records, []
                    if records:
                        insert_records(cursor, records)
                return out

            return self._attempts(transaction)

        try:
            for n, value in zip(rest, run(rest), strict=True):
                results[order[n]] = (True, value)
            return
        except psycopg.OperationalError:
            failure, alone = Failure(), False
        except Exception:
            failure, alone = Failure(), len(rest) > 1
        for n in rest:
            results[order[n]] = (False, failure)
            if alone:
                try:
                    results[order[n]] = (True, run([n])[0])
                except Exception:
                    results[order[n]] = (False, Failure())

    def _attempts(self, work: Callable[[Any], Any]) -> Any:
        """``work(cursor)`` on this thread's connection, again after a deadlock or a
        serialization failure (each changed nothing); a lost connection is closed."""
        import psycopg.errors

        conn = self._connection()
        for attempt in range(ATTEMPTS):
            try:
                with conn.cursor() as cursor:
                    return work(cursor)
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
                if attempt == ATTEMPTS - 1:
                    raise
            except psycopg.OperationalError:
                conn.close()  # a lost connection: the next transaction makes a new one
                raise
        raise AssertionError("unreachable")

    def _alone_each(self, batch: list[tuple], order: list[int]) -> list[tuple[bool, Any]]:
        """Each work of a failed batch in a batch of its own: one failing fails alone."""
        results: list[Any] = [None] * len(batch)
        for i in order:
            try:
                results[i] = self._execute([batch[i]])[0]
            except Exception:
                results[i] = (False, Failure())
        return results

    @staticmethod
    def add_record(cursor, record: str) -> None:
        """Queue one audit record in ``cursor``'s transaction: numbered at the end of
        the transaction, so the numbers follow the commits (see the module's doc)."""
        _pending.records.append(record)

    # --- Outbox API of the logger relay (on the reactor; the leader's rows) -----

    @property
    def sender_id(self) -> str:
        """The database's stable random id: every node relays as this one sender."""
        return self._sender_id

    def add_outbox_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the reactor when outbox rows arrive for the relay."""
        self._listeners.append(callback)

    def outbox_pending(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """Committed outbox rows with ``seq > after_seq``, ascending, at most ``limit``:
        none unless this node leads (its relay is then the only one sending)."""
        leading = self.leadership is not None and self.leadership.leading
        if not leading:
            return []
        rows = [row for row in self._rows if row[0] > after_seq][:limit]
        if len(rows) < limit:
            self.fetch_outbox()
        return rows

    def outbox_delete_through(self, seq: int) -> None:
        """Delete every outbox row up to ``seq`` (acknowledged by the logger), in a thread."""
        self._rows = [row for row in self._rows if row[0] > seq]
        self._deleted_through = max(self._deleted_through, seq)
        if self.pool is None:
            return
        d = self.transact(
            lambda cursor: cursor.execute("DELETE FROM outbox WHERE seq <= %s", (seq,))
        )
        d.addErrback(
            lambda failure: self.log.warn(
                "cannot delete relayed audit rows yet: {why}", why=failure.getErrorMessage()
            )
        )

    def outbox_count(self) -> int:
        """The rows the leader has fetched and not yet seen acknowledged (the metrics'
        backlog gauge; 0 on the other nodes)."""
        return len(self._rows)

    def records_added(self) -> None:
        """This node committed audit records: the leader reads them at once."""
        if self.leadership is not None and self.leadership.leading:
            self.fetch_outbox()

    def fetch_outbox(self) -> None:
        """Read the rows past those fetched (in a thread); tell the listeners of new ones."""
        if self._fetching:
            self._fetch_again = True
            return
        if self.pool is None or len(self._rows) >= OUTBOX_AHEAD:
            return
        self._fetching = True
        after = self._rows[-1][0] if self._rows else self._deleted_through
        d = self.transact(_read_outbox, after, OUTBOX_AHEAD - len(self._rows))
        d.addCallbacks(self._fetched, self._fetch_failed, (after,))

    def _fetched(self, rows: list[tuple[int, str]], after: int) -> None:
        self._fetching = False
        current = self._rows[-1][0] if self._rows else self._deleted_through
        rows = [row for row in rows if row[0] > current]  # deleted or reset meanwhile
        if after == current or rows:
            self._rows.extend(rows)
        if rows:
            for listener in list(self._listeners):
                try:
                    listener()
                except Exception:
                    self.log.failure("outbox listener failed")
        if self._fetch_again:
            self._fetch_again = False
            self.fetch_outbox()

    def _fetch_failed(self, failure) -> None:
        self._fetching = False
        self.log.warn("cannot read the outbox: {why}", why=failure.getErrorMessage())

    def leading_changed(self, leading: bool) -> None:
        """This node became the leader (read the outbox from its start) or stopped being it."""
        self._rows = []
        self._deleted_through = 0
        if leading:
            self.fetch_outbox()


def _read_outbox(cursor, after: int, limit: int) -> list[tuple[int, str]]:
    cursor.execute(
        "SELECT seq, record FROM outbox WHERE seq > %s ORDER BY seq LIMIT %s", (after, limit)
    )
    return cursor.fetchall()


class Leadership:
    """Whether this node leads the cluster: relays the outbox and expires leases.

    The leader holds ``pg_try_advisory_lock(LEADER_LOCK)`` on a connection used for
    nothing else, in a thread of its own. Every :data:`LEADER_TICK` a node that does
    not lead tries to take the lock; the leader checks that its session is alive. A
    leader killed or cut off loses its session, and with it the lock: the next node
    to try takes over (within a tick once the server noticed the session's end).
    While leading, the outbox is read every :data:`OUTBOX_POLL` seconds (the records
    other nodes commit) besides at once after this node's own.
    """

    log = Logger()

    def __init__(
        self,
        store: PgStore,
        reactor,
        on_change: Callable[[bool], None] | None = None,
        tick: float = LEADER_TICK,
        poll: float = OUTBOX_POLL,
    ) -> None:
        self.store = store
        self.reactor = reactor
        self.on_change = on_change
        self.leading = False
        self._conn = None
        self._pool = ThreadPool(1, 1, name="p2p-indexer-leader")
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        self._poll = LoopingCall(self._read)
        self._poll.clock = reactor
        self.tick = tick
        self.poll = poll
        self._checking = False
        store.leadership = self

    def start(self) -> None:
        self._pool.start()
        self._loop.start(self.tick, now=True)

    def stop(self) -> None:
        for loop in (self._loop, self._poll):
            if loop.running:
                loop.stop()
        if self._pool.started:
            self._pool.callInThread(self._close)
            self._pool.stop()
        self._set(False)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # ends the session: the lock is free at once

    def _check(self) -> None:
        if self._checking or not self._pool.started:
            return
        self._checking = True
        d = deferToThreadPool(self.reactor, self._pool, self._try)
        d.addCallbacks(self._checked, self._failed)

    def _try(self) -> tuple[bool, int]:
        """In the leader thread: keep or take the lock (True while it is held), and
        count the cluster's connected users (the metrics' gauge, refreshed each tick)."""
        import psycopg

        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = conn = psycopg.connect(self.store.uri, autocommit=True)
            conn.execute("SET application_name = 'p2p-indexer leader'")
            held = False
        else:
            held = self.leading
        try:
            if not held:
                held = bool(
                    conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]
                )
            count = conn.execute("SELECT count(*) FROM users WHERE ip IS NOT NULL").fetchone()[0]
            return held, count
        except psycopg.Error:
            self._close()
            raise

    def _checked(self, result: tuple[bool, int]) -> None:
        self._checking = False
        leading, self.store.connected_users = result
        self._set(leading)

    def _failed(self, failure) -> None:
        self._checking = False
        if self.leading:
            self.log.warn("lost the leader's session: {why}", why=failure.getErrorMessage())
        self._set(False)

    def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        self.log.info(
            "this node {what} the cluster's leader", what="is" if leading else "is no longer"
        )
        if leading and not self._poll.running:
            self._poll.start(self.poll, now=False)
        elif not leading and self._poll.running:
            self._poll.stop()
        self.store.leading_changed(leading)
        if self.on_change is not None:
            self.on_change(leading)

    def _read(self) -> None:
        self.store.fetch_outbox()
