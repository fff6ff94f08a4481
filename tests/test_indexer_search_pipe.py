"""The indexer never blocks on its search process's pipe (p2p.indexer.searchindex): a
process that stops reading (a long write or catch-up; here, stopped by SIGSTOP) leaves
the messages waiting in the indexer's memory, written by the reactor once the pipe takes
them; beyond a bound the changes among them are dropped and the process catches up from
the main database, so a SEARCH still sees every change acknowledged before it."""

from __future__ import annotations

import os
import signal

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from p2p.indexer import searchindex
from tests.test_indexer_search import rows
from tests.test_indexer_search_thread import FileHarness, worker

#: Seconds after which a reactor thread stuck writing to the pipe fails the test (a
#: watchdog, instead of a hang: a test that passes never comes near it).
STUCK = 60
#: A description as long as the protocol allows: few requests fill the pipe.
LONG = "tusks " * 42


class StuckOnThePipe(Exception):
    """The reactor thread blocked writing to the search process."""


class StoppedProcess(TestCase):
    def setUp(self) -> None:
        self.h = FileHarness(self, self.mktemp())
        for port, user in enumerate(("alice", "bob"), 5000):
            self.assertEqual(self.h.request("REGISTER", user), b"\0")
            self.assertEqual(self.h.request("CONNECT", user, port), b"\0")
        self.worker = worker(self.h.store)
        self.assertEqual(self.h.request("PUBLISH", "alice", "first.txt", LONG), b"\0")
        self.worker._send_changes()  # the process runs, reading
        # A stopped process reads nothing: what is sent fills the pipe, then waits.
        pid = self.worker._process.pid
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)  # before the store's close (LIFO)

        def stuck(signum, frame) -> None:
            raise StuckOnThePipe()

        previous = signal.signal(signal.SIGALRM, stuck)
        signal.setitimer(signal.ITIMER_REAL, STUCK)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)

    def publish(self, name: str, description: str = LONG, user: str = "alice") -> None:
        """One PUBLISH served, its change sent to the process at once."""
        self.assertEqual(self.h.request("PUBLISH", user, name, description), b"\0")
        self.worker._send_changes()

    @inlineCallbacks
    def test_requests_are_served_while_the_process_does_not_read(self):
        """The pipe full, PUBLISH, DELETE and LIST_FILES go on being answered at once; a
        SEARCH waits for the process; once it reads again it finds every change."""
        filled = 0
        while not self.worker.queued:  # bob's files, until the pipe takes no more
            filled += 1
            self.publish(f"filler_{filled}.txt", user="bob")
            self.assertLess(filled, 10_000, "the pipe never filled")
        published = [f"walrus_{i}.txt" for i in range(50)]
        for name in published:  # beside what waits (a short reply: few bytes each)
            self.publish(name, "w")
        self.assertEqual(self.h.request("DELETE", "alice", "first.txt"), b"\0")
        self.assertEqual(self.h.request("LIST_FILES", "bob", "nobody"), b"\3")
        searched, search_done = self.h.start("SEARCH", "bob", "walrus", 1000)
        self.h.clock.advance(0)
        self.assertEqual(searched.value(), b"")  # the process has not read it yet
        self.assertGreater(self.worker.queued, 0)
        os.kill(self.worker._process.pid, signal.SIGCONT)
        yield search_done
        self.assertEqual(sorted(r[1] for r in rows(searched.value(), 6)), sorted(published))
        self.assertEqual(self.worker.queued, 0)
        reply = yield self.h.ask("SEARCH", "alice", "first", 10)
        self.assertEqual(rows(reply, 6), [])
        reply = yield self.h.ask("SEARCH", "alice", f"filler {filled}", 10)
        self.assertEqual([r[1] for r in rows(reply, 6)], [f"filler_{filled}.txt"])

    @inlineCallbacks
    def test_beyond_the_bound_changes_are_read_from_the_main_database(self):
        """What waits for a process that does not read stays under the bound: the
        changes are dropped, and the process, reading again, catches up from the main
        database: every change acknowledged before a SEARCH is found, none twice."""
        self.patch(searchindex, "MAX_QUEUED", 20_000)
        published = ["first.txt"]
        for i in range(200):
            published.append(f"walrus_{i}.txt")
            self.publish(published[-1])
            self.assertLessEqual(self.worker.queued, searchindex.MAX_QUEUED)
            if i % 3 == 0:
                self.assertEqual(self.h.request("DELETE", "alice", published.pop()), b"\0")
                self.worker._send_changes()
        self.assertGreater(self.worker.queued, 0)
        self.assertEqual(self.h.request("PUBLISH", "bob", "seal.txt", "walrus friend"), b"\0")
        os.kill(self.worker._process.pid, signal.SIGCONT)
        reply = yield self.h.ask("SEARCH", "bob", "walrus", 1000)
        self.assertEqual(sorted(r[1] for r in rows(reply, 6)), sorted([*published[1:], "seal.txt"]))
        reply = yield self.h.ask("SEARCH", "bob", "first", 10)
        self.assertEqual([r[1] for r in rows(reply, 6)], ["first.txt"])
