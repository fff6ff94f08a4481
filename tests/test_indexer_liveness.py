"""Liveness on a fake clock (docs/protocol.md section 7): leases, ALIVE, probes, lock-out.

Every test drives :class:`p2p.indexer.liveness.Liveness` with the memory
reactor's clock and a fake prober whose answers the test gives, so the timing
rules are checked exactly, without sleeping.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer.directory import Directory
from p2p.indexer.liveness import Leases, Liveness
from tests.test_indexer_protocol import DT, Fixture, Harness

T = 30.0  # the lease in these tests
ALICE_KEY = "a" * wire.FINGERPRINT_LENGTH
MALLORY_KEY = "b" * wire.FINGERPRINT_LENGTH


class FakeProber:
    """Records each probe; the test answers it with :meth:`answer`."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, int], Deferred]] = []

    def __call__(self, address: tuple[str, int]) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((address, d))
        return d

    @property
    def pending(self) -> list[tuple[tuple[str, int], Deferred]]:
        return [(a, d) for a, d in self.calls if not d.called]

    def answer(self, answered: bool) -> int:
        """Answer every pending probe; how many there were."""
        pending = self.pending
        for _address, d in pending:
            d.callback(answered)
        return len(pending)


class LiveHarness(Harness):
    """The indexer's factory with liveness on, a fake prober, and the memory clock."""

    def __init__(self, testcase: TestCase, audit: bool = False, max_probes: int = 64) -> None:
        super().__init__(testcase, audit=audit)
        self.prober = FakeProber()
        self.start(testcase, max_probes)

    def start(self, testcase: TestCase, max_probes: int = 64) -> None:
        """A fresh directory over the same store (as at start), and its liveness."""
        self.leases = Leases(T, self.clock.seconds)
        self.directory = Directory(self.store, audit=self.directory.audit, leases=self.leases)
        self.directory.load()
        self.factory.directory = self.directory
        self.liveness = Liveness(
            self.leases,
            self.clock,
            address_of=lambda user: self.directory.connected.get(user),
            drop=self.factory.expire,
            prober=self.prober,
            max_probes=max_probes,
        )
        self.factory.liveness = self.liveness
        self.liveness.start()
        testcase.addCleanup(self.liveness.stop)

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let ``seconds`` pass in small steps, as the reactor would."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() + step <= end:
            self.clock.advance(step)
        self.clock.advance(end - self.clock.seconds())

    def online(self) -> set[str]:
        return set(self.directory.connected)

    def stored_address(self, user: str):
        return {name: (ip, port) for name, ip, port in self.store.iter_users()}[user]


class Base(Fixture):
    """Fixture's state with liveness on: alice connected (port 5000), bob offline."""

    harness = LiveHarness

    def records(self) -> list[str]:
        return [r for _s, r in self.h.store.db.execute("SELECT seq, record FROM outbox")]


