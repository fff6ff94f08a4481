"""The client keeps its user listed: the ALIVE lease (issue 15, items 2, 4 and 7).

Unit tests drive the shell on a fake clock against a scripted indexer: the
renewal cadence from the lease the indexer gives, renewals going on while a
command waits, an indexer that does not know ALIVE, the notice when the
indexer has dropped the user and the reconnection by itself, the failure path
going offline; stdout never gets a line from any of it. The indexer client's
part (ALIVE's reply field, its stamp without the time service) runs over real
sockets. The peer server takes a probe (a connection closed without a byte)
silently.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase

from p2p import tls, wire
from p2p.client import lease as lease_module
from p2p.client.home import Home
from p2p.client.indexer_client import (
    IndexerClient,
    IndexerError,
    UnknownOperation,
    _Channel,
    reply_shape,
)
from p2p.client.shell import Shell
from p2p.client.time_client import advanced
from p2p.peer.server import PeerServer
from tests.support import DEADLINE, deadline, exchange, hold_port, poll_until
from tests.test_client_e2e import ShellProcess, Stack
from tests.test_client_indexer import ScriptedIndexer
from tests.test_client_interop import ARITY, ClassicIndexer
from tests.test_client_shell import FakeOutput, FakeServer
from tests.test_indexer_e2e import indexer_db

LEASE = 30  # seconds, as the scripted indexer announces it
DEFAULT_ANSWERS = {
    "ALIVE": (wire.OK, [(str(LEASE),)]),
    "HOLD": (wire.OK, [(str(LEASE),)]),
    "CONNECT": (wire.OK, None),
    "DISCONNECT": (wire.OK, None),
    "LIST_USERS": (wire.OK, []),
    "LIST_PEERS": (wire.OK, [("bob", "127.0.0.1", "4343", "-")]),
}


class AnsweringIndexer:
    """What the shell asks, answered from ``answers[op]`` (a queue) or the defaults.

    An answer is ``(code, rows)``, an exception to fail with, or a Deferred
    (answered when the test fires it).
    """

    classic = False

    def __init__(self) -> None:
        self.requests: list[tuple] = []
        self.answers: dict[str, list] = {}

    def request(self, op: str, user: str, *args, identity=None) -> Deferred:
        self.requests.append((op, user, *args))
        queue = self.answers.get(op)
        answer = queue.pop(0) if queue else DEFAULT_ANSWERS[op]
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def ops(self, op: str | None = None) -> list[tuple]:
        return [r for r in self.requests if op is None or r[0] == op]

    def hold(self, user: str, on_lost) -> Deferred:
        """HOLD; ``lose()`` then plays the held connection closing."""
        self.on_lost = on_lost
        return self.request("HOLD", user)

    def unhold(self, user: str) -> None:
        self.requests.append(("unhold", user))

    def lose(self) -> None:
        """The connection the indexer held the lease on closes."""
        self.on_lost()


class LeaseFixture(TestCase):
    """A shell over an indexer that answers from a script, on the memory clock."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.output = FakeOutput()
        self.indexer = AnsweringIndexer()
        self.servers: list[FakeServer] = []
        self.download: Deferred | None = None
        self.share = share = Path(self.mktemp())
        share.mkdir()

        def server_factory(share_dir, is_published, reactor=None):
            self.servers.append(FakeServer(share_dir, is_published, reactor))
            return self.servers[-1]

        def download(*_args, **_kw):
            self.download = Deferred()
            return self.download

        self.shell = Shell(
            self.indexer,
            self.output,
            share,
            reactor=self.clock,
            server_factory=server_factory,
            download=download,
            no_such_file=KeyError,
            home=Home(self.mktemp()),
        )
        self.lease = self.shell.session.lease
        self.lease.hold_supported = self.holds
        self.events: list[dict] = []
        self.lease.log = Logger(observer=self.events.append)

    #: These tests renew with ALIVE, as against an indexer that cannot hold the lease
    #: (HoldTests below: one that can).
    holds = False

    def connect(self) -> None:
        self.shell.submit("CONNECT alice")
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])

    def alive(self) -> int:
        return len(self.indexer.ops("ALIVE"))

    def notes(self, text: str) -> list[str]:
        return [n for n in self.output.notes if text in n]


