"""The indexer's SQLite store: reload after reopen, and the outbox API of the relay."""

from __future__ import annotations

import sqlite3

from twisted.trial.unittest import TestCase

from p2p.indexer.directory import Directory
from p2p.indexer.store import Store


class StoreTests(TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()

    def open(self, **kwargs) -> Store:
        store = Store(self.path, **kwargs)
        store.open()
        self.addCleanup(store.close)
        return store

    def test_reload_after_reopen(self) -> None:
        store = self.open()
        store.add_user("alice")
        store.add_user("bob")
        store.add_user("gone")
        store.set_address("alice", ("10.0.0.1", 5000))
        store.add_file("alice", "a.txt", "first")
        store.add_file("alice", "b.txt", "second")
        store.add_file("bob", "a.txt", "bob's")
        store.commit()
        store.remove_file("alice", "a.txt")
        store.add_file("gone", "g", "g")
        store.remove_user("gone")
        store.commit()
        store.close()

        users = self.open().load()
        self.assertEqual(list(users), ["alice", "bob"])
        self.assertEqual(users["alice"].address, ("10.0.0.1", 5000))
        self.assertEqual(users["alice"].files, {"b.txt": "second"})
        self.assertIsNone(users["bob"].address)
        self.assertEqual(users["bob"].files, {"a.txt": "bob's"})

    def test_uncommitted_changes_are_lost(self) -> None:
        store = self.open()
        store.add_user("alice")
        store.commit()
        store.add_user("bob")  # never committed: the process "dies" here
        other = Store(self.path)
        other.open()
        self.addCleanup(other.close)
        self.assertEqual(list(other.load()), ["alice"])

    def test_directory_loads_connected_users(self) -> None:
        store = self.open()
        store.add_user("alice")
        store.set_address("alice", ("10.0.0.1", 5000))
        store.add_user("bob")
        store.commit()
        directory = Directory(store)
        directory.load()
        self.assertEqual(directory.connected, {"alice": ("10.0.0.1", 5000)})
        self.assertEqual(set(directory.users), {"alice", "bob"})

    def test_indexes_used(self) -> None:
        """Every change is an indexed lookup, never a table scan."""
        store = self.open()
        plans = [
            ("DELETE FROM files WHERE user = ?", ("a",)),
            ("DELETE FROM files WHERE user = ? AND name = ?", ("a", "b")),
            ("DELETE FROM users WHERE name = ?", ("a",)),
            ("UPDATE users SET ip = ?, port = ? WHERE name = ?", ("a", 1, "a")),
            ("DELETE FROM outbox WHERE seq <= ?", (1,)),
        ]
        for sql, params in plans:
            detail = " ".join(r[-1] for r in store.db.execute("EXPLAIN QUERY PLAN " + sql, params))
            self.assertNotRegex(detail, r"SCAN (files|users|outbox)\b", sql)

    def test_sync_modes(self) -> None:
        self.assertEqual(self.open(sync="full").db.execute("PRAGMA synchronous").fetchone(), (2,))
        self.assertRaises(ValueError, Store, self.path, sync="sometimes")

    def test_wal(self) -> None:
        self.assertEqual(self.open().db.execute("PRAGMA journal_mode").fetchone(), ("wal",))


class OutboxTests(TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.store = self.reopen()

    def reopen(self) -> Store:
        store = Store(self.path)
        store.open()
        self.addCleanup(store.close)
        return store

    def add(self, *records: str) -> None:
        for record in records:
            self.store.add_outbox(record)
        self.store.commit()

    def test_pending_in_order_with_limit(self) -> None:
        self.add("r1", "r2", "r3")
        rows = self.store.outbox_pending(0, 10)
        self.assertEqual([r for _, r in rows], ["r1", "r2", "r3"])
        seqs = [s for s, _ in rows]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(self.store.outbox_pending(seqs[0], 1), [rows[1]])
        self.assertEqual(self.store.outbox_pending(seqs[-1], 10), [])

    def test_delete_through(self) -> None:
        self.add("r1", "r2", "r3")
        seqs = [s for s, _ in self.store.outbox_pending(0, 10)]
        self.store.outbox_delete_through(seqs[1])
        self.assertEqual([r for _, r in self.store.outbox_pending(0, 10)], ["r3"])
        self.store.close()
        self.assertEqual([r for _, r in self.reopen().outbox_pending(0, 10)], ["r3"])

    def test_seq_never_reused(self) -> None:
        self.add("r1", "r2")
        last = self.store.outbox_pending(0, 10)[-1][0]
        self.store.outbox_delete_through(last)
        self.store.close()
        store = self.reopen()
        store.add_outbox("r3")
        store.commit()
        [(seq, record)] = store.outbox_pending(0, 10)
        self.assertGreater(seq, last)
        self.assertEqual(record, "r3")

    def test_uncommitted_rows_not_pending(self) -> None:
        self.add("r1")
        self.store.add_outbox("r2")
        self.assertEqual([r for _, r in self.store.outbox_pending(0, 10)], ["r1"])
        self.store.commit()
        self.assertEqual([r for _, r in self.store.outbox_pending(0, 10)], ["r1", "r2"])

    def test_rolled_back_seq_not_reused_after_commit(self) -> None:
        self.add("r1")
        self.store.add_outbox("lost")
        self.store.rollback()
        self.add("r2")
        self.assertEqual([r for _, r in self.store.outbox_pending(0, 10)], ["r1", "r2"])

    def test_listeners_after_commit_with_rows(self) -> None:
        calls = []
        self.store.add_outbox_listener(lambda: calls.append(self.store.outbox_pending(0, 10)))
        self.store.add_user("alice")
        self.store.commit()
        self.assertEqual(calls, [])  # no outbox rows in that commit
        self.store.add_outbox("r1")
        self.assertEqual(calls, [])  # not before the commit
        self.store.commit()
        self.assertEqual(len(calls), 1)
        self.assertEqual([r for _, r in calls[0]], ["r1"])  # visible from the callback

    def test_failing_listener_does_not_break_commit(self) -> None:
        def boom():
            raise RuntimeError("relay bug")

        self.store.add_outbox_listener(boom)
        self.add("r1")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.store.outbox_pending(0, 10)), 1)

    def test_sender_id_stable(self) -> None:
        sender = self.store.sender_id
        self.assertRegex(sender, r"^[0-9a-f]{32}$")
        self.store.close()
        self.assertEqual(self.reopen().sender_id, sender)
        other = Store(self.mktemp())
        self.addCleanup(other.close)
        self.assertNotEqual(other.sender_id, sender)

    def test_failed_change_rolls_back(self) -> None:
        self.store.add_user("alice")
        self.store.commit()
        self.store.add_user("bob")
        self.assertRaises(sqlite3.IntegrityError, self.store.add_user, "alice")
        self.store.rollback()
        self.assertFalse(self.store.in_transaction)
        self.assertEqual(list(self.store.load()), ["alice"])
