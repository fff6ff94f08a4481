"""The audit relay's state machine, driven on a Clock over in-memory transports.

A real in-memory ``Store`` holds the outbox; the "logger" is the test, reading
the LOG calls the relay wrote and answering them by hand.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer.relay import FIRST_REFUSAL_DELAY, OutboxRelay
from p2p.indexer.store import Store
from p2p.logcontract import LOG_ERROR, LOG_OK, parse_relay_machinename
from p2p.oncrpc import rpc
from p2p.oncrpc.record import RecordReader, encode_record


class Endpoint:
    """A client endpoint whose every connection is a StringTransport the test holds."""

    def __init__(self) -> None:
        self.connections: list[tuple[object, StringTransport]] = []

    def connect(self, factory):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return defer.succeed(proto)

    @property
    def current(self):
        return self.connections[-1]


class RelayStateTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = Store(":memory:")
        self.store.open()
        self.endpoint = Endpoint()
        self.relay = OutboxRelay(
            self.store, self.endpoint, reactor=self.clock, window=4, reply_timeout=30.0
        )
        self.relay.policy = lambda attempt: 0.1  # ClientService's backoff, without jitter
        self.addCleanup(self.store.close)

    def add(self, *records: str) -> None:
        for record in records:
            self.store.add_outbox(record)
        self.store.commit()

    def calls(self, transport: StringTransport) -> list[tuple[int, str, int]]:
        """(xid, record, seq from the credential) of every LOG call written so far."""
        out = []
        for message in RecordReader(1 << 20).feed(transport.value()):
            call, args = rpc.decode_call(message)
            self.assertEqual((call.prog, call.vers), (wire.LOGGER_PROGRAM, wire.LOGGER_VERSION))
            sender, seq = parse_relay_machinename(rpc.AuthSys.decode(call.cred.body).machinename)
            self.assertEqual(sender, self.store.sender_id)
            out.append((call.xid, rpc.unpack_string(args, 1 << 16).decode(), seq))
        return out

    def answer(self, proto, xid: int, result: int = LOG_OK) -> None:
        reply = rpc.encode_reply(rpc.success(xid, rpc.pack_int(result)))
        proto.dataReceived(encode_record(reply))

    def test_sends_in_order_within_the_window_and_deletes_acknowledged_rows(self):
        self.add(*[f"r{i}" for i in range(6)])
        self.relay.startService()
        proto, transport = self.endpoint.current
        sent = self.calls(transport)
        self.assertEqual([r for _x, r, _s in sent], ["r0", "r1", "r2", "r3"])  # the window
        self.assertEqual([s for _x, _r, s in sent], [1, 2, 3, 4])
        # An acknowledgement out of order frees nothing until the first one comes.
        self.answer(proto, sent[1][0])
        self.assertEqual(len(self.calls(transport)), 4)
        self.answer(proto, sent[0][0])
        self.assertEqual([r for _x, r, _s in self.calls(transport)][4:], ["r4", "r5"])
        self.clock.advance(0)  # deletes are batched per turn
        self.assertEqual(self.store.outbox_count(), 4)
        self.assertEqual(self.relay.acked_through, 2)

    def test_outbox_growth_is_sent_only_while_connected(self):
        self.relay.startService()
        proto, transport = self.endpoint.current
        self.add("a")
        self.assertEqual([r for _x, r, _s in self.calls(transport)], ["a"])
        self.relay.stopService()
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.add("b")
        self.assertEqual([r for _x, r, _s in self.calls(transport)], ["a"])
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_refusal_drops_the_connection_and_holds_the_next_one(self):
        self.add("a", "b")
        self.relay.startService()
        proto, transport = self.endpoint.current
        (xa, _, _), (xb, _, _) = self.calls(transport)
        self.answer(proto, xa, LOG_ERROR)
        self.assertTrue(transport.disconnecting)
        # A late reply on the connection being dropped is ignored.
        self.answer(proto, xb)
        self.assertEqual(self.relay.acked_through, 0)
        proto.connectionLost(Failure(error.ConnectionDone()))
        # ClientService reconnects after its backoff (0.1 s here); the new
        # connection waits out the refusal delay before sending anything.
        self.clock.advance(0.2)
        self.assertEqual(len(self.endpoint.connections), 2)
        _proto2, transport2 = self.endpoint.current
        self.assertEqual(self.calls(transport2), [])
        self.clock.advance(FIRST_REFUSAL_DELAY)
        self.assertEqual([r for _x, r, _s in self.calls(transport2)], ["a", "b"])

    def test_stall_drops_the_connection_and_resends_from_the_first_unacknowledged(self):
        self.add("a", "b")
        self.relay.startService()
        proto, transport = self.endpoint.current
        (xa, _, _), _ = self.calls(transport)
        self.answer(proto, xa)
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.clock.advance(0.2)
        self.assertEqual(len(self.endpoint.connections), 2)
        _proto2, transport2 = self.endpoint.current
        self.assertEqual([(r, s) for _x, r, s in self.calls(transport2)], [("b", 2)])

    def test_stop_deletes_what_was_acknowledged(self):
        self.add("a")
        self.relay.startService()
        proto, transport = self.endpoint.current
        self.answer(proto, self.calls(transport)[0][0])
        d = self.relay.stopService()
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.store.outbox_count(), 0)
        self.assertEqual(self.relay.delivered, 1)
