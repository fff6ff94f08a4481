"""Issue 9 item 7: the indexer's database disk full, with auditing on, against a real process.

The disk is made full for the indexer alone: it runs under a file size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored, so a write past it fails with EFBIG as a
write to a full disk fails with ENOSPC), which works for root and for any
user; "space returns" is the limit raised from here with prlimit(2). Its audit
logger is down, so every audit record stays in the outbox, where it is counted.
"""

from __future__ import annotations

import resource
import sqlite3
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import SkipTest, TestCase

from p2p import wire
from p2p.indexer.directory import Directory
from p2p.indexer.store import Store
from tests.support import TWISTD, hold_port, spawn
from tests.test_indexer_e2e import DT, Indexer

#: Runs argv[2:] with its file size limit at argv[1] bytes and SIGXFSZ ignored.
LIMITED = (
    "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]; "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), hard)); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)
#: The database (and its WAL) may grow to this size: a few dozen commits.
LIMIT = 512 * 1024
#: Files of 256-byte names and descriptions (the longest allowed) fill it fast.
LONG = "d" * wire.MAX_DESCRIPTION


def raise_limit(pid: int) -> None:
    """Space returns: the process may write files of any size its hard limit allows."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))


class DiskFull(TestCase):
    @defer.inlineCallbacks
    def start(self):
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        if hard != resource.RLIM_INFINITY and hard < 64 * LIMIT:
            raise SkipTest(f"the file size hard limit ({hard}) leaves no room to raise it back")
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)
        dead = f"tcp:host=127.0.0.1:port={hold_port(self)}"  # the logger is down
        args = [sys.executable, "-c", LIMITED, str(LIMIT), *TWISTD, "-n", "--pidfile="]
        args += ["p2p-indexer", "--db", "ix.db", "--listen", "tcp:0:interface=127.0.0.1"]
        process = spawn(self, [*args, "--logger", dead], cwd=self.cwd, name="indexer")
        match = yield process.wait_for_line(r"^s> init server (\S+):(\d+)$")
        self.ix = Indexer(self, process, int(match.group(2)))
        self.sent = []  # every request, in order: each must leave exactly one record

    @defer.inlineCallbacks
    def request(self, op: str, user: str, *args):
        self.sent.append((op, user, args[0] if op in wire.AUDIT_FILE_OPS else None))
        reply = yield self.ix.request(op, user, *args)
        return reply

    @defer.inlineCallbacks
    def fill(self) -> int:
        """PUBLISH long entries until one is refused: the disk is full. How many were taken."""
        for n in range(LIMIT // 1024):
            reply = yield self.request("PUBLISH", "alice", f"{n:04d}" + LONG[4:], LONG)
            if reply != b"\0":
                self.assertEqual(reply, bytes([wire.PUBLISH.error]))
                return n
        self.fail(f"{LIMIT // 1024} PUBLISH all taken under a {LIMIT}-byte file size limit")

    @defer.inlineCallbacks
    def test_reads_answer_changes_refused_recovers_audit_complete(self):
        yield self.start()
        for op, user, *args in [("REGISTER", "alice"), ("CONNECT", "alice", 5000)]:
            reply = yield self.request(op, user, *args)
            self.assertEqual(reply, b"\0")
        taken = yield self.fill()
        self.assertGreater(taken, 0)
        files = [(f"{n:04d}" + LONG[4:], LONG) for n in range(taken)]
        users = b"\0" + wire.encode_listing([("alice", "127.0.0.1", 5000)])
        content = b"\0" + wire.encode_listing(files)

        # Full: every read answers (twice: no state is lost between), every change is refused.
        for _ in range(2):
            reply = yield self.request("LIST_USERS", "alice")
            self.assertEqual(reply, users)
            reply = yield self.request("LIST_CONTENT", "alice", "alice")
            self.assertEqual(reply, content)
            reply = yield self.request("LIST_PEERS", "alice")
            self.assertEqual(reply[:1], b"\0")
        for op, user, *args in [
            ("REGISTER", "bob"),
            ("PUBLISH", "alice", "late", "d"),
            ("DELETE", "alice", files[0][0]),
            ("DISCONNECT", "alice"),
        ]:
            reply = yield self.request(op, user, *args)
            self.assertEqual(reply, bytes([wire.OPS[op].error]), (op, reply))
        reply = yield self.request("LIST_USERS", "alice")
        self.assertEqual(reply, users)  # the refused DISCONNECT changed nothing

        # Space returns: changes are taken again, and the state is whole.
        raise_limit(self.ix.process.transport.pid)
        reply = yield self.request("PUBLISH", "alice", "late", "d")
        self.assertEqual(reply, b"\0")
        reply = yield self.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(reply, b"\0" + wire.encode_listing([*files, ("late", "d")]))
        reply = yield self.request("REGISTER", "bob")
        self.assertEqual(reply, b"\0")
        yield self.ix.process.stop()  # a clean stop: what is held is written, the store closed
        self.assertIn("Server Shut Down.", self.ix.process.lines[-1])

        # Every request left one record, in order: none lost, none twice.
        store = Store(str(self.cwd / "ix.db"))
        self.addCleanup(store.close)
        records = [record for _, record in store.outbox_pending(0, 10 * len(self.sent))]
        self.assertEqual(records, [wire.audit_record(u, op, DT, f) for op, u, f in self.sent])
        self.assertEqual(sorted(store.load()), ["alice", "bob"])


class _FullDisk:
    """A connection whose COMMIT fails while ``full``, as on a full disk."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.full = False

    def execute(self, sql: str, *args):
        if self.full and sql == "COMMIT":
            self.real.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


