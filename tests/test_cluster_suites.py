"""More end-to-end suites re-run against a PostgreSQL-backed indexer.

Each class here is an SQLite suite with ``on_postgres = True``: its indexers start on
a fresh database of the throwaway PostgreSQL server (tests/postgres.py) through
:func:`tests.test_indexer_e2e.indexer_db`. Where a test reads the SQLite file beside
the node, the subclass reads the same thing from the PostgreSQL database instead.
Suites whose tests are synchronous (the in-memory harness of
tests/test_indexer_protocol.py) run on :class:`PgHarness`.

Not here, on purpose: tests/test_client_tty.py (the shell in a terminal, against a
stand-in classic indexer of the test's own: no indexer of ours runs), the SQLite
file's own cases (start failures of the file, ``p2p-admin`` on a file: the
PostgreSQL forms are :class:`StartFailuresOnPostgres` and
tests/test_indexer_admin.py), and the tests that never reach the node (named in
each class's docstring).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer import protocol as protocol_module
from p2p.indexer.pgstore import PgStore
from tests import postgres, test_indexer_protocol, test_indexer_search
from tests import test_client_e2e as client_e2e
from tests import test_client_identity as client_identity
from tests import test_client_liveness as client_liveness
from tests import test_client_tls as client_tls
from tests import test_client_transfer as client_transfer
from tests import test_harden_fairness as harden_fairness
from tests import test_harden_indexer as harden_indexer
from tests import test_harden_listing as harden_listing
from tests import test_harden_start as harden_start
from tests import test_indexer_search_e2e as search_e2e
from tests import test_indexer_sources as indexer_sources
from tests import test_logger_indexer as logger_indexer
from tests import test_metrics_e2e as metrics_e2e
from tests import test_names_e2e as names_e2e
from tests import test_peer_range_e2e as peer_range_e2e
from tests import test_peer_tls_e2e as peer_tls_e2e
from tests import test_search_e2e as search_client_e2e
from tests import test_shell_names as shell_names
from tests import test_stack as stack
from tests import test_tour as tour
from tests.test_indexer_e2e import indexer_db


class IndexerToLoggerOnPostgres(logger_indexer.IndexerToLoggerTests):
    """The audit relay from the PostgreSQL outbox: exactly once, in order."""

    on_postgres = True

    def outbox_count(self) -> int:
        """Rows waiting in the outbox of the test's PostgreSQL database."""
        import psycopg

        with psycopg.connect(self.postgres_uri) as conn:
            return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


class IndexerMetricsOnPostgres(metrics_e2e.IndexerMetricsTests):
    """The PostgreSQL node's ``/metrics``."""

    on_postgres = True


class CommandLineOnPostgres(client_e2e.CommandLineTests):
    """Every line of the shell against a PostgreSQL-backed node."""

    on_postgres = True

    def test_user_gone_and_indexer_down(self):
        """The indexer restarted with nothing kept (SQLite's ``:memory:``) is, on
        PostgreSQL, a node started on a new, empty database: alice no longer exists."""
        new_database_at_each_start(self, self.stack)
        return super().test_user_gone_and_indexer_down()


def new_database_at_each_start(testcase: TestCase, stack: client_e2e.Stack) -> None:
    """Make each ``stack.start_indexer()`` start its node on a new, empty PostgreSQL
    database: what a restarted ``--db :memory:`` indexer is on SQLite."""
    start = stack.start_indexer

    def start_on_a_new_database(*args, **kwargs):
        testcase.postgres_uri = postgres.database(testcase)
        return start(*args, **kwargs)

    stack.start_indexer = start_on_a_new_database


class LiveClientOnPostgres(client_liveness.LiveClientTests):
    """Our client's lease kept by a PostgreSQL-backed node."""

    on_postgres = True


class ClaimedNamesOnPostgres(names_e2e.ClaimedNamesTests):
    """Claimed names (TLS identities) kept in PostgreSQL."""

    on_postgres = True


class IndexerFloodOnPostgres(harden_fairness.IndexerFlood):
    """A PostgreSQL-backed node under a flood from one address."""

    on_postgres = True


class LoggerFloodOnPostgres(harden_fairness.LoggerFlood):
    """The relay from the PostgreSQL outbox to a flooded logger."""

    on_postgres = True


class SourcesOverTheWireOnPostgres(search_e2e.SourcesOverTheWire):
    """SOURCES answered from PostgreSQL."""

    on_postgres = True


class SearchEndToEndOnPostgres(search_client_e2e.SearchEndToEndTests):
    """Our client's SEARCH and download by hash through a PostgreSQL-backed node."""

    on_postgres = True


