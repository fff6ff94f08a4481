"""End-to-end: ``p2p-client --metrics`` counts what its peer server served."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.test_client_e2e import Stack
from tests.test_metrics_e2e import LOOPBACK, metrics_url, scrape


class ClientMetricsTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        yield self.stack.start_indexer()

    @defer.inlineCallbacks
    def test_counts_uploads_and_bytes_served(self):
        alice = self.stack.shell("alice", extra=("--metrics", LOOPBACK))
        url = yield metrics_url(alice.proc)
        bob = self.stack.shell("bob")
        for name, shell in (("alice", alice), ("bob", bob)):
            yield shell.check(f"REGISTER {name}", "c> REGISTER OK")
            yield shell.check(f"CONNECT {name}", "c> CONNECT OK")
        data = b"hello metrics\n" * 1000
        (alice.share / "f.txt").write_bytes(data)
        yield alice.check("PUBLISH f.txt a file", "c> PUBLISH OK")
        for copy in ("one.txt", "two.txt"):
            yield bob.check(f"GET_FILE alice f.txt {copy}", "c> GET_FILE OK")
        yield bob.check("GET_FILE alice nothing.txt x.txt", "c> GET_FILE FAIL / FILE NOT EXIST")
        got = yield scrape(url)
        self.assertEqual(got[("p2p_peer_uploads_total", (("result", "complete"),))], 2)
        self.assertEqual(got[("p2p_peer_bytes_served_total", ())], 2 * len(data))
        served = sum(
            value
            for (name, labels), value in got.items()
            if name == "p2p_peer_requests_total" and ("code", "0") in labels
        )
        self.assertEqual(served, 2)
        refused = sum(
            value
            for (name, labels), value in got.items()
            if name == "p2p_peer_requests_total" and ("code", "1") in labels
        )
        self.assertGreaterEqual(refused, 1)

    @defer.inlineCallbacks
    def test_off_by_default(self):
        alice = self.stack.shell("alice")
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        self.assertFalse([line for line in alice.lines if "metrics" in line])