class HeldRecords(TestCase):
    """The store and directory on a full disk, over a connection whose commits fail."""

    def setUp(self) -> None:
        self.store = Store(self.mktemp(), max_held=3)
        self.store.open()
        self.disk = self.store._db = _FullDisk(self.store._db)
        self.directory = Directory(self.store, audit=True)
        self.directory.load()
        self.relayed: list[int] = []
        self.store.add_outbox_listener(lambda: self.relayed.append(len(self.records())))
        self.codes = []

    def tearDown(self) -> None:
        self.disk.full = False
        self.store.close()

    def handle(self, op: str, user: str, *args) -> int:
        code, _ = self.directory.handle(wire.OPS[op], DT, user, list(args), ("10.0.0.1", 5000))
        self.store.commit()
        return code

    def records(self) -> list[str]:
        return [record for _, record in self.store.outbox_pending(0, 100)]

    def test_bounded_in_order_exactly_once(self):
        self.assertEqual(self.handle("REGISTER", "alice"), 0)
        self.assertEqual(self.handle("CONNECT", "alice", 5000), 0)
        self.disk.full = True
        self.directory.handle(wire.REGISTER, DT, "bob", [])
        self.assertRaises(sqlite3.Error, self.store.commit)  # the turn that finds it full
        self.directory.load()  # as the factory recovers
        self.assertTrue(self.store.failing)
        self.assertEqual(self.handle("LIST_USERS", "alice"), 0)
        self.assertEqual(self.handle("PUBLISH", "alice", "f", "d"), wire.PUBLISH.error)
        self.assertEqual(len(self.store.held), 3)  # REGISTER bob, LIST_USERS, PUBLISH
        # The bound is reached: a read is refused too, and not kept.
        self.assertEqual(self.handle("LIST_USERS", "alice"), wire.LIST_USERS.error)
        self.assertEqual(len(self.store.held), 3)
        self.assertEqual(len(self.records()), 2)
        self.disk.full = False  # space returns: the next request writes what is held first
        self.assertEqual(self.handle("LIST_CONTENT", "alice", "alice"), 0)
        self.assertFalse(self.store.failing)
        self.assertEqual(
            self.records(),
            [
                f"alice REGISTER {DT}",
                f"alice CONNECT {DT}",
                f"bob REGISTER {DT}",
                f"alice LIST_USERS {DT}",
                f"alice PUBLISH f {DT}",
                f"alice LIST_CONTENT {DT}",
            ],
        )
        self.assertEqual(self.relayed[-2:], [5, 6])  # the relay heard of both commits
        self.assertEqual(list(self.store.load()), ["alice"])  # bob's REGISTER was refused

    def test_close_writes_what_is_held(self):
        self.assertEqual(self.handle("REGISTER", "alice"), 0)
        self.disk.full = True
        self.directory.handle(wire.REGISTER, DT, "bob", [])
        self.assertRaises(sqlite3.Error, self.store.commit)
        self.assertEqual(self.handle("LIST_USERS", "alice"), wire.LIST_USERS.not_connected)
        self.disk.full = False
        self.store.close()
        self.store.open()
        self.assertEqual(len(self.records()), 3)

    def test_no_expiry_while_full(self):
        """Dropping a user whose client is gone is a change: it waits for the disk."""
        self.assertEqual(self.handle("REGISTER", "alice"), 0)
        self.assertEqual(self.handle("CONNECT", "alice", 5000), 0)
        self.disk.full = True
        self.directory.handle(wire.LIST_USERS, DT, "alice", [])
        self.assertRaises(sqlite3.Error, self.store.commit)
        self.directory.load()
        self.assertFalse(self.directory.expire("alice", DT))
        self.assertFalse(self.store.in_transaction)  # nothing for the turn's commit to fail
        self.assertIn("alice", self.directory.connected)
        self.disk.full = False
        self.assertTrue(self.directory.expire("alice", DT))
        self.store.commit()
        self.assertNotIn("alice", self.directory.connected)
        self.assertEqual(self.records()[-2:], [f"alice LIST_USERS {DT}", f"alice DISCONNECT {DT}"])