class TwoClientsOnPostgres(client_transfer.TwoClientTests):
    """Two shells sharing files through a PostgreSQL-backed node."""

    on_postgres = True


class ShellNamesOnPostgres(shell_names.EndToEndTests):
    """The shell's user names against a PostgreSQL-backed node."""

    on_postgres = True


class HardenedOnPostgres(harden_indexer.EndToEnd):
    """Slowloris, resets mid-reply, half-close and the connection cap on a
    PostgreSQL-backed node."""

    on_postgres = True


class MoveIdentityOnPostgres(client_identity.MoveIdentityTests):
    """An identity moved to another machine, its name claimed in PostgreSQL."""

    on_postgres = True


class RecordedTrafficOnPostgres(client_tls.RecordedTrafficTests):
    """What our client sends, recorded, against a PostgreSQL-backed node."""

    on_postgres = True


class ThreeClientsOnPostgres(client_transfer.ThreeClientTests):
    """Three shells downloading from each other at once through a PostgreSQL-backed node."""

    on_postgres = True


class PeerTLSOnPostgres(peer_tls_e2e.PeerTLSEndToEndTests):
    """Peer TLS end to end: the peer's key, pinned through LIST_PEERS, read from
    PostgreSQL (a hijacked address cannot serve the download)."""

    on_postgres = True


class StackOnPostgres(stack.StackProcessTests):
    """``twistd p2p-stack --db postgresql://...``: its node leads and relays to the
    stack's logger, and Ctrl-C stops it cleanly."""

    on_postgres = True


class TourOnPostgres(tour.TourTests):
    """The README's tour on a stack whose indexer is a PostgreSQL node."""

    on_postgres = True


class NeverReadingReadersOnPostgres(harden_listing.NeverReadingReadersTests):
    """100 readers that never read a 4 MB listing cost a PostgreSQL node one listing."""

    on_postgres = True

    def database(self) -> str:
        import psycopg

        from p2p.indexer.pgdirectory import file_words
        from p2p.indexer.pgstore import PgStore

        uri = indexer_db(self, "")
        store = PgStore(uri)
        store.open()  # the tables, as a node makes them
        store.close()
        with psycopg.connect(uri) as conn:
            conn.execute(
                "INSERT INTO users (name, ip, port, connected, lease_until) VALUES"
                " ('big', '127.0.0.1', 4000, 1, 1e12), ('reader', '127.0.0.1', 4000, 2, 1e12)"
            )
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO files (owner, name, description, words)"
                    " VALUES ('big', %s, %s, array_to_tsvector(%s))",
                    [(n, d, file_words(n, d)) for n, d in harden_listing.big_files()],
                )
        return uri


class StartFailuresOnPostgres(TestCase):
    """A PostgreSQL node that cannot start: one ``s> ... cannot ...`` line, no traceback,
    a non-zero status, logging to the terminal and with ``--logfile`` (its thread pools
    must not keep the process alive).

    Not a subclass: most of ``StartFailures`` is about the SQLite file (not a database,
    truncated, a foreign or unreadable file, orphan rows, the key file beside it), and
    its logger and time cases never start an indexer; the cases that apply to a node
    are here, on a fresh PostgreSQL database.
    """

    on_postgres = True
    assert_one_line = harden_start.StartFailures.assert_one_line

    def indexer(self, *options: str, names: str, db: str | None = None):
        db = db if db is not None else indexer_db(self, "")
        options = ("--db", db, "--listen", "tcp:0:interface=127.0.0.1", *options)
        return self.assert_one_line(harden_start.folder(self), "p2p-indexer", options, names)

    @defer.inlineCallbacks
    def test_a_database_it_cannot_reach(self):
        line = yield self.indexer(
            names="/nonexistent", db="postgresql://p2p:secret@/nodb?host=/nonexistent"
        )
        self.assertIn("check the URI", line)
        self.assertNotIn("secret", line)

    @defer.inlineCallbacks
    def test_indexer_port_taken(self):
        port = harden_start.taken_port(self)
        line = yield self.assert_one_line(
            harden_start.folder(self),
            "p2p-indexer",
            ["--db", indexer_db(self, ""), "--listen", f"tcp:{port}:interface=127.0.0.1"],
            str(port),
        )
        self.assertIn("choose another --listen", line)

    @defer.inlineCallbacks
    def test_unusable_key_files(self):
        cwd = harden_start.folder(self)
        (cwd / "key.pem").write_bytes(b"junk")
        for cert in ("key.pem", "missing.pem"):
            options = ["--tls-key", str(cwd / "key.pem"), "--tls-cert", str(cwd / cert)]
            yield self.indexer(*options, names=cert)

    @defer.inlineCallbacks
    def test_stack_says_which_part_once(self):
        common = [
            "--indexer-listen=tcp:0:interface=127.0.0.1",
            "--time-listen=tcp:0:interface=127.0.0.1",
            "--logger-listen=tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
            harden_start.NOWHERE,
        ]
        line = yield self.assert_one_line(
            harden_start.folder(self),
            "p2p-stack",
            [*common, "--db=postgresql:///nodb?host=/nonexistent"],
            "cannot start the stack: indexer cannot start: postgresql:///nodb?host=/nonexistent",
        )
        self.assertIn("check the URI", line)


