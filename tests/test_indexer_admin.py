"""``p2p-admin release``: a claimed name whose identity was lost, made free again."""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer import admin
from p2p.indexer.admin import AdminError, prune, release
from p2p.indexer.pgstore import insert_records
from p2p.indexer.store import Store, lock_database, unlock_database
from tests import postgres
from tests.support import deadline, hold_port, run_command
from tests.test_indexer_cluster import start_nodes
from tests.test_indexer_tls import (
    ALICE,
    FINGERPRINT,
    MALLORY,
    codes_as,
    codes_over,
    folder,
    start,
    tls_client,
)
from tests.test_liveness_e2e import TIMEOUT

DT = "17/12/2014 13:20:35"
ADMIN = [sys.executable, "-m", "p2p.indexer.admin"]


class Release(TestCase):
    def setUp(self) -> None:
        self.db = self.mktemp()
        store = Store(self.db)
        store.open()
        store.add_user("alice", ALICE.fingerprint)
        store.set_address("alice", ("127.0.0.1", 5000))
        store.add_file("alice", "a.txt", "alice's file")
        store.add_user("bob")
        store.commit()
        store.close()

    def reopen(self) -> Store:
        store = Store(self.db)
        store.open()
        self.addCleanup(store.close)
        return store

    def test_release_removes_user_files_claim_and_address(self) -> None:
        said = release(self.db, "alice", DT)
        self.assertIn("released alice", said)
        self.assertIn(ALICE.fingerprint, said)
        store = self.reopen()
        self.assertIsNone(store.user("alice"))
        self.assertEqual(store.db.execute("SELECT * FROM files").fetchall(), [])
        self.assertEqual([r for _, r in store.outbox_pending(0, 10)], [f"alice RELEASE {DT}"])
        self.assertEqual(list(store.load()), ["bob"])

    def assertRefused(self, db: str, name: str, said: str) -> None:
        before = Path(self.db).read_bytes() if Path(self.db).exists() else None
        with self.assertRaises(AdminError) as caught:
            release(db, name, DT)
        self.assertIn(said, str(caught.exception))
        if before is not None:
            self.assertEqual(Path(self.db).read_bytes(), before)

    def test_no_such_name(self) -> None:
        self.assertRefused(self.db, "carol", "no such name")

    def test_name_not_claimed(self) -> None:
        self.assertRefused(self.db, "bob", "bob is not claimed")

    def test_no_such_database(self) -> None:
        missing = self.mktemp()
        self.assertRefused(missing, "alice", f"no such database: {missing}")
        self.assertFalse(Path(missing).exists())  # not created either

    def test_memory_database(self) -> None:
        self.assertRefused(":memory:", "alice", "nothing to release")

    def test_not_an_indexer_database(self) -> None:
        other = Path(self.mktemp())
        other.write_bytes(b"some text, not SQLite" * 100)
        self.assertRefused(str(other), "alice", "is not an indexer database")
        empty = Path(self.mktemp())
        empty.write_bytes(b"")  # SQLite reads an empty file as an empty database
        self.assertRefused(str(empty), "alice", "has no users table")

    def test_database_in_use(self) -> None:
        lock = lock_database(self.db)
        self.addCleanup(unlock_database, lock)
        self.assertRefused(self.db, "alice", "stop the indexer first")
        self.assertEqual(self.reopen().user("alice").identity, ALICE.fingerprint)


class CommandLine(TestCase):
    @defer.inlineCallbacks
    def test_usage_errors(self):
        for argv in ([], ["release"], ["release", "a", "b"], ["frob"], ["release", "a", "--db"]):
            _out, err, code = yield run_command([*ADMIN, *argv])
            self.assertEqual(code, 2, argv)
            self.assertIn(b"p2p-admin: ", err, argv)

    @defer.inlineCallbacks
    def test_options_before_or_after_the_name(self):
        db = self.mktemp()
        for argv in (["alice", "--db", db], [f"--db={db}", "alice"]):
            out, err, code = yield run_command([*ADMIN, "release", *argv])
            self.assertEqual((out, code), (b"", 1), argv)
            self.assertIn(f"no such database: {db}".encode(), err, argv)