class Alive(Base):
    def test_codes(self) -> None:
        """0 and the lease in whole seconds; 1 no such user; 2 not connected."""
        self.assertEqual(self.h.request("ALIVE", "alice"), b"\x0030\x00")
        self.assertEqual(self.h.request("ALIVE", "carol"), b"\x01")
        self.assertEqual(self.h.request("ALIVE", "bob"), b"\x02")

    def test_claimed_name_needs_its_key(self) -> None:
        """The claim rules of section 6.3 apply: another key (or none) gets 3."""
        directory = self.h.directory
        self.assertEqual(directory.handle(wire.REGISTER, DT, "carol", [], None, ALICE_KEY)[0], 0)
        here = ("127.0.0.1", 7000)
        self.assertEqual(directory.handle(wire.CONNECT, DT, "carol", [7000], here, ALICE_KEY)[0], 0)
        self.assertEqual(directory.handle(wire.ALIVE, DT, "carol", [], None, MALLORY_KEY)[0], 3)
        self.assertEqual(directory.handle(wire.ALIVE, DT, "carol", [], None, None)[0], 3)
        self.assertNotIn("carol", self.h.leases.renewing)
        self.assertEqual(directory.handle(wire.ALIVE, DT, "carol", [], None, ALICE_KEY)[0], 0)
        self.assertIn("carol", self.h.leases.renewing)

    def test_renewing_user_stays_and_is_never_probed(self) -> None:
        for _ in range(30):  # ten leases, renewed every third of one
            self.assertEqual(self.h.request("ALIVE", "alice")[0], 0)
            self.h.advance(T / 3)
        self.assertEqual(self.h.online(), {"alice"})
        self.assertEqual(self.h.prober.calls, [])

    def test_any_request_renews(self) -> None:
        self.h.request("ALIVE", "alice")
        for _ in range(10):
            self.h.advance(T * 0.9)
            self.assertEqual(self.h.request("LIST_USERS", "alice")[0], 0)
        self.assertEqual(self.h.online(), {"alice"})
        self.assertEqual(self.h.prober.calls, [])

    def test_lease_runs_out(self) -> None:
        """Dropped without a probe once the lease is over (and one tick); files stay."""
        self.h.request("ALIVE", "alice")
        self.h.advance(T - 0.5)
        self.assertEqual(self.h.online(), {"alice"})
        self.h.advance(self.h.liveness.tick + 0.5)
        self.assertEqual(self.h.online(), set())
        self.assertEqual(self.h.prober.calls, [])
        self.assertEqual(self.h.stored_address("alice"), (None, None))
        self.assertEqual(self.h.store.user("alice").files, {"a.txt": "alice's file"})
        self.assertEqual(self.h.request("ALIVE", "alice"), b"\x02")  # the client learns it
        self.assertEqual(self.h.request("CONNECT", "alice", 5001), b"\x00")  # and is back


