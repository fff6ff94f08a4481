"""Issue 9, item 1: readers that never read a long listing cost the indexer one listing.

The attack: 100 connections from 127.0.0.2-5 ask for a 4 MB ``LIST_CONTENT`` and
never read a byte. Each reply used to be built as a fresh ``code + listing``
(and the listing itself encoded per request), so the indexer held 100 copies,
some 400 MB, until the timeout cut them. Now the directory keeps one immutable
listing per change and every connection hands the transport one 64 KiB piece of
it at a time. Checked against a real indexer: its RSS grows by well under two
listings, a good client on 127.0.0.1 is served meanwhile, and its state is
unchanged.
"""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer.store import Store
from tests.support import exchange, indexer_port, poll_until, rss_bytes, spawn_twistd

WHEN = "27/11/2026 12:00:00"
FILES = 8000
READERS = 100


def never_reading_readers(port: int, count: int, data: bytes) -> list[socket.socket]:
    """``count`` connections that send ``data`` and never read, from 127.0.0.2-5 in turn
    (four sources, each under the indexer's per-source cap)."""
    sockets = []
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((f"127.0.0.{2 + i % 4}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        sockets.append(s)
    return sockets


def big_files() -> list[tuple[str, str]]:
    """The files of user ``big`` (name, description): a 4 MB ``LIST_CONTENT``."""
    return [(f"{i:06}-" + "n" * 240, "d" * 250) for i in range(FILES)]


class NeverReadingReadersTests(TestCase):
    def database(self) -> str:
        """The ``--db`` of the test's indexer: users ``big`` (:func:`big_files`) and
        ``reader``, both connected."""
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        db = workdir / "big.db"
        store = Store(str(db))
        for user in ("big", "reader"):
            store.add_user(user)
            store.set_address(user, ("127.0.0.1", 4000))
        for name, description in big_files():
            store.add_file("big", name, description)
        store.commit()
        store.close()
        return str(db)

    @defer.inlineCallbacks
    def test_a_hundred_never_reading_readers_cost_one_listing(self):
        db = self.database()
        proc = spawn_twistd(
            self, "p2p-indexer", "--listen", "tcp:0:interface=127.0.0.1", "--db", db
        )
        port = yield indexer_port(proc)
        ask = wire.encode_request("LIST_CONTENT", WHEN, "reader", "big")
        listing = yield exchange(port, ask)
        self.assertGreater(len(listing), 3_900_000)
        before = rss_bytes(proc.transport.pid)

        readers = yield threads.deferToThread(never_reading_readers, port, READERS, ask)
        self.addCleanup(lambda: [s.close() for s in readers])
        yield poll_until(
            lambda: (
                sum("s> LIST_CONTENT FROM reader" in line for line in proc.lines) >= READERS + 1
            ),
            what="every reader's request read",
        )
        # The good client, meanwhile: served, and served the whole listing.
        for _ in range(5):
            got = yield exchange(port, wire.encode_request("LIST_USERS", WHEN, "reader"))
            self.assertEqual(got[:1], b"\0")
        got = yield exchange(port, ask)
        self.assertEqual(got, listing)
        grown = rss_bytes(proc.transport.pid) - before
        # One listing and a 64 KiB piece per reader at most (there were 100 copies).
        self.assertLess(grown, len(listing) + READERS * 64 * 1024 + 8_000_000, grown)
        for s in readers:
            s.close()
        got = yield exchange(port, ask)
        self.assertEqual(got, listing)  # state unchanged, the indexer still up
