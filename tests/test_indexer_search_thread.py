"""SEARCH answered by the file store's search process (p2p.indexer.searchindex): a SEARCH
sees every change acknowledged before it, the search database catches up after a
``kill -9`` with changes it had not written, and a worker that cannot write refuses
searches until it can, losing nothing."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer import protocol as protocol_module
from p2p.indexer import searchindex
from p2p.indexer.directory import Directory
from p2p.indexer.protocol import IndexerFactory
from p2p.indexer.searchindex import IndexWorker, SearchIndex
from p2p.indexer.store import Store
from tests.test_indexer_protocol import DT, Harness
from tests.test_indexer_search import H1, rows


class FileHarness(Harness):
    """The protocol harness on a database file: SEARCH is answered by the search process,
    its reply delivered through the running reactor."""

    def __init__(self, testcase: TestCase, path: str) -> None:
        self.clock = MemoryReactorClock()
        self.store = Store(path)
        self.store.open()
        testcase.addCleanup(self.store.close)
        self.directory = Directory(self.store)
        self.directory.load()  # opens the search side too
        self.factory = IndexerFactory(self.directory, self.clock)
        self.lines: list[str] = []
        testcase.patch(protocol_module, "say", self.lines.append)

    def start(self, op: str, user: str, *args):
        """Send one request on a fresh connection (the turn does not end): the transport,
        and a Deferred that fires once the reply was written."""
        proto, transport = self.connect()
        replied: Deferred = Deferred()
        reply = proto.reply

        def replying(*a) -> None:
            reply(*a)
            replied.callback(transport)

        proto.reply = replying
        proto.dataReceived(wire.encode_request(op, DT, user, *args))
        return transport, replied

    @inlineCallbacks
    def ask(self, op: str, user: str, *args):
        """One request, its turn ended; the reply once written (a SEARCH's comes later)."""
        transport, replied = self.start(op, user, *args)
        self.clock.advance(0)
        yield replied
        return transport.value()


def worker(store: Store) -> IndexWorker:
    """``store``'s end of its search process."""
    assert isinstance(store._index, IndexWorker)
    return store._index


def failing(*args) -> None:
    raise sqlite3.OperationalError("database or disk is full")


class Ordering(TestCase):
    def setUp(self) -> None:
        self.h = FileHarness(self, self.mktemp())
        for op, user, *args in [
            ("REGISTER", "alice"),
            ("REGISTER", "bob"),
            ("CONNECT", "alice", 5000),
            ("CONNECT", "bob", 5001),
        ]:
            self.assertEqual(self.h.request(op, user, *args), b"\0")

    @inlineCallbacks
    def test_search_sees_the_changes_of_its_own_turn(self):
        """A PUBLISH on another connection, handled before the SEARCH in the same reactor
        turn, is acknowledged at the turn's commit: the SEARCH, answered later by the
        search process, finds the file; a DELETE and a DISCONNECT the same way."""
        published, _ = self.h.start("PUBLISH", "alice", "walrus.txt", "tusks")
        searched, search_done = self.h.start("SEARCH", "bob", "walrus", 10)
        self.h.clock.advance(0)
        self.assertEqual(published.value(), b"\0")  # at the commit
        self.assertEqual(searched.value(), b"")  # not yet: the search process answers
        yield search_done
        self.assertEqual(
            rows(searched.value(), 6), [("alice", "walrus.txt", "tusks", "-", "-", "1")]
        )
        self.h.start("DELETE", "alice", "walrus.txt")
        searched, search_done = self.h.start("SEARCH", "bob", "walrus", 10)
        self.h.clock.advance(0)
        yield search_done
        self.assertEqual(rows(searched.value(), 6), [])
        self.assertEqual(self.h.request("PUBLISH", "bob", "seal.txt", "whiskers"), b"\0")
        self.h.start("DISCONNECT", "bob")
        searched, search_done = self.h.start("SEARCH", "alice", "seal", 10)
        self.h.clock.advance(0)
        yield search_done
        self.assertEqual(rows(searched.value(), 6), [])

    @inlineCallbacks
    def test_search_before_a_change_of_its_turn_waits_for_nothing(self):
        """Only the changes handled before a SEARCH matter: one handled after it in the
        same turn is neither waited for nor needed."""
        searched, search_done = self.h.start("SEARCH", "bob", "otter", 10)
        self.h.start("PUBLISH", "alice", "otter.txt", "paws")
        self.h.clock.advance(0)
        yield search_done
        self.assertEqual(searched.value()[:1], b"\0")
        reply = yield self.h.ask("SEARCH", "bob", "otter", 10)
        self.assertEqual([r[1] for r in rows(reply, 6)], ["otter.txt"])

    @inlineCallbacks
    def test_replies_of_a_failed_commit(self):
        """A turn whose commit fails answers its changes and its SEARCHes with the error
        code, and nothing of it is ever found."""
        published, _ = self.h.start("PUBLISH", "alice", "mole.txt", "digs")
        searched, search_done = self.h.start("SEARCH", "bob", "mole", 10)
        self.patch(self.h.store, "_note_changes", failing)
        self.h.clock.advance(0)
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertEqual(published.value(), bytes((wire.PUBLISH.error,)))
        self.assertEqual(searched.value(), bytes((wire.SEARCH.error,)))
        self.assertTrue(search_done.called)
        del self.h.store._note_changes
        self.assertTrue(self.h.store.writable())
        reply = yield self.h.ask("SEARCH", "bob", "mole", 10)
        self.assertEqual(rows(reply, 6), [])
        # The search process answered the first SEARCH too, before: that answer is dropped.
        self.assertEqual(searched.value(), bytes((wire.SEARCH.error,)))


class CatchUp(TestCase):
    def test_kill_with_changes_not_yet_indexed(self) -> None:
        """Changes committed to the main database that the search database never got
        (the indexer killed first) are read from the main database at the next start:
        new files, a file deleted, a new description, an id SQLite gave again, an owner
        who left."""
        path = self.mktemp()
        first = Store(path)
        first.open()
        first.open_index()
        for user, port in (("u", 5000), ("v", 5001)):
            first.add_user(user)
            first.set_address(user, ("10.0.0.1", port))
        for i in range(3):
            first.add_file("u", f"walrus_{i}.txt", "d")
        first.add_file("v", "seal.txt", "whiskers", 3, H1)
        first.commit()
        self.assertEqual(len(first.search(["walrus"], 10)), 3)  # written and searched
        # From now on the search process cannot write: what follows stays out of the index.
        worker(first).fault("apply")
        first.remove_file("u", "walrus_0.txt")
        first.publish_file("u", "walrus_1.txt", "now a narwhal", 1, H1)
        first.remove_file("u", "walrus_2.txt")
        first.add_file("u", "walrus_3.txt", "d")  # the id of walrus_2.txt again
        first.set_address("v", None)
        first.commit()
        self.assertRaises(sqlite3.OperationalError, first.search, ["walrus"], 10)
        # kill -9: the first store is never closed; the next start opens the same files.
        second = Store(path)
        second.open()
        second.open_index()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        self.assertEqual(
            sorted(h.name for h in second.search(["walrus"], 10)),
            ["walrus_1.txt", "walrus_3.txt"],
        )
        narwhal = second.search(["narwhal"], 10)
        self.assertEqual([(h.name, h.size, h.sha256) for h in narwhal], [("walrus_1.txt", 1, H1)])
        self.assertEqual(second.search(["whiskers"], 10), [])  # v is offline now
        self.assertEqual(second.search(["d", "walrus_2"], 10), [])
        # Written by the catch-up and marked: a third start has nothing to read.
        third = Store(path)
        third.open()
        self.addCleanup(third.close)
        last = searchindex.last_change(third.db)
        second.close()
        index = SearchIndex(searchindex.open_search_database(path + searchindex.SUFFIX))
        self.addCleanup(index.db.close)
        self.assertEqual(index.mark(), (third.sender_id, last))

    def test_files_of_a_user_removed_or_pruned(self) -> None:
        """Every file a DELETE takes, one or many (a user removed, orphans pruned), leaves
        SEARCH at once and leaves its tombstone, numbered with its commit: a search
        database that missed the change drops the files when it catches up."""
        path = self.mktemp()
        first = Store(path)
        first.open()
        first.open_index()
        for user, port in (("u", 5000), ("v", 5001), ("w", 5002)):
            first.add_user(user)
            first.set_address(user, ("10.0.0.1", port))
            for i in range(2):
                first.add_file(user, f"walrus_{user}{i}.txt", "d")
        first.commit()
        self.assertEqual(len(first.search(["walrus"], 10)), 6)
        first.remove_user("u")
        first.commit()
        self.assertEqual(
            sorted(h.name for h in first.search(["walrus"], 10)),
            ["walrus_v0.txt", "walrus_v1.txt", "walrus_w0.txt", "walrus_w1.txt"],
        )
        worker(first).fault("apply")  # what follows stays out of the index
        first.db.execute("DELETE FROM users WHERE name = 'v'")  # v's files: orphans
        self.assertEqual(first.prune_orphans(), 2)
        first.remove_file("w", "walrus_w0.txt")
        first.remove_file("w", "no such file")
        first.commit()
        seq = searchindex.last_change(first.db)
        self.assertEqual(
            sorted(first.db.execute("SELECT seq FROM tombstones")),
            [(seq - 1,)] * 2 + [(seq,)] * 3,
        )
        # kill -9: the first store is never closed; the next start catches up.
        second = Store(path)
        second.open()
        second.open_index()
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        self.assertEqual([h.name for h in second.search(["walrus"], 10)], ["walrus_w1.txt"])
        self.assertEqual(second.file_count(), 1)

    def test_search_database_lost_or_of_another_database(self) -> None:
        """A search database that is missing, or follows another main database, is
        filled again from the main database."""
        path = self.mktemp()
        store = Store(path)
        store.open()
        store.add_user("u")
        store.set_address("u", ("10.0.0.1", 5000))
        store.add_file("u", "otter.txt", "paws")
        store.commit()
        store.close()  # its search side never opened: nothing handed over
        store.open()
        self.assertEqual([h.name for h in store.search(["otter"], 10)], ["otter.txt"])
        store.close()
        other = Store(path + "-other")
        other.open()
        other.close()
        shutil.copyfile(path + searchindex.SUFFIX, path + "-other" + searchindex.SUFFIX)
        self.addCleanup(other.close)
        self.assertEqual(other.search(["otter"], 10), [])  # filled again: other's files


class WorkerFailure(TestCase):
    def setUp(self) -> None:
        self.h = FileHarness(self, self.mktemp())
        for op, user, *args in [("REGISTER", "alice"), ("CONNECT", "alice", 5000)]:
            self.assertEqual(self.h.request(op, user, *args), b"\0")

    @inlineCallbacks
    def test_search_refused_until_the_index_is_written(self):
        """The search database cannot be written: changes are acknowledged (the main
        database holds them), SEARCH gets its error code rather than an answer that
        misses one; once it can write again, nothing was lost."""
        worker(self.h.store).fault("apply")
        self.assertEqual(self.h.request("PUBLISH", "alice", "walrus.txt", "tusks"), b"\0")
        reply = yield self.h.ask("SEARCH", "alice", "walrus", 10)
        self.assertEqual(reply, b"\3")
        self.assertEqual(self.h.request("PUBLISH", "alice", "seal.txt", "tusks"), b"\0")
        worker(self.h.store).fault("apply", None)
        reply = yield self.h.ask("SEARCH", "alice", "tusks", 10)
        self.assertEqual(sorted(r[1] for r in rows(reply, 6)), ["seal.txt", "walrus.txt"])

    @inlineCallbacks
    def test_too_much_held_is_read_again_from_the_main_database(self):
        """A worker that held more changes than it may drops them and, once it can write,
        catches up from the main database instead."""
        worker(self.h.store).fault("apply")
        worker(self.h.store).fault("max_pending", 2)
        for i in range(4):
            self.assertEqual(self.h.request("PUBLISH", "alice", f"walrus_{i}.txt", "x"), b"\0")
        reply = yield self.h.ask("SEARCH", "alice", "walrus", 10)
        self.assertEqual(reply, b"\3")
        worker(self.h.store).fault("apply", None)
        self.assertEqual(self.h.request("DELETE", "alice", "walrus_0.txt"), b"\0")
        reply = yield self.h.ask("SEARCH", "alice", "walrus", 10)
        self.assertEqual(
            sorted(r[1] for r in rows(reply, 6)), ["walrus_1.txt", "walrus_2.txt", "walrus_3.txt"]
        )

    @inlineCallbacks
    def test_a_search_that_fails_gets_the_error_code(self):
        """Any other failure of a search (a bug) is logged and answered with the error
        code; the next search is answered."""
        self.assertEqual(self.h.request("PUBLISH", "alice", "walrus.txt", "tusks"), b"\0")
        worker(self.h.store).fault("search", ZeroDivisionError("a bug"))
        reply = yield self.h.ask("SEARCH", "alice", "walrus", 10)
        self.assertEqual(reply, b"\3")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        worker(self.h.store).fault("search", None)
        reply = yield self.h.ask("SEARCH", "alice", "walrus", 10)
        self.assertEqual([r[1] for r in rows(reply, 6)], ["walrus.txt"])

    @inlineCallbacks
    def test_a_search_process_killed_is_replaced(self):
        """The search process killed (changes sent to it lost with it): the next SEARCH
        starts another, caught up from the main database, and finds every change."""
        self.assertEqual(self.h.request("PUBLISH", "alice", "walrus.txt", "tusks"), b"\0")
        reply = yield self.h.ask("SEARCH", "alice", "walrus", 10)
        self.assertEqual([r[1] for r in rows(reply, 6)], ["walrus.txt"])
        old = worker(self.h.store)
        old.fault("apply")  # what follows never reaches its database
        self.assertEqual(self.h.request("PUBLISH", "alice", "seal.txt", "tusks"), b"\0")
        self.assertEqual(self.h.request("DELETE", "alice", "walrus.txt"), b"\0")
        old._send_changes()
        os.kill(old._process.pid, signal.SIGKILL)
        old._process.wait()
        old._reader.join()  # it saw the pipe close
        self.assertTrue(old.gone)
        reply = yield self.h.ask("SEARCH", "alice", "tusks", 10)
        self.assertEqual([r[1] for r in rows(reply, 6)], ["seal.txt"])
        self.assertIsNot(worker(self.h.store), old)


class AnsweredOnce(TestCase):
    """A search the reader thread answers (the process died) while the reactor finds it
    cannot send it: one answer, not two (a second would raise from the Deferred)."""

    def test_a_search_racing_the_process_end_is_answered_once(self):
        from p2p.indexer.searchindex import IndexWorker, SearchUnavailable

        worker = IndexWorker("main.db", "main.db.search", "x", 0, MemoryReactorClock())

        class Ended:
            def recv(self):
                raise EOFError

            def close(self):
                pass

        class Gone:
            def poll(self):
                return -9

        worker._in, worker._process = Ended(), Gone()

        def send(message):
            # The process ends while the question goes out: the reader thread runs its
            # end (here, at this very point), then the write fails.
            worker._receive()
            return False

        worker._send = send
        answers = []
        worker.search(["cuna"], 10, answers.append)
        self.assertEqual(len(answers), 1)
        self.assertIsInstance(answers[0], SearchUnavailable)
