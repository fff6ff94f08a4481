"""HOLD (protocol.md section 7.3): a kept TLS connection holds its user's lease.

Unit tests over memory transports and the memory clock: a held user is never
dropped while the connection is open, whatever time passes and without any
request; when the last holding connection closes the user has the grace
(``wire.HELD_GRACE`` of the lease) to hold again, or is dropped.
"""

from __future__ import annotations

import socket
import sqlite3

from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.keepalive import keep_alive, keepalive_timing, tcp_socket
from tests.test_indexer_liveness import Base, T
from tests.test_indexer_tls import ALICE, MALLORY, kept_connection, request

GRACE = T * wire.HELD_GRACE


class Hold(Base):
    """alice connected at port 5000 (unclaimed), bob offline; liveness on, lease T."""

    def kept(self, identity=None):
        """A kept (TLS) connection to the indexer: its protocol and transport."""
        return kept_connection(self.h.factory, identity)

    def send(self, proto, transport, data: bytes) -> bytes:
        proto.dataReceived(data)
        self.h.clock.advance(0)
        reply = transport.value()
        transport.clear()
        return reply

    def hold(self, user: str = "alice", identity=None):
        proto, transport = self.kept(identity)
        self.assertEqual(self.send(proto, transport, request("HOLD", user)), b"\x0030\x00")
        return proto, transport

    def test_codes(self) -> None:
        """As ALIVE: 0 and the lease; 1 no such user; 2 not connected."""
        proto, transport = self.kept()
        self.assertEqual(self.send(proto, transport, request("HOLD", "carol")), b"\x01")
        self.assertEqual(self.send(proto, transport, request("HOLD", "bob")), b"\x02")
        self.assertEqual(self.send(proto, transport, request("HOLD", "alice")), b"\x0030\x00")
        self.assertEqual(self.h.leases.held, {"alice": {proto}})

    def test_plaintext_cannot_hold(self) -> None:
        """A classic connection (one request) holds nothing: 3, and the lease is untouched."""
        self.assertEqual(self.h.request("HOLD", "alice"), b"\x03")
        self.assertEqual(self.h.leases.held, {})
        self.assertIn("alice", self.h.leases.silent)

    def test_held_user_stays_without_a_word(self) -> None:
        """Ten leases pass with nothing sent: alice stays, is never probed, and the
        connection is not closed for being idle."""
        _proto, transport = self.hold()
        self.h.advance(10 * T)
        self.assertEqual(self.h.online(), {"alice"})
        self.assertEqual(self.h.prober.calls, [])
        self.assertFalse(transport.disconnecting)

    def test_connection_lost_leaves_the_grace(self) -> None:
        proto, _transport = self.hold()
        self.h.advance(5 * T)
        proto.connectionLost(None)
        self.h.advance(GRACE - 0.5)
        self.assertEqual(self.h.online(), {"alice"})
        self.h.advance(self.h.liveness.tick + 0.5)
        self.assertEqual(self.h.online(), set())
        self.assertEqual(self.h.prober.calls, [])

    def test_held_again_within_the_grace(self) -> None:
        proto, _transport = self.hold()
        proto.connectionLost(None)
        self.h.advance(GRACE / 2)
        self.hold()  # the client connected again
        self.h.advance(10 * T)
        self.assertEqual(self.h.online(), {"alice"})

    def test_a_request_in_the_grace_makes_it_renewing(self) -> None:
        proto, _transport = self.hold()
        proto.connectionLost(None)
        self.h.advance(GRACE / 2)
        self.assertEqual(self.h.request("LIST_USERS", "alice")[0], 0)
        self.assertIn("alice", self.h.leases.renewing)
        self.h.advance(T - 0.5)
        self.assertEqual(self.h.online(), {"alice"})
        self.h.advance(self.h.liveness.tick + 0.5)
        self.assertEqual(self.h.online(), set())

    def test_two_holders_one_closes(self) -> None:
        first, _ = self.hold()
        second, _ = self.hold()
        first.connectionLost(None)
        self.h.advance(3 * T)
        self.assertEqual(self.h.online(), {"alice"})
        second.connectionLost(None)
        self.h.advance(GRACE + self.h.liveness.tick)
        self.assertEqual(self.h.online(), set())

    def test_disconnect_ends_the_hold(self) -> None:
        """After DISCONNECT (or a CONNECT anew) the old connection holds nothing: its
        close changes nothing, and the new lease runs as any other."""
        proto, transport = self.hold()
        self.assertEqual(self.send(proto, transport, request("DISCONNECT", "alice")), b"\x00")
        self.assertEqual(self.h.leases.held, {})
        self.assertEqual(self.h.request("CONNECT", "alice", 5001), b"\x00")
        proto.connectionLost(None)
        self.assertEqual(self.h.leases.grace, {})
        self.assertIn("alice", self.h.leases.silent)

    def test_own_disconnect_keeps_the_connection(self) -> None:
        proto, transport = self.hold()
        self.assertEqual(self.send(proto, transport, request("DISCONNECT", "alice")), b"\x00")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(proto.held, set())

    def test_disconnect_from_elsewhere_closes_the_holder(self) -> None:
        """Its client learns at once that the user is gone (it holds again: code 2)."""
        _proto, transport = self.hold()
        self.assertEqual(self.h.request("DISCONNECT", "alice"), b"\x00")  # another client
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.online(), set())

    def test_connect_from_elsewhere_closes_the_old_holder(self) -> None:
        """A CONNECT that replaced a dead entry (the lock-out rule) ends the old hold."""
        _proto, transport = self.hold()
        self.assertEqual(self.h.request("DISCONNECT", "alice"), b"\x00")
        self.assertEqual(self.h.request("CONNECT", "alice", 5002), b"\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.leases.held, {})

    def test_holder_mid_request_is_answered_then_closed(self) -> None:
        proto, transport = self.hold()
        proto.dataReceived(request("LIST_USERS", "alice"))  # answered at the turn's end
        self.assertEqual(self.h.request("DISCONNECT", "alice"), b"\x00")  # the same turn
        self.assertTrue(transport.value().startswith(b"\x00"))  # the listing, whole
        self.assertTrue(transport.disconnecting)

    def test_disconnect_from_elsewhere_in_the_same_turn_closes_the_holder(self) -> None:
        """A HOLD answered 0 in the turn of another connection's DISCONNECT: the reply
        stands (it was true when applied), then the connection closes as for any hold
        ended from elsewhere, so its client holds again, gets 2, and says so."""
        proto, transport = self.kept()
        proto.dataReceived(request("HOLD", "alice"))  # answered at the turn's end
        self.assertEqual(self.h.request("DISCONNECT", "alice"), b"\x00")  # the same turn
        self.assertEqual(transport.value(), b"\x0030\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.leases.held, {})
        self.assertEqual(self.h.online(), set())

    def test_disconnect_and_connect_from_elsewhere_in_the_same_turn(self) -> None:
        """The same, when a new CONNECT of the user follows the DISCONNECT in that turn:
        the new lease is not the one the HOLD was given, so the holder closes too."""
        proto, transport = self.kept()
        proto.dataReceived(request("HOLD", "alice"))
        for values in (("DISCONNECT", "alice"), ("CONNECT", "alice", 6000)):
            other, _ = self.h.connect()
            other.dataReceived(request(*values))
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), b"\x0030\x00")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.leases.held, {})
        self.assertEqual(self.h.online(), {"alice"})

    def test_lost_before_the_reply_holds_nothing(self) -> None:
        """A connection closed while its HOLD waited for the turn's commit holds nothing."""
        proto, _transport = self.kept()
        proto.dataReceived(request("HOLD", "alice"))
        proto.connectionLost(None)
        self.h.clock.advance(0)
        self.assertEqual(self.h.leases.held, {})

    def test_a_turn_whose_commit_fails_holds_nothing(self) -> None:
        """HOLD answered 3 (the turn's changes were rolled back) holds nothing: the
        client renews instead, and the indexer agrees."""
        proto, transport = self.kept()
        proto.dataReceived(request("HOLD", "alice"))  # answered at the turn's end
        real_commit = self.h.store.commit

        def fail_once() -> None:
            self.h.store.commit = real_commit
            raise sqlite3.OperationalError("disk I/O error")

        self.h.store.commit = fail_once
        self.h.request("PUBLISH", "alice", "b.txt", "a change in the same turn")
        self.assertEqual(transport.value(), b"\x03")
        self.assertEqual(self.h.leases.held, {})
        self.assertEqual(proto.held, frozenset())
        self.flushLoggedErrors(sqlite3.OperationalError)

    def test_claimed_name_needs_its_key(self) -> None:
        """Only carol's key holds carol's lease (section 6.3): another key, or none, gets 3."""
        proto, transport = self.kept(ALICE)
        self.assertEqual(self.send(proto, transport, request("REGISTER", "carol")), b"\x00")
        self.assertEqual(self.send(proto, transport, request("CONNECT", "carol", 7000)), b"\x00")
        for other in (MALLORY, None):
            stranger, stranger_transport = self.kept(other)
            reply = self.send(stranger, stranger_transport, request("HOLD", "carol"))
            self.assertEqual(reply, b"\x03")
        self.assertEqual(self.h.leases.held, {})
        self.assertEqual(self.send(proto, transport, request("HOLD", "carol")), b"\x0030\x00")
        self.assertEqual(self.h.leases.held, {"carol": {proto}})

    def test_not_audited_and_no_operator_line(self) -> None:
        lines: list[str] = []
        self.patch(self.h.factory, "note", lines.append)
        self.hold()
        self.assertEqual(lines, [])


class Timing(TestCase):
    def test_a_vanished_host_is_found_within_two_thirds_of_the_lease(self) -> None:
        for lease in (30.0, 60.0, 300.0, 3600.0):
            idle, interval, count = keepalive_timing(lease)
            self.assertLessEqual(idle + interval * count, lease * (1 - wire.HELD_GRACE), lease)
            self.assertGreaterEqual(min(idle, interval), 1)

    def test_keepalive_set_on_the_socket_under_wrappers(self) -> None:
        """Through wrapping transports (TLS answers getHandle with its own object)."""
        sock = socket.socket()
        self.addCleanup(sock.close)

        class Tcp:
            def getHandle(self):
                return sock

        class Tls:
            transport = Tcp()

            def getHandle(self):
                return object()  # what TLSMemoryBIOProtocol answers: the SSL connection

        self.assertIs(tcp_socket(Tls()), sock)
        self.assertTrue(keep_alive(Tls(), 60.0))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 20)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 38_000)
        self.assertFalse(keep_alive(object(), 60.0))
