"""The indexer over in-memory transports: every row and code of protocol.md section 1."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer import protocol as protocol_module
from p2p.indexer.address import AddressPolicy, is_loopback, primary_address
from p2p.indexer.directory import Directory
from p2p.indexer.protocol import IndexerFactory
from p2p.indexer.store import Store

DT = "17/12/2014 13:20:35"


class Harness:
    """A factory on a memory reactor, and a way to run one request through it."""

    def __init__(self, testcase: TestCase, audit: bool = False, **kwargs) -> None:
        self.clock = MemoryReactorClock()
        self.store = Store()
        self.store.open()
        testcase.addCleanup(self.store.close)
        self.directory = Directory(self.store, audit=audit)
        self.factory = IndexerFactory(self.directory, self.clock, **kwargs)
        self.lines: list[str] = []
        testcase.patch(protocol_module, "say", self.lines.append)

    def connect(self, peer: str = "127.0.0.1"):
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        if proto is None:
            return None, None
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes, peer: str = "127.0.0.1") -> tuple[bytes, StringTransport]:
        """Send ``data`` on a fresh connection, end the reactor turn, return what came back."""
        proto, transport = self.connect(peer)
        proto.dataReceived(data)
        self.clock.advance(0)
        return transport.value(), transport

    def request(self, op: str, user: str, *args, peer: str = "127.0.0.1") -> bytes:
        reply, transport = self.send(wire.encode_request(op, DT, user, *args), peer)
        assert transport.disconnecting, "the connection must be closed after the reply"
        return reply

    def given(self, *steps: tuple) -> None:
        """Run each ``(op, user, *args)`` request; each must be answered 0."""
        for op, user, *args in steps:
            reply = self.request(op, user, *args)
            assert reply == b"\0", (op, user, args, reply)


class Fixture(TestCase):
    """State: alice connected (port 5000) with a.txt, bob registered offline, no carol."""

    audit = False
    harness = Harness

    def setUp(self) -> None:
        self.h = self.harness(self, audit=self.audit)
        self.h.given(
            ("REGISTER", "alice"),
            ("REGISTER", "bob"),
            ("CONNECT", "alice", 5000),
            ("PUBLISH", "alice", "a.txt", "alice's file"),
        )

    def code(self, op: str, user: str, *args) -> int:
        reply = self.h.request(op, user, *args)
        self.assertGreaterEqual(len(reply), 1, "a reply code was expected")
        return reply[0]

    def listing(self, op: str, user: str, *args) -> bytes:
        return self.h.request(op, user, *args)


class ProtocolTable(Fixture):
    """Each operation, each code, in the order of the checks."""

    def test_register(self) -> None:
        self.assertEqual(self.code("REGISTER", "carol"), 0)
        self.assertEqual(self.code("REGISTER", "alice"), 1)
        self.assertEqual(self.code("REGISTER", "bob"), 1)
        self.assertEqual(self.code("REGISTER", "two words"), 2)
        self.assertEqual(self.code("REGISTER", ""), 2)
        self.assertIn("carol", self.h.directory.users)

    def test_unregister(self) -> None:
        self.assertEqual(self.code("UNREGISTER", "carol"), 1)
        self.assertEqual(self.code("UNREGISTER", "alice"), 2)  # connected
        self.assertEqual(self.code("UNREGISTER", ""), 2)
        self.assertEqual(self.code("UNREGISTER", "bob"), 0)
        self.assertEqual(self.code("UNREGISTER", "bob"), 1)

    def test_unregister_removes_files(self) -> None:
        self.assertEqual(self.code("DISCONNECT", "alice"), 0)
        self.assertEqual(self.code("UNREGISTER", "alice"), 0)
        self.assertEqual(self.code("REGISTER", "alice"), 0)
        self.assertEqual(self.code("CONNECT", "alice", 5000), 0)
        self.assertEqual(self.listing("LIST_CONTENT", "alice", "alice"), b"\x000\0")

    def test_connect(self) -> None:
        self.assertEqual(self.code("CONNECT", "carol", 6000), 1)
        self.assertEqual(self.code("CONNECT", "alice", 6000), 2)
        self.assertEqual(self.code("CONNECT", "bob", "abc"), 3)
        self.assertEqual(self.code("CONNECT", "bob", 0), 3)
        self.assertEqual(self.code("CONNECT", "bob", 65536), 3)
        self.assertEqual(self.code("CONNECT", "bob", "123456"), 3)
        self.assertEqual(self.code("CONNECT", "bob", "-1"), 3)
        self.assertEqual(self.code("CONNECT", "carol", "abc"), 3)  # bad input first
        self.assertNotIn("bob", self.h.directory.connected)
        self.assertEqual(self.code("CONNECT", "bob", 6000), 0)
        self.assertEqual(self.h.directory.connected["bob"], ("127.0.0.1", 6000))

    def test_disconnect(self) -> None:
        self.assertEqual(self.code("DISCONNECT", "carol"), 1)
        self.assertEqual(self.code("DISCONNECT", "bob"), 2)
        self.assertEqual(self.code("DISCONNECT", ""), 3)
        self.assertEqual(self.code("DISCONNECT", "alice"), 0)
        self.assertEqual(self.code("DISCONNECT", "alice"), 2)
        # the files stay
        self.assertEqual(self.code("CONNECT", "bob", 6000), 0)
        self.assertEqual(
            self.listing("LIST_CONTENT", "bob", "alice"), b"\x001\0a.txt\0alice's file\0"
        )

    def test_publish(self) -> None:
        self.assertEqual(self.code("PUBLISH", "carol", "a.txt", "d"), 1)
        self.assertEqual(self.code("PUBLISH", "bob", "a.txt", "d"), 2)
        self.assertEqual(self.code("PUBLISH", "alice", "a.txt", "d"), 3)
        self.assertEqual(self.code("PUBLISH", "alice", "", "d"), 4)
        self.assertEqual(self.code("PUBLISH", "alice", "b\tc", "d"), 4)  # control character
        self.assertEqual(self.code("PUBLISH", "alice", "b.txt", ""), 4)
        self.assertEqual(self.code("PUBLISH", "alice", "b.txt", "a description"), 0)
        # names are per user
        self.assertEqual(self.code("CONNECT", "bob", 6000), 0)
        self.assertEqual(self.code("PUBLISH", "bob", "a.txt", "bob's"), 0)

    def test_delete(self) -> None:
        self.assertEqual(self.code("DELETE", "carol", "a.txt"), 1)
        self.assertEqual(self.code("DELETE", "bob", "a.txt"), 2)
        self.assertEqual(self.code("DELETE", "alice", "nope"), 3)
        self.assertEqual(self.code("DELETE", "alice", ""), 4)
        self.assertEqual(self.code("DELETE", "alice", "a.txt"), 0)
        self.assertEqual(self.code("DELETE", "alice", "a.txt"), 3)

    def test_list_users(self) -> None:
        self.assertEqual(self.code("LIST_USERS", "carol"), 1)
        self.assertEqual(self.code("LIST_USERS", "bob"), 2)
        self.assertEqual(self.code("LIST_USERS", ""), 3)
        self.assertEqual(
            self.listing("LIST_USERS", "alice"), b"\x001\0alice\x00127.0.0.1\x005000\0"
        )
        self.h.request("CONNECT", "bob", 6001, peer="10.1.2.3")
        self.assertEqual(
            self.listing("LIST_USERS", "alice"),
            b"\x00" + wire.encode_fields(2, "alice", "127.0.0.1", 5000, "bob", "10.1.2.3", 6001),
        )
        self.assertEqual(self.code("DISCONNECT", "alice"), 0)
        self.assertEqual(
            self.listing("LIST_USERS", "bob"),
            b"\x00" + wire.encode_fields(1, "bob", "10.1.2.3", 6001),
        )

    def test_list_content(self) -> None:
        self.assertEqual(self.code("LIST_CONTENT", "carol", "alice"), 1)
        self.assertEqual(self.code("LIST_CONTENT", "bob", "alice"), 2)
        self.assertEqual(self.code("LIST_CONTENT", "alice", "carol"), 3)
        self.assertEqual(self.code("LIST_CONTENT", "alice", ""), 4)
        self.assertEqual(
            self.listing("LIST_CONTENT", "alice", "alice"), b"\x001\0a.txt\0alice's file\0"
        )
        self.assertEqual(self.listing("LIST_CONTENT", "alice", "bob"), b"\x000\0")
        self.assertEqual(self.code("PUBLISH", "alice", "b.txt", "d\tx é"), 0)
        self.assertEqual(
            self.listing("LIST_CONTENT", "alice", "alice"),
            b"\x00" + wire.encode_fields(2, "a.txt", "alice's file", "b.txt", "d\tx é"),
        )

    def test_check_order(self) -> None:
        """User exists, then connected, then the operation's own check."""
        self.assertEqual(self.code("PUBLISH", "carol", "a.txt", "d"), 1)  # not 2 or 3
        self.assertEqual(self.code("PUBLISH", "bob", "a.txt", "d"), 2)  # not 3
        self.assertEqual(self.code("DELETE", "bob", "zzz"), 2)  # not 3
        self.assertEqual(self.code("LIST_CONTENT", "bob", "carol"), 2)  # not 3
        self.assertEqual(self.code("LIST_CONTENT", "carol", "carol"), 1)

    def test_every_code_is_declared(self) -> None:
        """The codes answered are exactly the ones wire.OPS declares."""
        for op in wire.OPS.values():
            self.assertEqual(op.codes, tuple(range(len(op.codes))), op.name)

    def test_operator_lines(self) -> None:
        del self.h.lines[:]
        self.code("REGISTER", "carol")
        self.code("LIST_USERS", "alice")
        self.assertEqual(self.h.lines, ["s> REGISTER FROM carol", "s> LIST_USERS FROM alice"])

    def test_operator_lines_of_one_turn_in_one_write(self) -> None:
        del self.h.lines[:]
        (p1, _), (p2, _) = self.h.connect(), self.h.connect()
        p1.dataReceived(wire.encode_request("REGISTER", DT, "x1"))
        p2.dataReceived(wire.encode_request("REGISTER", DT, "x2"))
        self.h.clock.advance(0)
        self.assertEqual(self.h.lines, ["s> REGISTER FROM x1\ns> REGISTER FROM x2"])