class EndToEnd(TestCase):
    @defer.inlineCallbacks
    def test_release_a_lost_identity(self):
        cwd = folder(self)
        ix, fp = yield start(self, cwd=cwd)
        got = yield codes_as(
            self,
            ix.port,
            fp,
            ALICE,
            ("REGISTER", "alice"),
            ("CONNECT", "alice", 5000),
            ("PUBLISH", "alice", "a.txt", "alice's file"),
        )
        self.assertEqual(got, [0, 0, 0])
        # While the indexer runs: refused, nothing changed.
        out, err, code = yield run_command([*ADMIN, "release", "alice", "--db", "ix.db"], cwd=cwd)
        self.assertEqual((out, code), (b"", 1))
        self.assertIn(b"stop the indexer first", err)
        got = yield codes_as(self, ix.port, fp, ALICE, ("LIST_CONTENT", "alice", "alice"))
        self.assertEqual(got, [0])
        yield ix.process.stop()
        # Stopped: released; a second time there is no such name.
        out, err, code = yield run_command([*ADMIN, "release", "alice", "--db", "ix.db"], cwd=cwd)
        self.assertEqual((err, code), (b"", 0), err)
        self.assertIn(b"p2p-admin: released alice", out)
        out, err, code = yield run_command([*ADMIN, "release", "alice", "--db", "ix.db"], cwd=cwd)
        self.assertEqual((out, code), (b"", 1))
        self.assertIn(b"no such name", err)
        # The name is free: another identity registers and claims it.
        ix, fp = yield start(self, cwd=cwd)
        mallory = yield tls_client(self, ix.port, fp, MALLORY)
        reply = yield mallory.request("REGISTER", "alice")
        self.assertEqual(reply, b"\0")
        reply = yield mallory.request("CONNECT", "alice", 6000)
        self.assertEqual(reply, b"\0")
        peers = yield mallory.request("LIST_PEERS", "alice")
        self.assertEqual(
            peers, b"\0" + wire.encode_listing([("alice", "127.0.0.1", 6000, MALLORY.fingerprint)])
        )
        got = yield codes_as(self, ix.port, fp, ALICE, ("DISCONNECT", "alice"))
        self.assertEqual(got, [wire.DISCONNECT.error])  # the old identity is nobody now
        with closing(sqlite3.connect(cwd / "ix.db")) as db:
            records = [r for (r,) in db.execute("SELECT record FROM outbox")]
        self.assertEqual([r.rsplit(" ", 2)[0] for r in records], ["alice RELEASE"])


def pg_indexer_database(testcase: TestCase) -> str:
    """A fresh PostgreSQL database with the indexer's tables (as a node creates them)
    and alice (claimed, connected, two files) and bob (unclaimed); its URI."""
    import psycopg

    from p2p.indexer.pgstore import PgStore

    uri = postgres.database(testcase)
    store = PgStore(uri)
    store.open()
    store.close()
    with psycopg.connect(uri) as conn:
        conn.execute(
            "INSERT INTO users (name, ip, port, identity, connected) VALUES"
            " ('alice', '127.0.0.1', 5000, %s, 1), ('bob', NULL, NULL, NULL, NULL)",
            (ALICE.fingerprint,),
        )
        conn.execute(
            "INSERT INTO files (owner, name, description, words) VALUES"
            " ('alice', 'a.txt', 'one', ''::tsvector), ('alice', 'b.txt', 'two', ''::tsvector),"
            " ('bob', 'c.txt', 'three', ''::tsvector)"
        )
        # Two records a node committed before: the release's is numbered after them.
        insert_records(conn.cursor(), ["bob REGISTER x", "alice CONNECT y"])
    return uri