class Classic(Base):
    def test_probed_once_per_timeout(self) -> None:
        h = self.h
        h.advance(T - 1)
        self.assertEqual(h.prober.calls, [])
        h.advance(1 + h.liveness.tick)
        self.assertEqual([a for a, _d in h.prober.calls], [("127.0.0.1", 5000)])
        self.assertEqual(h.prober.answer(True), 1)
        h.advance(T - 2 * h.liveness.tick)
        self.assertEqual(len(h.prober.calls), 1, "probed again before a timeout had passed")
        h.advance(3 * h.liveness.tick)
        self.assertEqual(len(h.prober.calls), 2)
        self.assertEqual(h.online(), {"alice"})

    def test_requests_are_free_evidence(self) -> None:
        for _ in range(10):
            self.h.advance(T / 2)
            self.assertEqual(self.h.request("LIST_USERS", "alice")[0], 0)
        self.assertEqual(self.h.prober.calls, [])

    def test_no_answer_drops(self) -> None:
        self.h.advance(T + self.h.liveness.tick)
        self.assertEqual(self.h.prober.answer(False), 1)
        self.h.clock.advance(0)  # the turn's commit
        self.assertEqual(self.h.online(), set())
        self.assertEqual(self.h.stored_address("alice"), (None, None))
        self.assertFalse(self.h.store.in_transaction)

    def test_heard_from_during_the_probe(self) -> None:
        """A request that arrives while the probe runs is evidence: no drop."""
        self.h.advance(T + self.h.liveness.tick)
        self.assertEqual(self.h.request("LIST_USERS", "alice")[0], 0)
        self.h.prober.answer(False)
        self.assertEqual(self.h.online(), {"alice"})

    def test_disconnected_during_the_probe(self) -> None:
        self.h.advance(T + self.h.liveness.tick)
        self.assertEqual(self.h.request("DISCONNECT", "alice"), b"\0")
        self.assertEqual(self.h.request("CONNECT", "alice", 5002), b"\0")
        self.h.prober.answer(False)  # the old address: the new entry stays
        self.assertEqual(self.h.directory.connected, {"alice": ("127.0.0.1", 5002)})

    def test_probes_are_spread(self) -> None:
        """100 users due at once: about 100 / T per second, each probed within T."""
        for n in range(100):
            self.h.request("REGISTER", f"u{n}")
            self.h.request("CONNECT", f"u{n}", 6000 + n)
        self.h.advance(T - 1)
        self.h.prober.answer(True)  # alice, connected a moment earlier
        per_tick = []
        for _ in range(int(T / self.h.liveness.tick) + 2):
            self.h.clock.advance(self.h.liveness.tick)
            per_tick.append(self.h.prober.answer(True))
        limit = -(-101 * self.h.liveness.tick // T)  # ceil
        self.assertLessEqual(max(per_tick), limit)
        probed = {a[1] for a, _d in self.h.prober.calls}
        self.assertTrue({6000 + n for n in range(100)} <= probed)
        self.assertEqual(len(self.h.online()), 101)

    def test_probes_in_flight_are_bounded(self) -> None:
        h = LiveHarness(self, max_probes=8)
        for n in range(50):
            h.request("REGISTER", f"u{n}")
            h.request("CONNECT", f"u{n}", 6000 + n)
        h.advance(3 * T)  # nobody answers
        self.assertEqual(len(h.prober.pending), 8)
        h.prober.answer(False)
        self.assertEqual(len(h.online()), 50 - 8)
        h.advance(T)
        self.assertEqual(len(h.prober.pending), 8)

    def test_a_free_slot_is_used_within_the_tick(self) -> None:
        """Quick answers do not hold the rate at max_probes per tick: 300 users due
        together are probed at the tick's allowance (10), never more than 8 at once."""
        h = LiveHarness(self, max_probes=8)
        for n in range(300):
            h.request("REGISTER", f"u{n}")
            h.request("CONNECT", f"u{n}", 6000 + n)
        h.advance(T)
        h.prober.answer(True)  # the probes of the ticks so far
        before = len(h.prober.calls)
        h.clock.advance(h.liveness.tick)
        while h.prober.pending:
            self.assertLessEqual(len(h.prober.pending), 8)
            h.prober.answer(True)
        self.assertEqual(len(h.prober.calls) - before, -(-300 * h.liveness.tick // T))


class Audited(Base):
    audit = True

    def test_alive_is_not_audited(self) -> None:
        before = self.records()
        self.assertEqual(self.h.request("ALIVE", "alice")[0], 0)
        self.assertEqual(self.records(), before)

    def test_expiry_is_audited_as_disconnect(self) -> None:
        before = self.records()
        self.h.request("ALIVE", "alice")
        self.h.advance(T + self.h.liveness.tick)
        new = self.records()[len(before) :]
        self.assertEqual(len(new), 1, new)
        self.assertRegex(new[0], r"^alice DISCONNECT \d\d/\d\d/\d{4} \d\d:\d\d:\d\d$")
        from p2p.logger.program import valid_record

        self.assertTrue(valid_record(new[0]))

    def test_replaced_connect_is_audited_as_connect(self) -> None:
        before = self.records()
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_request("CONNECT", DT, "alice", 6000))
        self.h.clock.advance(0)
        self.h.prober.answer(False)
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), b"\0")
        self.assertEqual(self.records()[len(before) :], [f"alice CONNECT {DT}"])