class BlockingPipe:
    """The node's statement pipe, run in the caller's thread: each request is its own
    batch, the same statement (``ClusterDirectory._statement``) and decoding
    (:func:`p2p.indexer.pgrules.decode_batch`), answered before :meth:`submit` returns."""

    def __init__(self, uri: str, statement) -> None:
        import psycopg

        self.conn = psycopg.connect(uri, autocommit=True)
        self.statement = statement

    def submit(self, key: str, request: dict) -> defer.Deferred:
        from psycopg import pq

        from p2p.indexer.pgrules import decode_batch

        sql, params = self.statement([request])
        result = self.conn.pgconn.exec_params(sql, params)
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise RuntimeError(result.error_message.decode())
        return defer.succeed(decode_batch(result.get_value(0, 0))[0])

    def close(self) -> None:
        self.conn.close()


class PgHarness(test_indexer_protocol.Harness):
    """:class:`tests.test_indexer_protocol.Harness` on a PostgreSQL node: the node's
    factory and directory on a memory reactor, over the test's fresh database, each
    request's statement run at once (:class:`BlockingPipe`), so a synchronous test
    reads its reply as it does from the SQLite harness."""

    def __init__(self, testcase: TestCase, audit: bool = False, **kwargs) -> None:
        from p2p.indexer.pgdirectory import ClusterDirectory
        from p2p.indexer.pgservice import ClusterFactory

        testcase.on_postgres = True
        self.clock = MemoryReactorClock()
        self.store = BlockingPgStore(indexer_db(testcase, ""), reactor=self.clock)
        self.directory = ClusterDirectory(self.store, audit=audit)
        self.store.open()  # the tables and the rules' functions
        testcase.addCleanup(self.store.close)
        self.directory.pipe = BlockingPipe(self.store.uri, self.directory._statement)
        # What the SQLite suites read from the in-memory directory and the store's
        # outbox, read from the database instead.
        reader = Reader(self.store.uri)
        testcase.addCleanup(reader.close)
        self.directory.users = DatabaseUsers(reader)
        self.directory.connected = DatabaseUsers(reader, connected=True)
        self.store.db = SQLiteLike(reader)
        self.store.outbox_count = lambda: reader.rows(OUTBOX_COUNT)[0][0]
        self.store.outbox_pending = lambda after, limit: reader.rows(OUTBOX_PENDING, (after, limit))
        self.factory = ClusterFactory(self.directory, self.clock, **kwargs)
        self.lines: list[str] = []
        testcase.patch(protocol_module, "say", self.lines.append)


class BlockingPgStore(PgStore):
    """The node's store, each transaction run at once in the caller's thread (SEARCH's,
    the liveness upkeep's): what :class:`PgHarness` needs to answer synchronously."""

    def transact(self, work, *args, key: str = "") -> defer.Deferred:
        try:
            ok, value = self._execute([(key, work, args, None)])[0]
        except Exception:
            return defer.fail()
        return defer.succeed(value) if ok else defer.fail(value)


class _Rows(list):
    """Rows as an SQLite cursor gives them: iterated, or ``fetchall()``."""

    def fetchall(self) -> list:
        return list(self)


