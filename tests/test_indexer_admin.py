"""``p2p-admin release``: a claimed name whose identity was lost, made free again."""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer.admin import AdminError, release
from p2p.indexer.store import Store, lock_database, unlock_database
from tests.support import run_command
from tests.test_indexer_tls import ALICE, MALLORY, codes_as, folder, start, tls_client

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