class LockOut(Base):
    def connect_waiting(self, port: int = 6000):
        """Send CONNECT alice ``port``; the reply must wait for the probe."""
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_request("CONNECT", DT, "alice", port))
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), b"", "the reply must wait for the probe")
        self.assertEqual([a for a, _d in self.h.prober.pending], [("127.0.0.1", 5000)])
        return transport

    def test_dead_peer_is_replaced(self) -> None:
        transport = self.connect_waiting()
        self.h.prober.answer(False)
        self.assertEqual(transport.value(), b"", "no reply before the commit")
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), b"\0")
        self.assertEqual(self.h.directory.connected, {"alice": ("127.0.0.1", 6000)})
        self.assertEqual(self.h.stored_address("alice"), ("127.0.0.1", 6000))

    def test_live_peer_keeps_its_place(self) -> None:
        transport = self.connect_waiting()
        self.h.prober.answer(True)
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), b"\x02")
        self.assertEqual(self.h.directory.connected, {"alice": ("127.0.0.1", 5000)})

    def test_killed_right_after_a_renewal(self) -> None:
        """A client killed just after its ALIVE: its user's new client gets in at once."""
        self.h.request("ALIVE", "alice")
        self.h.advance(1)
        transport = self.connect_waiting()
        self.h.prober.answer(False)
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), b"\0")
        self.assertNotIn("alice", self.h.leases.renewing)  # the new client starts silent

    def test_other_requests_are_no_proof_against_connect(self) -> None:
        """The locked-out user's own LIST_USERS must not keep its dead entry."""
        self.h.request("LIST_USERS", "alice")
        self.connect_waiting()

    def test_two_connects_share_one_probe(self) -> None:
        first = self.connect_waiting()
        proto, second = self.h.connect()
        proto.dataReceived(wire.encode_request("CONNECT", DT, "alice", 7000))
        self.h.clock.advance(0)
        self.assertEqual(len(self.h.prober.calls), 1)
        self.h.prober.answer(False)
        self.h.clock.advance(0)
        self.assertEqual((first.value(), second.value()), (b"\0", b"\x02"))

    def test_claimed_name_is_not_probed_for_another_key(self) -> None:
        directory = self.h.directory
        directory.handle(wire.REGISTER, DT, "carol", [], None, ALICE_KEY)
        directory.handle(wire.CONNECT, DT, "carol", [7000], ("127.0.0.1", 7000), ALICE_KEY)
        self.assertIsNone(directory.stale_address("carol", MALLORY_KEY))
        self.assertIsNone(directory.stale_address("carol", None))
        self.assertEqual(directory.stale_address("carol", ALICE_KEY), ("127.0.0.1", 7000))

    def test_stopped_while_waiting(self) -> None:
        transport = self.connect_waiting()
        self.h.factory.stop()
        self.h.liveness.stop()
        self.assertEqual(transport.value(), bytes([wire.CONNECT.error]))


class Restart(Base):
    def test_grace_then_probe(self) -> None:
        """After a restart everyone gets one full lease; a silent user is then probed."""
        self.h.request("REGISTER", "carol")
        self.h.request("CONNECT", "carol", 5003)
        self.h.store.commit()
        self.h.advance(T / 2)
        self.h.liveness.stop()
        self.h.start(self)  # the restart: leases only in memory, loaded afresh
        self.assertEqual(self.h.online(), {"alice", "carol"})
        for _ in range(6):
            self.h.advance(T / 3)
            self.h.request("ALIVE", "alice")
        self.assertEqual([a for a, _d in self.h.prober.calls], [("127.0.0.1", 5003)])
        self.h.prober.answer(False)
        self.assertEqual(self.h.online(), {"alice"})

    def test_leases_survive_a_reload(self) -> None:
        """A failed commit reloads the directory: renewing users keep their leases."""
        self.h.request("ALIVE", "alice")
        self.h.directory.load()
        self.assertIn("alice", self.h.leases.renewing)


class Option(TestCase):
    def test_peer_timeout(self) -> None:
        """``--peer-timeout`` (default 60 s) is the lease of the directory the service makes."""
        from twisted.python import usage

        from p2p.indexer.service import Options, makeService

        def leases(*argv: str) -> Leases:
            options = Options()
            options.parseOptions(["--db", ":memory:", *argv])
            service = makeService(options)
            return next(iter(service)).directory.leases

        self.assertEqual(leases().timeout, wire.DEFAULT_PEER_TIMEOUT)
        self.assertEqual(leases("--peer-timeout", "2").seconds, 2)
        for bad in ("0", "-1", "soon"):
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--peer-timeout", bad])


class OperatorLines(Base):
    def test_alive_prints_no_line(self) -> None:
        """A heartbeat every few seconds per user would drown the operator's console."""
        del self.h.lines[:]
        self.assertEqual(self.h.request("ALIVE", "alice")[0], 0)
        self.assertEqual(self.h.request("LIST_USERS", "alice")[0], 0)
        self.assertEqual(self.h.lines, ["s> LIST_USERS FROM alice"])