class GroupCommit(Fixture):
    def test_concurrent_registers(self) -> None:
        """Two REGISTERs of one name in the same turn: exactly one 0."""
        data = wire.encode_request("REGISTER", DT, "dave")
        (p1, t1), (p2, t2) = self.h.connect(), self.h.connect()
        p1.dataReceived(data[:5])
        p2.dataReceived(data)
        p1.dataReceived(data[5:])
        self.assertEqual((t1.value(), t2.value()), (b"", b""))  # nothing before the commit
        self.h.clock.advance(0)
        self.assertEqual(sorted([t1.value(), t2.value()]), [b"\0", b"\1"])

    def test_reply_after_commit(self) -> None:
        """The reply bytes go out only once the store has committed."""
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_request("REGISTER", DT, "erin"))
        self.assertTrue(self.h.store.in_transaction)
        self.assertEqual(transport.value(), b"")
        self.h.clock.advance(0)
        self.assertFalse(self.h.store.in_transaction)
        self.assertEqual(transport.value(), b"\0")

    def test_stop_commits_pending_then_refuses(self) -> None:
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_request("REGISTER", DT, "early"))
        self.h.factory.stop()
        self.assertEqual(transport.value(), b"\0")
        self.assertFalse(self.h.store.in_transaction)
        self.assertEqual(self.h.request("REGISTER", "late"), bytes([wire.REGISTER.error]))
        self.assertNotIn("late", self.h.directory.users)
        self.assertFalse(self.h.store.in_transaction)

    def test_failed_commit(self) -> None:
        """A commit that fails answers the error code and leaves memory as the store is."""
        import sqlite3

        def broken():
            self.h.store.rollback()
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(self.h.store, "commit", broken)
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_request("REGISTER", DT, "frank"))
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), bytes([wire.REGISTER.error]))
        self.assertNotIn("frank", self.h.directory.users)
        self.assertIn("alice", self.h.directory.users)
        self.flushLoggedErrors(sqlite3.OperationalError)


