"""The indexer client: request bytes, reply parsing, cut replies, timeouts."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client.indexer_client import (
    BadReply,
    IndexerClient,
    IndexerError,
    ReplyCut,
    _RequestProtocol,
)
from tests.support import deadline, hold_port


def stamp():
    return defer.succeed("01/02/2026 03:04:05")


class RequestProtocolTests(TestCase):
    """The reply parser over an in-memory transport, bytes arriving in any split."""

    def connect(self, op: str, *args):
        payload = wire.encode_request(op, "01/02/2026 03:04:05", "alice", *args)
        columns = {"LIST_USERS": 3, "LIST_CONTENT": 2}.get(op)
        proto = _RequestProtocol(payload, columns)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_sends_the_request(self) -> None:
        _proto, transport = self.connect("PUBLISH", "f.txt", "a file")
        self.assertEqual(
            transport.value(), b"PUBLISH\x0001/02/2026 03:04:05\x00alice\x00f.txt\x00a file\x00"
        )

    def test_code_only_reply(self) -> None:
        proto, transport = self.connect("REGISTER")
        proto.dataReceived(b"\x01")
        self.assertEqual(self.successResultOf(proto.finished), (1, None))
        self.assertTrue(transport.disconnecting)

    def test_listing_fed_byte_by_byte(self) -> None:
        proto, _transport = self.connect("LIST_USERS")
        reply = wire.encode_code(0) + wire.encode_listing(
            [("alice", "127.0.0.1", 4242), ("bob", "10.0.0.2", 7)]
        )
        for i in range(len(reply)):
            self.assertNoResult(proto.finished)
            proto.dataReceived(reply[i : i + 1])
        self.assertEqual(
            self.successResultOf(proto.finished),
            (0, [("alice", "127.0.0.1", "4242"), ("bob", "10.0.0.2", "7")]),
        )

    def test_empty_listing_and_utf8(self) -> None:
        proto, _ = self.connect("LIST_CONTENT", "bob")
        proto.dataReceived(b"\x00" + wire.encode_listing([]))
        self.assertEqual(self.successResultOf(proto.finished), (0, []))
        proto, _ = self.connect("LIST_CONTENT", "bob")
        proto.dataReceived(b"\x00" + wire.encode_listing([("ñ.txt", "café au lait")]))
        self.assertEqual(self.successResultOf(proto.finished), (0, [("ñ.txt", "café au lait")]))

    def test_listing_failure_code_has_no_rows(self) -> None:
        proto, _ = self.connect("LIST_USERS")
        proto.dataReceived(b"\x02")
        self.assertEqual(self.successResultOf(proto.finished), (2, None))

    def test_cut_reply(self) -> None:
        proto, _ = self.connect("LIST_USERS")
        proto.dataReceived(b"\x00" + wire.encode_field(2) + wire.encode_fields("a", "1.2.3.4"))
        proto.connectionLost(protocol.connectionDone)
        self.failureResultOf(proto.finished, ReplyCut)

    def test_no_reply_at_all(self) -> None:
        proto, _ = self.connect("REGISTER")
        proto.connectionLost(protocol.connectionDone)
        self.failureResultOf(proto.finished, ReplyCut)

    def test_bad_count_and_endless_field(self) -> None:
        proto, transport = self.connect("LIST_USERS")
        proto.dataReceived(b"\x00lots\x00")
        self.failureResultOf(proto.finished, BadReply)
        self.assertTrue(transport.disconnecting)
        proto, _ = self.connect("LIST_CONTENT", "bob")
        proto.dataReceived(b"\x00" + b"9" * (wire.MAX_FIELD + 1))
        self.failureResultOf(proto.finished, BadReply)


class ScriptedIndexer(protocol.Protocol):
    """Reads one whole request, then answers ``factory.reply`` (or nothing)."""

    def connectionMade(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.count(b"\0") >= self.factory.fields:
            self.factory.received.append(self.data)
            if self.factory.reply is not None:
                self.transport.write(self.factory.reply)
                self.transport.loseConnection()


class IndexerClientTests(TestCase):
    """The client against a real socket on 127.0.0.1."""

    def serve(self, reply: bytes | None, fields: int) -> int:
        factory = protocol.Factory.forProtocol(ScriptedIndexer)
        factory.reply = reply
        factory.fields = fields
        factory.received = []
        self.factory = factory
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_one_request_per_connection(self) -> None:
        port = self.serve(wire.encode_code(0) + wire.encode_listing([("f", "d")]), 4)
        client = IndexerClient("127.0.0.1", port, stamp, timeout=5, use_tls=False)
        result = yield deadline(client.request("LIST_CONTENT", "alice", "bob"))
        self.assertEqual(result, (0, [("f", "d")]))
        result = yield deadline(client.request("LIST_CONTENT", "alice", "carol"))
        self.assertEqual(
            self.factory.received,
            [
                wire.encode_request("LIST_CONTENT", "01/02/2026 03:04:05", "alice", "bob"),
                wire.encode_request("LIST_CONTENT", "01/02/2026 03:04:05", "alice", "carol"),
            ],
        )

    @defer.inlineCallbacks
    def test_port_is_sent_as_decimal(self) -> None:
        port = self.serve(b"\x00", 4)
        client = IndexerClient("127.0.0.1", port, stamp, timeout=5, use_tls=False)
        result = yield deadline(client.request("CONNECT", "alice", 4242))
        self.assertEqual(result, (0, None))
        self.assertTrue(self.factory.received[0].endswith(b"alice\x004242\x00"))

    @defer.inlineCallbacks
    def test_silent_indexer_times_out(self) -> None:
        port = self.serve(None, 3)
        client = IndexerClient("127.0.0.1", port, stamp, timeout=0.3, use_tls=False)
        with self.assertRaises(IndexerError):
            yield deadline(client.request("REGISTER", "alice"), 10)

    @defer.inlineCallbacks
    def test_nobody_listening(self) -> None:
        client = IndexerClient("127.0.0.1", hold_port(self), stamp, timeout=5)
        with self.assertRaises(Exception) as caught:
            yield deadline(client.request("REGISTER", "alice"), 10)
        self.assertNotIsInstance(caught.exception, defer.TimeoutError)

    def test_unknown_operation(self) -> None:
        client = IndexerClient("127.0.0.1", 1, stamp)
        self.failureResultOf(client.request("FROB", "alice"), ValueError)
