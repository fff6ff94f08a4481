"""A peer server's counts for ``/metrics``: requests by operation and code, uploads, bytes."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.peer.metrics import PeerMetrics
from p2p.peer.server import PeerServer
from tests.test_metrics import scrape

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class PeerMetricsTests(TestCase):
    def setUp(self) -> None:
        share = Path(self.mktemp())
        share.mkdir(parents=True)
        (share / "hello.txt").write_bytes(b"hello\0world")
        self.clock = MemoryReactorClock()
        self.counts = PeerMetrics()
        self.server = PeerServer(
            share, {"hello.txt", "gone"}.__contains__, self.clock, metrics=self.counts
        )

    def request(self, data: bytes, seconds: float = 0.0) -> bytes:
        proto = self.server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        self.clock.advance(seconds)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        proto.connectionLost(None)
        return transport.value()

    def test_counts_requests_uploads_and_bytes(self) -> None:
        self.assertEqual(self.request(wire.encode_fields("GET_FILE", "hello.txt"), 2.0)[:1], b"\0")
        self.request(wire.encode_fields("FETCH", "hello.txt", "6"))
        self.assertEqual(self.request(wire.encode_fields("GET_FILE", "gone")), b"\x01")
        self.assertEqual(self.request(b"NOPE\0"), b"")
        got = scrape([self.counts.metrics])
        requests = "p2p_peer_requests_total"
        self.assertEqual(got[(requests, (("code", "0"), ("op", "GET_FILE")))], 1)
        self.assertEqual(got[(requests, (("code", "0"), ("op", "FETCH")))], 1)
        self.assertEqual(got[(requests, (("code", "1"), ("op", "GET_FILE")))], 1)
        self.assertEqual(got[(requests, (("code", "none"), ("op", "unknown")))], 1)
        self.assertEqual(got[("p2p_peer_uploads_total", (("result", "complete"),))], 2)
        self.assertEqual(got[("p2p_peer_bytes_served_total", ())], 11 + 5)
        durations = ("p2p_peer_upload_duration_seconds_sum", (("result", "complete"),))
        self.assertEqual(got[durations], 2.0)
        self.assertEqual(got[("p2p_peer_open_connections", ())], 0)

    def test_open_connections(self) -> None:
        proto = self.server.factory.buildProtocol(ADDR)
        proto.makeConnection(StringTransport(peerAddress=ADDR))
        got = scrape([self.counts.metrics])
        self.assertEqual(got[("p2p_peer_open_connections", ())], 1)