class BadInput(Fixture):
    def test_oversized_field_answers_at_once(self) -> None:
        """Past the limit, without waiting for a NUL: the error code, then close."""
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_fields("REGISTER", DT))
        proto.dataReceived(b"x" * (wire.MAX_NAME + 1))
        self.assertEqual(transport.value(), bytes([wire.REGISTER.error]))
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(b"\0")  # ignored
        self.h.clock.advance(0)
        self.assertEqual(transport.value(), bytes([wire.REGISTER.error]))
        self.assertNotIn("x" * (wire.MAX_NAME + 1), self.h.directory.users)

    def test_oversized_datetime_in_one_chunk(self) -> None:
        data = wire.encode_fields("PUBLISH") + b"d" * (wire.MAX_DATETIME + 1)
        self.assertEqual(self.h.send(data)[0], bytes([wire.PUBLISH.error]))
        data = wire.encode_request("PUBLISH", "d" * (wire.MAX_DATETIME + 1), "alice", "z", "z")
        self.assertEqual(self.h.send(data)[0], bytes([wire.PUBLISH.error]))
        self.assertNotIn("z", self.h.directory.users["alice"].files)

    def test_max_lengths_accepted(self) -> None:
        name = "n" * wire.MAX_NAME
        self.assertEqual(self.code("PUBLISH", "alice", name, "d" * wire.MAX_DESCRIPTION), 0)
        self.assertEqual(self.code("PUBLISH", "alice", name + "n", "d"), 4)
        self.assertEqual(self.code("PUBLISH", "alice", "q", "d" * (wire.MAX_DESCRIPTION + 1)), 4)

    def test_multibyte_limit_in_bytes(self) -> None:
        self.assertEqual(self.code("REGISTER", "é" * (wire.MAX_NAME // 2)), 0)
        self.assertEqual(self.code("REGISTER", "é" * (wire.MAX_NAME // 2) + "e"), 2)

    def test_not_utf8(self) -> None:
        data = wire.encode_fields("REGISTER", DT) + b"\xff\xfe\0"
        self.assertEqual(self.h.send(data)[0], b"\x02")
        data = wire.encode_request("PUBLISH", DT, "alice", "ok") + b"\xc3\x28\0"
        self.assertEqual(self.h.send(data)[0], b"\x04")
        self.assertEqual(list(self.h.directory.users["alice"].files), ["a.txt"])

    def test_control_characters(self) -> None:
        self.assertEqual(self.code("REGISTER", "a\x01b"), 2)
        self.assertEqual(self.code("PUBLISH", "alice", "f", "line\nbreak"), 4)
        self.assertEqual(self.code("REGISTER", "x", DT), 0)  # extra bytes after are ignored

    def test_unknown_op(self) -> None:
        reply, transport = self.h.send(wire.encode_request("FROB", DT, "alice"))
        self.assertEqual(reply, b"")
        self.assertTrue(transport.disconnecting)

    def test_long_op_closes_without_reply(self) -> None:
        proto, transport = self.h.connect()
        proto.dataReceived(b"R" * (wire.MAX_OP + 1))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_lowercase_op_is_unknown(self) -> None:
        self.assertEqual(self.h.send(wire.encode_request("register", DT, "zed"))[0], b"")
        self.assertNotIn("zed", self.h.directory.users)

    def test_silent_client_times_out(self) -> None:
        proto, transport = self.h.connect()
        proto.dataReceived(wire.encode_fields("REGISTER", DT) + b"hal")
        self.h.clock.advance(wire.DEFAULT_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnected)
        self.h.clock.advance(0.2)
        self.assertTrue(transport.disconnected)  # aborted
        self.assertEqual(transport.value(), b"")
        proto.connectionLost(None)
        self.assertNotIn("hal", self.h.directory.users)

    def test_connection_cap(self) -> None:
        h = Harness(self, max_connections=2)
        p1, _ = h.connect()
        _p2, _ = h.connect()
        self.assertEqual(h.connect(), (None, None))
        self.assertEqual(h.factory.open_connections, 2)
        p1.connectionLost(None)
        p3, t3 = h.connect()
        self.assertIsNotNone(p3)
        p3.dataReceived(wire.encode_request("REGISTER", DT, "ok"))
        h.clock.advance(0)
        self.assertEqual(t3.value(), b"\0")

    def test_half_request_then_close_stores_nothing(self) -> None:
        before = self.h.factory.open_connections
        proto, _transport = self.h.connect()
        proto.dataReceived(wire.encode_fields("REGISTER", DT, "ivy")[:-1])
        self.assertEqual(self.h.factory.open_connections, before + 1)
        proto.connectionLost(None)
        self.h.clock.advance(0)
        self.assertNotIn("ivy", self.h.directory.users)
        self.assertEqual(self.h.factory.open_connections, before)


class Audit(Fixture):
    audit = True

    def test_one_record_per_request(self) -> None:
        before = self.h.store.outbox_count()
        self.assertEqual(before, 4)  # the fixture's four requests
        self.code("PUBLISH", "alice", "b.txt", "d")
        self.code("DELETE", "bob", "b.txt")
        self.code("LIST_USERS", "carol")
        rows = self.h.store.outbox_pending(0, 100)
        self.assertEqual(
            [r for _, r in rows[-3:]],
            [f"alice PUBLISH b.txt {DT}", f"bob DELETE b.txt {DT}", f"carol LIST_USERS {DT}"],
        )
        self.assertEqual(rows[0][1], f"alice REGISTER {DT}")

    def test_bad_input_not_audited(self) -> None:
        self.h.send(wire.encode_fields("REGISTER", DT) + b"\xff\0")
        self.h.send(wire.encode_request("FROB", DT, "alice"))
        self.assertEqual(self.h.store.outbox_count(), 4)

    def test_no_audit_without_logger(self) -> None:
        h = Harness(self, audit=False)
        h.request("REGISTER", "x")
        self.assertEqual(h.store.outbox_count(), 0)


class FastPath(TestCase):
    """The ASCII fast path of field decoding never accepts what wire.decode_field refuses."""

    def test_agrees_with_wire(self) -> None:
        samples = [bytes([b]) for b in range(256)]
        samples += [b"a" + s + b"b" for s in samples]
        samples += [b"x" * n for n in (0, 1, 63, 64, 65, 255, 256, 257)]
        for kind in (wire.FieldKind.NAME, wire.FieldKind.TEXT, wire.FieldKind.DATETIME):
            field = protocol_module._Field(kind)
            for raw in samples:
                try:
                    expected = wire.decode_field(raw, kind)
                except wire.BadField:
                    expected = None
                try:
                    got = field.decode(raw)
                except wire.BadField:
                    got = None
                self.assertEqual(got, expected, (kind, raw))


class Addresses(TestCase):
    def test_loopback_kept_when_listening_on_loopback(self) -> None:
        self.assertEqual(AddressPolicy("127.0.0.1").record_ip("127.0.0.1"), "127.0.0.1")

    def test_loopback_rewritten_when_serving_all_interfaces(self) -> None:
        policy = AddressPolicy("0.0.0.0")
        self.assertEqual(policy.record_ip("127.0.0.1"), primary_address())
        self.assertEqual(policy.record_ip("10.9.8.7"), "10.9.8.7")

    def test_is_loopback(self) -> None:
        for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_loopback(host), host)
        for host in ("10.0.0.1", "0.0.0.0", "::", "fe80::1", "example"):
            self.assertFalse(is_loopback(host), host)

    def test_connect_records_primary_address(self) -> None:
        h = Harness(self, policy=AddressPolicy("0.0.0.0"))
        h.request("REGISTER", "p")
        self.assertEqual(h.request("CONNECT", "p", 7000), b"\0")
        self.assertEqual(h.directory.connected["p"], (primary_address(), 7000))