class SQLiteLike:
    """``store.db.execute(sql)`` of the SQLite suites (their snapshots of the tables),
    on the PostgreSQL database: ``ORDER BY rowid`` becomes the tables' first column."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def execute(self, sql: str) -> _Rows:
        return _Rows(self.reader.rows(sql.replace("ORDER BY rowid", "ORDER BY 1")))


OUTBOX_COUNT = "SELECT count(*) FROM outbox"
OUTBOX_PENDING = "SELECT seq, record FROM outbox WHERE seq > %s ORDER BY seq LIMIT %s"


class Reader:
    """Queries on the test's database, over one connection of the harness's."""

    def __init__(self, uri: str) -> None:
        import psycopg

        self.conn = psycopg.connect(uri, autocommit=True)

    def rows(self, query: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(query, args).fetchall()

    def close(self) -> None:
        self.conn.close()


class DatabaseUsers(Mapping):
    """The SQLite directory's ``users`` (name: its files and address) or, with
    ``connected``, its ``connected`` (name: address), read from the database."""

    def __init__(self, reader: Reader, connected: bool = False) -> None:
        self.reader = reader
        self.connected = connected

    def __getitem__(self, name: str):
        found = self.reader.rows("SELECT ip, port FROM users WHERE name = %s", (name,))
        address = tuple(found[0]) if found and found[0][0] is not None else None
        if not found or (self.connected and address is None):
            raise KeyError(name)
        if self.connected:
            return address
        files = self.reader.rows(
            "SELECT name, description FROM files WHERE owner = %s ORDER BY id", (name,)
        )
        return SimpleNamespace(address=address, files=dict(files))

    def __iter__(self):
        where = " WHERE ip IS NOT NULL" if self.connected else ""
        return iter([n for (n,) in self.reader.rows(f"SELECT name FROM users{where}")])

    def __len__(self) -> int:
        return len(list(iter(self)))


class SourcesOnPostgres(indexer_sources.Sources):
    """SOURCES' listing rules and codes from the PostgreSQL node's rules (p2p_request)
    and factory. (``Policies`` and ``ClientSide`` stay SQLite's: the first drives the
    in-memory ``Directory`` and its store directly, the second is the client's side
    against a fake indexer; SOURCES' claim, read-only and audit checks on PostgreSQL
    are the ones every operation shares, run in ``ClaimedNamesOnPostgres`` and the
    relay suites.)"""

    harness = PgHarness


class RangeRepublishOnPostgres(TestCase):
    """A file changed under a running shell is published again (PUBLISH_FILE
    ``replace``) to a PostgreSQL-backed node, and RANGE serves the new bytes.

    Of ``RangeEndToEndTests`` only this test asks the node anything beyond the setUp's
    REGISTER, CONNECT, PUBLISH and LIST_USERS (run here too); its other three speak
    the peer protocol to alice's port alone (RANGE and PIECES codes, TLS on the same
    port, the upload rate, which takes its 2 s by design), so they stay SQLite's.
    """

    on_postgres = True
    timeout = peer_range_e2e.RangeEndToEndTests.timeout
    setUp = peer_range_e2e.RangeEndToEndTests.setUp
    test_a_changed_file_is_1_and_published_again = (
        peer_range_e2e.RangeEndToEndTests.test_a_changed_file_is_1_and_published_again
    )


class ProtocolTableOnPostgres(test_indexer_protocol.ProtocolTable):
    """Every operation's codes and operator lines from the PostgreSQL node's rules."""

    harness = PgHarness


class BadInputOnPostgres(test_indexer_protocol.BadInput):
    """Malformed requests against the PostgreSQL node: refused alike, nothing stored."""

    harness = PgHarness


class AuditOnPostgres(test_indexer_protocol.Audit):
    """One outbox record per request, none for bad input, on PostgreSQL.
    (``GroupCommit`` stays SQLite's: a PostgreSQL node commits each batch itself.)"""

    harness = PgHarness


def long_listing_harness(testcase: TestCase) -> PgHarness:
    """A node where bob (connected) may list alice's 70 files: a long listing."""
    h = PgHarness(testcase)
    h.given(("REGISTER", "alice"), ("REGISTER", "bob"), ("CONNECT", "alice", 5000))
    h.given(("CONNECT", "bob", 5001))
    for i in range(70):
        h.given(("PUBLISH", "alice", f"f{i:03d}", "same"))
    return h


class LongListingsOnPostgres(TestCase):
    """A node sends a long owner listing it holds again only while the server says the
    owner's files are unchanged (their digest): every change shows at once."""

    def setUp(self) -> None:
        self.h = long_listing_harness(self)
        self.results: list[dict] = []  # what the server answered each request
        pipe = self.h.directory.pipe
        submit = pipe.submit

        def spy(key, request):
            d = submit(key, request)
            return d.addCallback(lambda result: self.results.append(result) or result)

        pipe.submit = spy

    def listing(self, op: str = "LIST_CONTENT", owner: str = "alice") -> list[tuple]:
        return test_indexer_search.rows(self.h.request(op, "bob", owner), 2)

    def test_unchanged_is_not_sent_again_and_a_change_is(self) -> None:
        first = self.h.request("LIST_CONTENT", "bob", "alice")
        self.assertIn("rows", self.results[-1])
        again = self.h.request("LIST_CONTENT", "bob", "alice")
        self.assertEqual(again, first)
        self.assertNotIn("rows", self.results[-1])  # the digest alone came back
        self.assertEqual(self.h.request("PUBLISH", "alice", "new", "added"), b"\0")
        names = [row[0] for row in self.listing()]
        self.assertEqual(names[-1], "new")
        self.assertEqual(len(names), 71)
        self.assertEqual(self.h.request("PUBLISH", "alice", "new", "again"), b"\3")
        self.assertEqual(self.h.request("DELETE", "alice", "f000"), b"\0")
        self.assertNotIn("f000", [row[0] for row in self.listing()])

    def test_a_description_replaced_in_place_shows(self) -> None:
        """PUBLISH_FILE ``replace`` keeps the row, changes its description."""
        self.h.request("LIST_FILES", "bob", "alice")  # held now
        self.h.request("LIST_CONTENT", "bob", "alice")
        reply = self.h.request("PUBLISH_FILE", "alice", "f001", "changed", 5, "ab" * 32, "replace")
        self.assertEqual(reply, b"\0")
        rows = test_indexer_search.rows(self.h.request("LIST_FILES", "bob", "alice"), 4)
        self.assertEqual(rows[1], ("f001", "changed", "5", "ab" * 32))
        # LIST_CONTENT of the same owner is a listing of its own.
        self.assertEqual(self.listing()[1], ("f001", "changed"))

    def test_a_name_registered_again_is_a_new_owner(self) -> None:
        """alice unregistered and registered again with other files: the listing
        held for the old alice is never sent for the new one."""
        before = self.listing()
        self.assertEqual(len(before), 70)
        self.h.given(("DISCONNECT", "alice"), ("UNREGISTER", "alice"), ("REGISTER", "alice"))
        self.h.given(("CONNECT", "alice", 5000))
        for i in range(70):
            self.h.given(("PUBLISH", "alice", f"g{i:03d}", "other"))
        self.assertEqual([row[0] for row in self.listing()][:2], ["g000", "g001"])


class SameInBatchOnPostgres(TestCase):
    """``p2p_batch`` called directly: a repeat of a long listing in one batch comes back
    as ``{"same": n}`` only for a request that asks for it (``share``, sent by nodes
    that resolve it), and only while it equals the last listing of its kind."""

    def setUp(self) -> None:
        self.h = long_listing_harness(self)

    def request(self, op: wire.OpSpec, user: str, *args) -> dict:
        return dict(self.h.directory.request(op, user, list(args), None, None, None, False))

    def batch(self, *requests: dict) -> list[dict]:
        """The results exactly as ``p2p_batch`` returned them (``same`` unresolved)."""
        from psycopg import pq

        sql, params = self.h.directory._statement(list(requests))
        result = self.h.directory.pipe.conn.pgconn.exec_params(sql, params)
        self.assertEqual(result.status, pq.ExecStatus.TUPLES_OK, result.error_message)
        return json.loads(result.get_value(0, 0))

    def test_without_share_every_repeat_has_its_rows(self) -> None:
        """A node of the version before ``same`` (it never sends ``share``) running
        these rules during a rolling upgrade reads rows in every result."""
        listing = self.request(wire.LIST_CONTENT, "bob", "alice")
        self.assertIs(listing.pop("share"), True)
        results = self.batch(listing, dict(listing))
        for result in results:
            self.assertNotIn("same", result)
            self.assertEqual(len(result["rows"]), 70)
        self.assertEqual(results[0]["rows"], results[1]["rows"])

    def test_a_change_between_repeats_is_a_listing_of_its_own(self) -> None:
        listing = self.request(wire.LIST_CONTENT, "bob", "alice")
        publish = self.request(wire.PUBLISH, "alice", "new", "added")
        results = self.batch(listing, publish, dict(listing), dict(listing))
        self.assertEqual(len(results[0]["rows"]), 70)
        self.assertEqual(results[1]["code"], 0)
        self.assertNotIn("same", results[2])
        self.assertEqual(len(results[2]["rows"]), 71)
        self.assertEqual(results[2]["rows"][-1], ["new", "added"])
        # Nothing changed since the second: it is named, its rows not sent again.
        self.assertEqual(results[3]["same"], 2)
        self.assertNotIn("rows", results[3])
        self.assertEqual(results[3]["code"], 0)


class FuzzOnPostgres(harden_indexer.Fuzz):
    """Thousands of random requests, split anywhere, against the reference model of
    protocol.md section 1, answered by the PostgreSQL node's rules."""

    harness = PgHarness