class LeaseTests(LeaseFixture):
    """Renewing with ALIVE (an indexer that cannot hold the lease)."""

    def test_renews_right_after_connect_then_every_third_of_the_lease(self) -> None:
        self.connect()
        self.assertEqual(self.alive(), 0)
        self.clock.advance(0)  # right after CONNECT OK, on the reactor
        self.assertEqual(self.indexer.requests[-1], ("ALIVE", "alice"))
        self.clock.advance(LEASE / 3 - 0.1)
        self.assertEqual(self.alive(), 1)
        self.indexer.answers["ALIVE"] = [(wire.OK, [("6",)])]  # a new lease: 6 s
        self.clock.advance(0.1)
        self.assertEqual(self.alive(), 2)
        self.clock.advance(1.9)
        self.assertEqual(self.alive(), 2)
        self.clock.advance(0.1)
        self.assertEqual(self.alive(), 3)
        self.clock.pump([LEASE / 3] * 30)  # five minutes idle at the prompt
        self.assertEqual(self.alive(), 33)
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])
        self.assertEqual(self.notes("dropped"), [])

    def test_renews_while_a_download_runs(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.shell.submit("GET_FILE bob big.iso big.iso")
        self.shell.submit("LIST_USERS")  # waits behind the download
        self.assertIsNotNone(self.download)
        self.clock.pump([LEASE / 3] * 12)
        self.assertEqual(self.alive(), 13)
        self.assertEqual(self.indexer.ops("LIST_USERS"), [])
        self.assertNoResult(self.shell.ended)
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])

    def test_an_indexer_without_alive_is_not_asked_again(self) -> None:
        self.indexer.answers["ALIVE"] = [UnknownOperation("the indexer does not know ALIVE")]
        self.connect()
        self.clock.advance(0)
        self.clock.pump([LEASE / 3] * 10)
        self.assertEqual(self.alive(), 1)
        self.shell.submit("DISCONNECT alice")
        self.shell.submit("CONNECT alice")
        self.clock.pump([0] + [LEASE / 3] * 10)
        self.assertEqual(self.alive(), 1)
        self.assertEqual(self.output.lines, ["c> CONNECT OK", "c> DISCONNECT OK", "c> CONNECT OK"])
        self.assertEqual([n for n in self.output.notes if "ALIVE" in n], [])
        said = [e for e in self.events if "does not know ALIVE" in e["log_format"]]
        self.assertEqual(len(said), 1)  # one --verbose line

    def test_an_unreachable_indexer_is_asked_again_sooner(self) -> None:
        """After a failed renewal the next comes at a third of the interval, so a blip
        of two thirds of the lease does not lose it."""
        refused = IndexerError("connection refused")
        lease36 = (wire.OK, [("36",)])
        self.indexer.answers["ALIVE"] = [lease36, refused, refused, lease36]
        self.connect()
        self.clock.advance(0)
        self.clock.advance(12)
        self.assertEqual(self.alive(), 2)  # refused
        self.clock.advance(3.5)
        self.assertEqual(self.alive(), 2)
        self.clock.advance(0.5)
        self.assertEqual(self.alive(), 3)  # refused again
        self.clock.advance(4)
        self.assertEqual(self.alive(), 4)  # answered: every 12 s again
        self.clock.advance(11.5)
        self.assertEqual(self.alive(), 4)
        self.clock.advance(0.5)
        self.assertEqual(self.alive(), 5)
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])
        self.assertEqual(self.output.notes, [f"serving {self.share} to peers on port 4242"])
        self.assertEqual(self.notes("dropped"), [])

    def test_before_the_first_answer_the_default_lease(self) -> None:
        self.indexer.answers["ALIVE"] = [IndexerError("timed out")]
        self.connect()
        self.clock.advance(0)
        self.clock.advance(lease_module.DEFAULT_LEASE / 9 - 0.1)
        self.assertEqual(self.alive(), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.alive(), 2)

    def test_a_slow_answer_never_overlaps_the_next_renewal(self) -> None:
        slow: Deferred = Deferred()
        self.indexer.answers["ALIVE"] = [slow]
        self.connect()
        self.clock.advance(0)
        self.clock.pump([LEASE / 3] * 3)
        self.assertEqual(self.alive(), 1)
        slow.callback((wire.OK, [(str(LEASE),)]))  # late: the next one goes at once
        self.clock.advance(0)
        self.assertEqual(self.alive(), 2)

    def test_dropped_after_the_lease_expired_reconnects_with_the_same_port(self) -> None:
        down = IndexerError("down")
        self.indexer.answers["ALIVE"] = [(wire.OK, [("30",)])] + [down] * 10 + [(2, None)]
        self.connect()
        self.clock.advance(0)
        self.clock.pump([LEASE / 3] + [LEASE / 9] * 10)  # 43 s without a renewal
        self.assertEqual(self.alive(), 12)
        self.assertEqual(self.indexer.requests[-1], ("CONNECT", "alice", 4242))
        dropped = self.notes("the indexer dropped alice")
        self.assertEqual(len(dropped), 1)
        self.assertIn("expired", dropped[0])
        self.assertTrue(dropped[0].endswith("; reconnecting"))
        self.assertEqual(len(self.notes("alice is connected again")), 1)
        self.assertEqual(self.shell.user, "alice")
        self.assertFalse(self.servers[0].stopped)
        self.clock.advance(LEASE / 3)
        self.assertEqual(self.indexer.requests[-1], ("ALIVE", "alice"))  # renewing again
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])  # no c> line for any of it

    def test_a_disconnect_this_shell_did_not_send_is_named(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.indexer.answers["ALIVE"] = [(2, None)]
        self.clock.advance(LEASE / 3)
        dropped = self.notes("the indexer dropped alice")
        self.assertEqual(len(dropped), 1)
        self.assertIn("a DISCONNECT this shell did not send", dropped[0])
        self.assertIn("unclaimed", dropped[0])
        self.assertEqual(self.indexer.requests[-1], ("CONNECT", "alice", 4242))
        self.assertEqual(self.shell.user, "alice")
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])

    def test_a_claimed_name_points_at_its_key(self) -> None:
        self.shell.session.home.create_identity("alice", tls.Identity.generate())
        self.connect()
        self.indexer.answers["ALIVE"] = [(2, None)]
        self.clock.advance(0)
        self.assertIn("another client with alice's key", self.notes("dropped")[0])

    def test_reconnect_refused_goes_offline(self) -> None:
        self.connect()
        self.indexer.answers["ALIVE"] = [(2, None)]
        self.indexer.answers["CONNECT"] = [(wire.CONNECT.own, None)]
        self.clock.advance(0)
        failed = self.notes("could not connect alice again")
        self.assertEqual(len(failed), 1)
        self.assertIn("connected from another client", failed[0])
        self.assertIsNone(self.shell.user)
        self.assertTrue(self.servers[0].stopped)
        self.clock.pump([LEASE / 3] * 5)
        self.assertEqual(self.alive(), 1)  # offline: nothing to renew
        self.shell.submit("PUBLISH f.txt a file")
        self.assertEqual(
            self.output.lines, ["c> CONNECT OK", "c> PUBLISH FAIL, USER NOT CONNECTED"]
        )

    def test_reconnect_unreachable_goes_offline(self) -> None:
        self.connect()
        self.indexer.answers["ALIVE"] = [(1, None)]
        self.indexer.answers["CONNECT"] = [IndexerError("connection refused")]
        self.clock.advance(0)
        self.assertIn("no longer knows alice", self.notes("the indexer dropped alice")[0])
        self.assertIn("connection refused", self.notes("could not connect alice again")[0])
        self.assertIsNone(self.shell.user)
        self.assertTrue(self.servers[0].stopped)
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])

    def test_our_own_disconnect_is_not_a_drop(self) -> None:
        held: Deferred = Deferred()
        self.connect()
        self.indexer.answers["ALIVE"] = [held]
        self.clock.advance(0)  # a renewal is on its way ...
        self.shell.submit("DISCONNECT alice")  # ... when the user disconnects
        held.callback((2, None))
        self.clock.pump([LEASE / 3] * 5)
        self.assertEqual(self.output.lines, ["c> CONNECT OK", "c> DISCONNECT OK"])
        self.assertEqual(self.notes("dropped"), [])
        self.assertEqual(self.indexer.ops("CONNECT"), [("CONNECT", "alice", 4242)])
        self.assertEqual(self.alive(), 1)

    def test_a_refused_disconnect_keeps_renewing(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.indexer.answers["DISCONNECT"] = [(3, None)]
        self.shell.submit("DISCONNECT alice")
        self.assertEqual(self.shell.user, "alice")
        self.clock.advance(0)
        self.assertEqual(self.alive(), 2)
        self.clock.advance(LEASE / 3)
        self.assertEqual(self.alive(), 3)

    def test_a_late_reconnect_after_the_shell_disconnected_is_undone(self) -> None:
        late: Deferred = Deferred()
        self.connect()
        self.indexer.answers["ALIVE"] = [(2, None)]
        self.indexer.answers["CONNECT"] = [late]
        self.clock.advance(0)
        self.shell.submit("DISCONNECT alice")
        late.callback((wire.OK, None))
        self.assertIsNone(self.shell.user)
        self.assertEqual(self.indexer.requests[-1], ("DISCONNECT", "alice"))
        self.assertEqual(self.notes("connected again"), [])

    def test_quit_stops_renewing(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.shell.submit("QUIT")
        self.clock.pump([LEASE / 3] * 5)
        self.assertEqual(self.alive(), 1)
        self.assertFalse(self.clock.getDelayedCalls())


class HoldTests(LeaseFixture):
    """The indexer holds the lease on the kept connection (protocol.md 7.3)."""

    holds = True

    def hold(self) -> int:
        return len(self.indexer.ops("HOLD"))

    def test_held_after_connect_then_nothing_is_sent(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.assertEqual(self.indexer.requests[-1], ("HOLD", "alice"))
        self.clock.pump([LEASE / 3] * 30)  # ten leases idle at the prompt
        self.assertEqual((self.hold(), self.alive()), (1, 0))
        self.assertTrue(self.lease.running)
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])

    def test_lost_connection_is_held_again_at_once(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.indexer.lose()
        self.assertEqual(self.hold(), 1)
        self.clock.advance(0)
        self.assertEqual(self.hold(), 2)
        self.assertEqual(self.notes("dropped"), [])

    def test_unreachable_after_a_loss_is_asked_again_every_ninth(self) -> None:
        refused = IndexerError("connection refused")
        self.connect()
        self.clock.advance(0)
        self.indexer.answers["HOLD"] = [refused, refused]
        self.indexer.lose()
        self.clock.advance(0)
        self.assertEqual(self.hold(), 2)  # refused
        self.clock.advance(LEASE / 9 - 0.1)
        self.assertEqual(self.hold(), 2)
        self.clock.advance(0.1)
        self.assertEqual(self.hold(), 3)  # refused again
        self.clock.advance(LEASE / 9)
        self.assertEqual(self.hold(), 4)  # held
        self.clock.pump([LEASE / 3] * 10)
        self.assertEqual((self.hold(), self.alive()), (4, 0))

    def test_an_indexer_without_hold_gets_alive(self) -> None:
        self.indexer.answers["HOLD"] = [UnknownOperation("the indexer does not know HOLD")]
        self.connect()
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual((self.hold(), self.alive()), (1, 1))
        self.clock.advance(LEASE / 3)
        self.assertEqual(self.alive(), 2)
        self.shell.submit("DISCONNECT alice")
        self.shell.submit("CONNECT alice")
        self.clock.pump([0, 0])
        self.assertEqual((self.hold(), self.alive()), (1, 3))  # HOLD is not asked again
        said = [e for e in self.events if "does not know HOLD" in e["log_format"]]
        self.assertEqual(len(said), 1)

    def test_code_3_is_asked_again_a_third_of_the_lease_later(self) -> None:
        """3 is a refusal of this HOLD (a failing store, say), not of HOLD itself."""
        self.indexer.answers["HOLD"] = [(3, None)]
        self.connect()
        self.clock.pump([0, 0])
        self.assertEqual((self.hold(), self.alive()), (1, 0))
        self.clock.advance(lease_module.DEFAULT_LEASE / 3 - 0.1)  # no lease announced yet
        self.assertEqual(self.hold(), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.hold(), 2)  # held now
        self.clock.pump([LEASE / 3] * 10)
        self.assertEqual((self.hold(), self.alive()), (2, 0))

    def test_a_classic_fallback_connection_renews_with_alive(self) -> None:
        """Plaintext (the indexer spoke no TLS): nothing can hold, ALIVE every third."""
        self.indexer.classic = True
        self.connect()
        self.clock.pump([0, LEASE / 3])
        self.assertEqual((self.hold(), self.alive()), (0, 2))

    def test_dropped_is_noticed_reconnected_and_held_again(self) -> None:
        self.connect()
        self.clock.advance(0)
        self.indexer.answers["HOLD"] = [(wire.HOLD.not_connected, None)]
        self.indexer.lose()
        self.clock.pump([0, 0, 0])
        self.assertEqual(len(self.notes("the indexer dropped alice")), 1)
        self.assertEqual(len(self.indexer.ops("CONNECT")), 2)
        self.assertEqual(self.hold(), 3)
        self.assertEqual(len(self.notes("is connected again")), 1)

    def test_disconnect_unholds_and_a_late_loss_is_ignored(self) -> None:
        self.connect()
        self.clock.advance(0)
        on_lost = self.indexer.on_lost
        self.shell.submit("DISCONNECT alice")
        self.assertIn(("unhold", "alice"), self.indexer.requests)
        on_lost()
        self.clock.pump([0, LEASE])
        self.assertEqual(self.hold(), 1)
        self.assertFalse(self.lease.running)


class StampTests(TestCase):
    def test_advanced(self) -> None:
        self.assertEqual(advanced("31/12/2026 23:59:50", 15.7), "01/01/2027 00:00:05")
        self.assertEqual(advanced("28/02/2026 12:00:00", 86400), "01/03/2026 12:00:00")
        self.assertEqual(advanced("29/03/2026 01:59:59", 1), "29/03/2026 02:00:00")  # no DST
        self.assertIsNone(advanced("yesterday", 3))

    def test_alive_is_stamped_without_the_time_service(self) -> None:
        clock = task.Clock()
        asked: list[str] = []
        sent: list[bytes] = []

        def timestamp() -> Deferred:
            asked.append("now")
            return defer.succeed("25/11/2026 02:15:41")

        client = IndexerClient("127.0.0.1", 9, timestamp, reactor=clock, use_tls=False)
        client._classic = lambda payload, _shape: sent.append(payload) or defer.succeed((0, None))
        client.request("ALIVE", "alice")  # before any stamp: the local clock
        self.assertEqual(asked, [])
        client.request("LIST_USERS", "alice")
        clock.advance(47)
        client.request("ALIVE", "alice")
        self.assertEqual(asked, ["now"])
        self.assertEqual(sent[-1], wire.encode_request("ALIVE", "25/11/2026 02:16:28", "alice"))
        wire.decode_field(sent[0].split(b"\0")[1], wire.FieldKind.DATETIME)


class KeptConnectionTests(TestCase):
    """ALIVE's reply on the kept TLS connection: the lease read, the connection kept."""

    def channel(self) -> tuple[_Channel, StringTransport]:
        channel = _Channel(tls.client_options(None, None), task.Clock(), wire.CLIENT_IDLE)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.handshakeCompleted()
        return channel, transport

    def test_the_lease_in_pieces_keeps_the_connection(self) -> None:
        channel, transport = self.channel()
        columns, count = reply_shape("ALIVE")
        d = channel.ask(b"ALIVE...", columns, 5, count)
        channel.dataReceived(b"\x00")
        self.assertNoResult(d)
        channel.dataReceived(b"60\x00")
        self.assertEqual(self.successResultOf(d), (0, [("60",)]))
        self.assertTrue(channel.alive)
        self.assertFalse(transport.disconnecting)

    def test_not_connected_keeps_the_connection(self) -> None:
        channel, _transport = self.channel()
        d = channel.ask(b"ALIVE...", 1, 5, 1)
        channel.dataReceived(b"\x02")
        self.assertEqual(self.successResultOf(d), (2, None))
        self.assertTrue(channel.alive)


class AliveReplyTests(TestCase):
    """ALIVE through the real client and a socket: the lease field, a classic indexer."""

    def serve(self, reply: bytes | None) -> int:
        factory = protocol.Factory.forProtocol(ScriptedIndexer)
        factory.reply = reply
        factory.fields = 3
        factory.received = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_the_lease_follows_code_0(self) -> None:
        port = self.serve(b"\x0060\x00")
        client = IndexerClient("127.0.0.1", port, _stamp, timeout=5, use_tls=False)
        self.assertEqual((yield deadline(client.request("ALIVE", "alice"))), (0, [("60",)]))

    @defer.inlineCallbacks
    def test_not_connected_has_no_field(self) -> None:
        port = self.serve(b"\x02")
        client = IndexerClient("127.0.0.1", port, _stamp, timeout=5, use_tls=False)
        self.assertEqual((yield deadline(client.request("ALIVE", "alice"))), (2, None))

    @defer.inlineCallbacks
    def test_a_classic_indexer_closes_without_a_byte(self) -> None:
        port = self.serve(b"")
        client = IndexerClient("127.0.0.1", port, _stamp, timeout=5, use_tls=False)
        with self.assertRaises(UnknownOperation):
            yield deadline(client.request("ALIVE", "alice"))


def _stamp() -> Deferred:
    return defer.succeed("01/02/2026 03:04:05")


class RestartingIndexer(protocol.Protocol):
    """TLS; the first ``factory.silent`` connections close on their request unanswered
    (an indexer restarting, or one that does not know the operation), later ones answer."""

    def connectionMade(self) -> None:
        self.data = b""
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.count(b"\0") >= 3:
            if self.factory.connections <= self.factory.silent:
                self.transport.loseConnection()
            else:
                self.transport.write(b"\x0060\x00")


class UnansweredOnANewConnectionTests(TestCase):
    """An extension closed unanswered on a new TLS connection is asked once more on
    another before the client concludes the indexer does not know it."""

    def serve(self, silent: int) -> int:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = protocol.Factory.forProtocol(RestartingIndexer)
        factory.connections, factory.silent = 0, silent
        self.factory = factory
        wrapped = TLSMemoryBIOFactory(tls.server_options(tls.Identity.generate()), False, factory)
        port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_a_restart_is_not_taken_for_an_unknown_operation(self) -> None:
        client = IndexerClient("127.0.0.1", self.serve(silent=1), _stamp, timeout=5)
        self.addCleanup(client.close)
        self.assertEqual((yield deadline(client.request("HOLD", "alice"))), (0, [("60",)]))
        self.assertEqual(self.factory.connections, 2)

    @defer.inlineCallbacks
    def test_twice_unanswered_is_an_unknown_operation(self) -> None:
        client = IndexerClient("127.0.0.1", self.serve(silent=2), _stamp, timeout=5)
        self.addCleanup(client.close)
        with self.assertRaises(UnknownOperation):
            yield deadline(client.request("HOLD", "alice"))
        self.assertEqual(self.factory.connections, 2)


class ProbeTests(TestCase):
    """The indexer's probe (a TCP connect closed at once, no byte) leaves no trace."""

    @defer.inlineCallbacks
    def probe(self, identity: tls.Identity | None, reset: bool) -> None:
        share = Path(self.mktemp())
        share.mkdir()
        server = PeerServer(share, lambda _name: False, reactor, identity=identity)
        port = yield server.listen("tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        accepted: list[object] = []
        build = server.factory.buildProtocol

        def counting(addr):
            accepted.append(addr)
            return build(addr)

        server.factory.buildProtocol = counting
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        yield poll_until(
            lambda: len(accepted) == 3 and not server.connections, what="the probes closed"
        )
        self.assertEqual([e["log_format"] for e in events], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_plain(self) -> defer.Deferred:
        return self.probe(None, reset=False)

    def test_plain_reset(self) -> defer.Deferred:
        return self.probe(None, reset=True)

    def test_tls(self) -> defer.Deferred:
        return self.probe(tls.Identity.generate(), reset=False)

    def test_tls_reset(self) -> defer.Deferred:
        return self.probe(tls.Identity.generate(), reset=True)


PEER_TIMEOUT = 2  # the indexer's --peer-timeout in the end-to-end tests


class _SlowPeer(protocol.Protocol):
    """bob's peer: answers a FETCH with the first half of the file, the rest on ``finish``;
    takes the indexer's probes (no request) silently."""

    CONTENT = b"0123456789" * 100

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"FETCH\0") and self.factory.serving is None:
            half = len(self.CONTENT) // 2
            self.transport.write(b"\0%d\0" % len(self.CONTENT) + self.CONTENT[:half])
            self.factory.serving = self


class _SlowPeerFactory(protocol.Factory):
    protocol = _SlowPeer
    serving: _SlowPeer | None = None

    def finish(self) -> None:
        half = len(_SlowPeer.CONTENT) // 2
        self.serving.transport.write(_SlowPeer.CONTENT[half:])
        self.serving.transport.loseConnection()


class LiveClientTests(TestCase):
    """Our client against a real ``twistd p2p-indexer --peer-timeout 2``.

    Time is measured by events, never by sleeping: carol, a classic user whose
    announced port refuses connections, is dropped by the indexer once per
    timeout; every listing taken meanwhile must still show the live client.
    bob, a classic user with a listening peer port, asks for the listings.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        db = Path(self.mktemp()).resolve()
        db.mkdir()
        self.stack.indexer_options = (
            "--peer-timeout",
            str(PEER_TIMEOUT),
            "--db",
            indexer_db(self, str(db / "db")),
        )
        yield self.stack.start_indexer()
        self.bob = _SlowPeerFactory()
        bob_peer = reactor.listenTCP(0, self.bob, interface="127.0.0.1")
        self.addCleanup(bob_peer.stopListening)
        self.assertEqual((yield self.stack.raw("REGISTER", "bob"))[0], wire.OK)
        self.assertEqual((yield self.stack.raw("REGISTER", "carol"))[0], wire.OK)
        code, _ = yield self.stack.raw("CONNECT", "bob", bob_peer.getHost().port)
        self.assertEqual(code, wire.OK)
        self.refusing = hold_port(self)

    @defer.inlineCallbacks
    def listed(self):
        """The users bob's LIST_USERS shows now."""
        code, rows = yield self.stack.raw("LIST_USERS", "bob")
        self.assertEqual(code, wire.OK)
        return {row[0] for row in rows}

    @defer.inlineCallbacks
    def until(self, predicate, what: str, always: str | None = None):
        """Ask for the listing until ``predicate(names)``; each must show ``always``."""
        start = reactor.seconds()
        while True:
            names = yield self.listed()
            if always is not None:
                self.assertIn(always, names, f"{always} left while waiting for {what}")
            if predicate(names):
                return reactor.seconds() - start
            if reactor.seconds() - start > DEADLINE:
                raise defer.TimeoutError(f"{what} not reached in {DEADLINE}s")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def timeouts_pass(self, count: int, always: str):
        """Let ``count`` peer timeouts pass (carol dropped each time); ``always`` stays."""
        for _ in range(count):
            code, _ = yield self.stack.raw("CONNECT", "carol", self.refusing)
            self.assertEqual(code, wire.OK)
            yield self.until(lambda names: "carol" not in names, "carol dropped", always)

    def unprobed_shell(self) -> ShellProcess:
        """alice, whose peer server listens on 127.0.0.2 while the indexer records the
        address her requests come from (127.0.0.1): a probe would find nothing there,
        so only her renewals can keep her listed."""
        return self.stack.shell("alice", extra=("--peer-listen", "tcp:0:interface=127.0.0.2"))

    def no_notice(self, shell: ShellProcess) -> None:
        self.assertEqual([e for e in shell.proc.errlines if "dropped" in e], [])

    @defer.inlineCallbacks
    def test_a_live_client_stays_listed_idle_and_across_a_restart(self):
        alice = self.unprobed_shell()  # stdin stays open: idle at its prompt
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        yield self.timeouts_pass(3, always="alice")
        yield self.stack.indexer.stop()
        yield self.stack.start_indexer()
        yield self.timeouts_pass(3, always="alice")
        self.no_notice(alice)
        self.assertEqual(alice.lines, ["c> REGISTER OK", "c> CONNECT OK"], alice.proc.output())
        yield alice.check("DISCONNECT alice", "c> DISCONNECT OK")

    @defer.inlineCallbacks
    def test_an_outside_disconnect_is_noticed_and_undone(self):
        self.assertEqual((yield self.stack.raw("REGISTER", "alice"))[0], wire.OK)  # unclaimed
        alice = self.stack.shell("alice")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        # Someone else's classic DISCONNECT, from a raw socket.
        raw = b"DISCONNECT\x0025/11/2026 02:15:41\x00alice\x00"
        self.assertEqual((yield exchange(self.stack.port, raw)), b"\x00")
        notice = yield alice.proc.wait_for_line(
            r"the indexer dropped alice \((.*)\); reconnecting$"
        )
        self.assertIn("a DISCONNECT this shell did not send", notice.group(1))
        yield alice.proc.wait_for_line(r"alice is connected again, serving on port \d+$")
        yield self.until(lambda names: "alice" in names, "alice listed again")
        yield self.timeouts_pass(1, always="alice")
        self.assertEqual(len([e for e in alice.proc.errlines if "dropped" in e]), 1)
        self.assertEqual(alice.lines, ["c> CONNECT OK"], alice.proc.output())
        yield alice.check("LIST_CONTENT bob", "c> LIST_CONTENT OK")

    @defer.inlineCallbacks
    def test_a_client_stays_listed_through_a_long_download(self):
        """A GET_FILE that stalls for three timeouts holds the shell's commands, not the
        renewals (bob's peer sends half the file, waits, then the rest)."""
        alice = self.unprobed_shell()
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        alice.proc.write(b"GET_FILE bob big.bin big.bin\nLIST_CONTENT bob\n")
        yield poll_until(lambda: self.bob.serving, what="bob's peer asked for big.bin")
        yield self.timeouts_pass(3, always="alice")
        self.assertEqual(alice.lines, ["c> REGISTER OK", "c> CONNECT OK"])  # still running
        self.bob.finish()
        yield poll_until(lambda: len(alice.lines) == 4, what="GET_FILE and LIST_CONTENT")
        self.assertEqual(alice.lines[2:], ["c> GET_FILE OK", "c> LIST_CONTENT OK"])
        self.assertEqual((alice.cwd / "big.bin").read_bytes(), _SlowPeer.CONTENT)
        self.no_notice(alice)

    @defer.inlineCallbacks
    def test_a_killed_client_leaves_and_its_user_comes_back(self):
        alice = self.stack.shell("alice")
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        other = self.stack.shell("alice elsewhere", home=alice.home)
        yield other.check("CONNECT alice", "c> USER ALREADY CONNECTED")  # alice is alive
        yield other.proc.wait_for_line(r"CONNECT: the indexer lists alice as connected from")
        yield alice.proc.kill()
        yield self.until(lambda names: "alice" not in names, "the killed alice gone")
        yield other.check("CONNECT alice", "c> CONNECT OK")
        yield self.until(lambda names: "alice" in names, "alice listed again")

    @defer.inlineCallbacks
    def test_a_killed_users_new_client_connects_at_once(self):
        alice = self.stack.shell("alice")
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        yield alice.proc.kill()
        self.assertIn("alice", (yield self.listed()))  # not timed out yet
        again = self.stack.shell("alice again", home=alice.home)
        yield again.check("CONNECT alice", "c> CONNECT OK")  # the stale entry replaced
        self.no_notice(again)
        yield self.timeouts_pass(2, always="alice")


class _SeenOps(ClassicIndexer):
    """The interop tests' classic indexer, also keeping the operations it does not know
    (a TLS ClientHello's first bytes among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.unknown: list[bytes] = []

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        received = proto.dataReceived

        def data_received(data: bytes) -> None:
            op = data.split(b"\0", 1)[0]
            if op not in ARITY and not proto.buffer:
                self.unknown.append(op)
            received(data)

        proto.dataReceived = data_received
        return proto


class ClassicIndexerLeaseTests(TestCase):
    """Against a classic indexer the client tries ALIVE once, then never again."""

    @defer.inlineCallbacks
    def test_alive_is_tried_once_per_session(self):
        indexer = _SeenOps()
        listening = reactor.listenTCP(0, indexer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        wsdl = f"http://127.0.0.1:{hold_port(self)}/?wsdl"
        quiet = ShellProcess(self, "alice", port, wsdl)
        verbose = ShellProcess(self, "bob", port, wsdl, extra=("--verbose",))
        for shell, user in ((quiet, "alice"), (verbose, "bob")):
            yield shell.check(f"REGISTER {user}", "c> REGISTER OK")
            yield shell.check(f"CONNECT {user}", "c> CONNECT OK")
        yield poll_until(lambda: indexer.unknown.count(b"ALIVE") == 2, what="each one's ALIVE")
        for shell, user in ((quiet, "alice"), (verbose, "bob")):
            yield shell.check(f"DISCONNECT {user}", "c> DISCONNECT OK")
            yield shell.check(f"CONNECT {user}", "c> CONNECT OK")
            yield shell.check("LIST_CONTENT alice", "c> LIST_CONTENT OK")
            yield shell.check("LIST_CONTENT alice", "c> LIST_CONTENT OK")
        self.assertEqual(indexer.unknown.count(b"ALIVE"), 2)
        self.assertEqual([e for e in quiet.proc.errlines if "ALIVE" in e], [])
        said = [e for e in verbose.proc.errlines if "does not know ALIVE" in e]
        self.assertEqual(len(said), 1, verbose.proc.output())