def pg_rows(uri: str, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(uri) as conn:
        return conn.execute(query).fetchall()


def pg_everything(uri: str, users: str = "*") -> list[list[tuple]]:
    """Every row the admin commands may touch (of ``users``, those columns), to see that
    a refusal changed nothing."""
    return [
        pg_rows(uri, f"SELECT {users} FROM users ORDER BY name"),
        pg_rows(uri, "SELECT owner, name FROM files ORDER BY id"),
        pg_rows(uri, "SELECT * FROM outbox ORDER BY seq"),
        pg_rows(uri, "SELECT * FROM outbox_counter"),
    ]


class ReleaseOnPostgres(TestCase):
    """``release`` and ``prune`` on the throwaway PostgreSQL server (tests/postgres.py)."""

    def setUp(self) -> None:
        self.uri = pg_indexer_database(self)

    def test_release_removes_user_files_claim_and_address(self) -> None:
        said = release(self.uri, "alice", DT)
        self.assertIn("released alice", said)
        self.assertIn(ALICE.fingerprint, said)
        self.assertIn("2 published file(s) removed", said)
        self.assertEqual(pg_rows(self.uri, "SELECT name FROM users"), [("bob",)])
        self.assertEqual(pg_rows(self.uri, "SELECT owner FROM files"), [("bob",)])
        # Numbered through the counter, after the records committed before it.
        self.assertEqual(
            pg_rows(self.uri, "SELECT seq, record FROM outbox ORDER BY seq"),
            [(1, "bob REGISTER x"), (2, "alice CONNECT y"), (3, f"alice RELEASE {DT}")],
        )
        self.assertEqual(pg_rows(self.uri, "SELECT seq FROM outbox_counter"), [(3,)])

    def assertRefused(self, uri: str, name: str, said: str) -> AdminError:
        before = pg_everything(self.uri)
        with self.assertRaises(AdminError) as caught:
            release(uri, name, DT)
        self.assertIn(said, str(caught.exception))
        self.assertEqual(pg_everything(self.uri), before)
        return caught.exception

    def test_no_such_name_and_not_claimed(self) -> None:
        self.assertRefused(self.uri, "carol", "no such name")
        self.assertRefused(self.uri, "bob", "bob is not claimed")

    def test_hostile_names_are_only_names(self) -> None:
        """Quotes, SQL and LIKE patterns in NAME match no user and change nothing."""
        for name in ("alice' OR '1'='1", "alice'; DELETE FROM users; --", "%", "ali_e", ""):
            self.assertRefused(self.uri, name, "no such name")

    def test_not_an_indexer_database(self) -> None:
        """A database without the indexer's tables is refused and left as it was."""
        other = postgres.database(self)
        self.assertRefused(other, "alice", "is not an indexer database (no users table)")
        self.assertEqual(
            pg_rows(other, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"), [(0,)]
        )
        with self.assertRaises(AdminError) as caught:
            prune(other)
        self.assertIn("is not an indexer database", str(caught.exception))

    def test_unreachable_server_keeps_the_password_to_itself(self) -> None:
        missing = Path(self.mktemp()).resolve()
        uri = f"postgresql://p2p:s3cret@/p2p?host={missing}"
        error = self.assertRefused(uri, "alice", "***")
        self.assertNotIn("s3cret", str(error))

    def test_waits_for_a_node_then_refuses(self) -> None:
        """A node holding alice's row (a request under way) delays the release; one
        that holds it past LOCK_TIMEOUT gets it refused, nothing changed."""
        import psycopg

        self.patch(admin, "LOCK_TIMEOUT", 0.2)
        with psycopg.connect(self.uri) as node:
            node.execute("SELECT 1 FROM users WHERE name = 'alice' FOR UPDATE")
            self.assertRefused(self.uri, "alice", "try again")
        self.assertIn("released alice", release(self.uri, "alice", DT))

    def test_prune(self) -> None:
        """The schema's foreign key keeps orphans out; one made by hand (the key
        dropped) is pruned, and nothing else."""
        self.assertIn("pruned 0 published file(s)", prune(self.uri))
        import psycopg

        with psycopg.connect(self.uri) as conn:
            conn.execute("ALTER TABLE files DROP CONSTRAINT files_owner_fkey")
            conn.execute(
                "INSERT INTO files (owner, name, description, words)"
                " VALUES ('ghost', 'g.txt', 'orphan', ''::tsvector)"
            )
        self.assertIn("pruned 1 published file(s)", prune(self.uri))
        self.assertEqual(
            pg_rows(self.uri, "SELECT owner, name FROM files ORDER BY id"),
            [("alice", "a.txt"), ("alice", "b.txt"), ("bob", "c.txt")],
        )


class EndToEndOnPostgres(TestCase):
    """``p2p-admin release`` while two PostgreSQL-backed nodes run."""

    @defer.inlineCallbacks
    def test_release_while_the_nodes_run(self):
        dead = f"tcp:host=127.0.0.1:port={hold_port(self)}"  # records stay in the outbox
        a, b = yield start_nodes(self, 2, "--peer-timeout", str(TIMEOUT), "--logger", dead)
        match = yield a.process.wait_for_line(FINGERPRINT)
        fp = match.group(1)
        alice = yield tls_client(self, a.port, fp, ALICE)
        got = yield codes_over(
            alice,
            ("REGISTER", "alice"),
            ("CONNECT", "alice", hold_port(self)),
            ("PUBLISH", "alice", "a.txt", "alice's file"),
            ("HOLD", "alice"),
        )
        self.assertEqual(got, [0, 0, 0, 0])
        codes = yield b.codes(("REGISTER", "bob"))
        self.assertEqual(codes, [0])
        # Released through the command line while both nodes run.
        out, err, code = yield run_command([*ADMIN, "release", "alice", "--db", self.postgres_uri])
        self.assertEqual((err, code), (b"", 0), err)
        self.assertIn(b"p2p-admin: released alice", out)
        # Node A closes the connection holding alice's lease (its renewal finds it gone).
        yield deadline(alice.closed)
        # Node B: no such user; the name is free for another identity.
        got = yield codes_as(self, b.port, fp, ALICE, ("LIST_CONTENT", "alice", "alice"))
        self.assertEqual(got, [wire.LIST_CONTENT.no_user])
        mallory = yield tls_client(self, b.port, fp, MALLORY)
        got = yield codes_over(mallory, ("REGISTER", "alice"), ("CONNECT", "alice", 6000))
        self.assertEqual(got, [0, 0])
        peers = yield mallory.request("LIST_PEERS", "alice")
        self.assertEqual(
            peers, b"\0" + wire.encode_listing([("alice", "127.0.0.1", 6000, MALLORY.fingerprint)])
        )
        got = yield codes_as(self, a.port, fp, ALICE, ("DISCONNECT", "alice"))
        self.assertEqual(got, [wire.DISCONNECT.error])  # the old identity is nobody now
        # The outbox (relay order): the RELEASE after every record committed before it,
        # before every one after; the numbers have no gap.
        rows = pg_rows(self.postgres_uri, "SELECT seq, record FROM outbox ORDER BY seq")
        seqs = [seq for seq, _ in rows]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))
        ops = [record.split()[:2] for _, record in rows]
        release_at = ops.index(["alice", "RELEASE"])
        self.assertIn(["alice", "PUBLISH"], ops[:release_at])
        self.assertIn(["bob", "REGISTER"], ops[:release_at])
        self.assertEqual(ops[:release_at].count(["alice", "REGISTER"]), 1)  # ALICE's
        self.assertIn(["alice", "REGISTER"], ops[release_at + 1 :])  # MALLORY's
        # A name that does not exist: exit 1, nothing changed (but the leases the nodes renew).
        before = pg_everything(self.postgres_uri, "name, identity")
        out, err, code = yield run_command([*ADMIN, "release", "carol", "--db", self.postgres_uri])
        self.assertEqual((out, code), (b"", 1))
        self.assertIn(b"no such name", err)
        self.assertEqual(pg_everything(self.postgres_uri, "name, identity"), before)
