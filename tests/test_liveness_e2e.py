"""Liveness against a real ``twistd p2p-indexer --peer-timeout 2`` (docs/protocol.md section 7).

Users here are raw sockets speaking the classic protocol (and ALIVE); their
"peers" are listeners of this test process, so a test can close one (the peer
is gone) or count the probes one receives. Every wait polls with a deadline.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.trial.unittest import TestCase

from tests.support import hold_port, poll_until
from tests.test_indexer_e2e import DT, start_indexer

TIMEOUT = 2  # --peer-timeout of these tests
#: Long enough for a lease, a tick, a probe and the commit, with room for a loaded machine.
GONE_WITHIN = 15.0


class _Peer(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted += 1


class PeerListener(protocol.Factory):
    """A stand-in peer server: accepts and counts connections (the indexer's probes)."""

    protocol = _Peer

    def __init__(self, testcase: TestCase) -> None:
        self.accepted = 0
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        self.number = self.port.getHost().port
        testcase.addCleanup(self.close)

    def close(self):
        return self.port.stopListening()


class Renewer:
    """Sends ALIVE for ``user`` every third of the lease, as our client does."""

    def __init__(self, testcase: TestCase, ix, user: str) -> None:
        self.ix = ix
        self.user = user
        self.replies: list[bytes] = []
        self.loop = task.LoopingCall(self.renew)
        self.loop.start(TIMEOUT / 3)
        testcase.addCleanup(self.stop)

    @defer.inlineCallbacks
    def renew(self):
        try:
            reply = yield self.ix.request("ALIVE", self.user)
        except Exception:  # the indexer restarting: try again next time
            return
        self.replies.append(reply)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()


@defer.inlineCallbacks
def listed(ix) -> set[str]:
    """The names LIST_USERS shows (asked as ``watcher``, a user kept connected)."""
    reply = yield ix.request("LIST_USERS", "watcher")
    assert reply[:1] == b"\0", reply
    fields = reply[1:].split(b"\0")
    count = int(fields[0])
    return {fields[1 + 3 * i].decode() for i in range(count)}


@defer.inlineCallbacks
def until_listed(ix, present: set[str], absent: set[str], what: str):
    """Poll LIST_USERS until ``present`` are listed and ``absent`` are not."""
    state = {}

    @defer.inlineCallbacks
    def ask():
        state["users"] = yield listed(ix)

    def reached():
        users = state.get("users")
        return users is not None and present <= users and not (absent & users)

    yield ask()
    loop = task.LoopingCall(ask)
    loop.start(0.2, now=False)
    try:
        yield poll_until(reached, timeout=GONE_WITHIN, what=what)
    finally:
        loop.stop()
    return state["users"]


@defer.inlineCallbacks
def join(ix, user: str, port: int) -> None:
    codes = yield ix.codes(("REGISTER", user), ("CONNECT", user, port))
    assert codes == [0, 0], (user, codes)


class Liveness(TestCase):
    @defer.inlineCallbacks
    def start(self, *options: str, cwd: Path | None = None):
        ix = yield start_indexer(self, "--peer-timeout", str(TIMEOUT), *options, cwd=cwd)
        watcher = PeerListener(self)
        yield join(ix, "watcher", watcher.number)
        Renewer(self, ix, "watcher")
        return ix

    @defer.inlineCallbacks
    def test_gone_classic_leaves_live_ones_stay(self):
        """A classic peer whose port closed leaves; a renewing user and a classic peer
        that answers its probe stay."""
        ix = yield self.start()
        gone, classic = PeerListener(self), PeerListener(self)
        yield join(ix, "gone", gone.number)
        yield join(ix, "classic", classic.number)
        yield join(ix, "ours", hold_port(self))  # its port is dead: only ALIVE keeps it
        renewer = Renewer(self, ix, "ours")
        yield gone.close()
        yield until_listed(ix, {"ours", "classic"}, {"gone"}, "the gone peer dropped")
        # The classic peer is probed (once per timeout at most) and stays.
        yield poll_until(lambda: classic.accepted >= 2, timeout=GONE_WITHIN, what="two probes")
        users = yield listed(ix)
        self.assertTrue({"ours", "classic", "watcher"} <= users, users)
        self.assertIn(b"\x00%d\x00" % TIMEOUT, renewer.replies)
        # The renewing user stops: dropped without a probe; the next ALIVE says so.
        renewer.stop()
        yield until_listed(ix, set(), {"ours"}, "the silent renewer dropped")
        reply = yield ix.request("ALIVE", "ours")
        self.assertEqual(reply, b"\x02")
        # Its files and registration stay: it may connect again at once.
        codes = yield ix.codes(("CONNECT", "ours", 7000), ("CONNECT", "gone", 7001))
        self.assertEqual(codes, [0, 0])

    @defer.inlineCallbacks
    def test_restart_keeps_renewing_users(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        ix = yield self.start(cwd=cwd)
        yield join(ix, "ours", hold_port(self))
        silent = PeerListener(self)
        yield join(ix, "silent", silent.number)
        renewer = Renewer(self, ix, "ours")
        yield ix.process.stop()
        yield silent.close()  # gone while the indexer was down
        restarted = yield start_indexer(self, "--peer-timeout", str(TIMEOUT), cwd=cwd)
        ix.port = restarted.port  # the renewers follow the new indexer
        ix.process = restarted.process
        users = yield until_listed(ix, {"ours"}, {"silent"}, "the silent user dropped")
        self.assertIn("watcher", users)
        before = len(renewer.replies)
        yield poll_until(lambda: len(renewer.replies) >= before + 3, what="three renewals")
        self.assertEqual(renewer.replies[-1], b"\x00%d\x00" % TIMEOUT)
        users = yield listed(ix)
        self.assertIn("ours", users)

    @defer.inlineCallbacks
    def test_locked_out_user_gets_back_in(self):
        ix = yield self.start()
        alive = PeerListener(self)
        yield join(ix, "alice", alive.number)
        reply = yield ix.request("ALIVE", "alice")  # alice's client renews...
        self.assertEqual(reply[:1], b"\0")
        # The recorded peer answers: still "already connected".
        codes = yield ix.codes(("CONNECT", "alice", 7000))
        self.assertEqual(codes, [2])
        self.assertGreaterEqual(alive.accepted, 1)
        # ...and crashes right after: the next CONNECT replaces it at once.
        yield alive.close()
        codes = yield ix.codes(("CONNECT", "alice", 7000))
        self.assertEqual(codes, [0])
        reply = yield ix.request("LIST_USERS", "alice")
        self.assertIn(b"alice\x00127.0.0.1\x007000\x00", reply)

    @defer.inlineCallbacks
    def test_expiry_is_audited(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        dead = f"tcp:host=127.0.0.1:port={hold_port(self)}"  # the logger is down: rows stay
        ix = yield self.start("--logger", dead, cwd=cwd)
        yield join(ix, "gone", hold_port(self))
        yield until_listed(ix, set(), {"gone"}, "the gone peer dropped")

        def records() -> list[str]:
            db = sqlite3.connect(f"file:{cwd / 'ix.db'}?mode=ro", uri=True)
            try:
                return [r for (r,) in db.execute("SELECT record FROM outbox ORDER BY seq")]
            finally:
                db.close()

        rows = yield poll_until(
            lambda: [r for r in records() if r.startswith("gone DISCONNECT ")], what="the record"
        )
        self.assertEqual(len(rows), 1, rows)
        self.assertRegex(rows[0], r"^gone DISCONNECT \d\d/\d\d/\d{4} \d\d:\d\d:\d\d$")
        self.assertNotIn("gone DISCONNECT " + DT, rows)
        self.assertFalse([r for r in records() if " ALIVE " in r])  # renewals are not audited
