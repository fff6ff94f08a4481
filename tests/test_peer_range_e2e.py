"""RANGE, PIECES and --max-upload-rate against a real ``p2p-client``.

Real processes on loopback: the time service, the indexer, and alice's shell
(``--max-upload-rate 512K --max-uploads 1``) publishing two files; the test
speaks the peer protocol to her port itself, plaintext and TLS. The rate is
checked without a wall-clock threshold: N bytes at rate R cannot all arrive
before (N - burst) / R seconds have passed since the request, however slow or
busy the machine; a cap that does not hold finishes sooner (a loopback copy of
1 MiB takes milliseconds).
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial.unittest import TestCase

from p2p import tls, wire
from p2p.client.home import Home
from p2p.peer.ratelimit import MIN_BURST
from tests.support import deadline, exchange, poll_until
from tests.test_client_e2e import ShellProcess, Stack

RATE = 512 * 1024
BIG = os.urandom(1024 * 1024 + 100_000)  # two pieces


class _Timed(protocol.Protocol):
    """Sends a request; records when the first byte and the close came."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = bytearray()
        self.first: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sent_at = reactor.seconds()
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason=None) -> None:
        self.ended_at = reactor.seconds()
        if not self.first.called:
            self.first.callback(None)
        self.done.callback(bytes(self.data))


class RangeEndToEndTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        yield self.stack.start_time()
        yield self.stack.start_indexer()
        extra = ("--max-upload-rate", "512K", "--max-uploads", "1")
        self.alice = ShellProcess(self, "alice", self.stack.port, self.stack.wsdl, extra=extra)
        (self.alice.share / "big.bin").write_bytes(BIG)
        (self.alice.share / "notes.txt").write_bytes(b"hello\n")
        yield self.alice.check("REGISTER alice", "c> REGISTER OK")
        yield self.alice.check("CONNECT alice", "c> CONNECT OK")
        yield self.alice.check("PUBLISH big.bin a film", "c> PUBLISH OK")
        yield self.alice.check("PUBLISH notes.txt my notes", "c> PUBLISH OK")
        listing = yield self.alice.run("LIST_USERS", 2)
        self.port = int(listing[1].split()[2])

    def connect(self, request: bytes, over_tls: bool = False, options=None):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        if over_tls:
            endpoint = endpoints.wrapClientTLS(options or tls.client_options(), endpoint)
        timed = _Timed(request)
        return endpoints.connectProtocol(endpoint, timed).addCallback(lambda _: timed)

    @defer.inlineCallbacks
    def test_range_pieces_and_their_codes(self):
        got = yield exchange(self.port, b"RANGE\x00notes.txt\x002\x003\x00")
        self.assertEqual(got, b"\x006\x00llo")
        for bad in (b"two\x003", b"0\x000", b"5\x002", b"-1\x003"):
            got = yield exchange(self.port, b"RANGE\x00notes.txt\x00" + bad + b"\x00")
            self.assertEqual(got, b"\x03", bad)
        got = yield exchange(self.port, b"RANGE\x00nope\x000\x001\x00")
        self.assertEqual(got, b"\x01")
        got = yield exchange(self.port, b"PIECES\x00notes.txt\x00")
        self.assertEqual(got, b"\x006\x001048576\x00" + hashlib.sha256(b"hello\n").digest())
        got = yield exchange(self.port, wire.encode_fields("PIECES", "big.bin"))
        digests = hashlib.sha256(BIG[: 1 << 20]).digest() + hashlib.sha256(BIG[1 << 20 :]).digest()
        self.assertEqual(got, b"\x00" + wire.encode_fields(len(BIG), 1 << 20) + digests)
        # Kept by content in the home, from the PUBLISH's read; removed, computed again.
        kept = self.alice.home / "pieces" / hashlib.sha256(BIG).hexdigest()
        self.assertEqual(kept.read_bytes(), digests)
        kept.unlink()
        got = yield exchange(self.port, wire.encode_fields("PIECES", "big.bin"))
        self.assertEqual(got[-64:], digests)
        self.assertEqual(kept.read_bytes(), digests)

    @defer.inlineCallbacks
    def test_a_changed_file_is_1_and_published_again(self):
        (self.alice.share / "notes.txt").write_bytes(b"HELLO, changed\n")
        for request in (b"RANGE\x00notes.txt\x000\x001\x00", b"PIECES\x00notes.txt\x00"):
            got = yield exchange(self.port, request)
            if got != b"\x01":  # published again meanwhile: then it is the new bytes
                self.assertEqual(got[:4], b"\x0015\x00", request)
        yield poll_until(
            lambda: any("notes.txt published again" in line for line in self.alice.proc.errlines),
            what="notes.txt published again",
        )
        got = yield exchange(self.port, b"RANGE\x00notes.txt\x000\x005\x00")
        self.assertEqual(got, b"\x0015\x00HELLO")

    @defer.inlineCallbacks
    def test_tls_on_the_same_port(self):
        fingerprint = Home(self.alice.home).identity("alice").fingerprint
        options = tls.client_options(fingerprint)
        timed = yield self.connect(b"RANGE\x00notes.txt\x001\x004\x00", True, options)
        got = yield deadline(timed.done)
        self.assertEqual(got, b"\x006\x00ello")
        self.assertEqual(options.seen, fingerprint)
        timed = yield self.connect(b"PIECES\x00notes.txt\x00", True)
        got = yield deadline(timed.done)
        self.assertEqual(got[-32:], hashlib.sha256(b"hello\n").digest())

    @defer.inlineCallbacks
    def test_the_upload_rate_holds_and_a_second_upload_is_busy(self):
        length = len(BIG) - 7
        timed = yield self.connect(wire.encode_fields("RANGE", "big.bin", 7, length))
        yield deadline(timed.first)
        self.assertEqual(bytes(timed.data[:1]), b"\0")
        # Under way: with --max-uploads 1 a second RANGE is busy, PIECES is not an upload.
        got = yield exchange(self.port, b"RANGE\x00notes.txt\x000\x001\x00")
        self.assertEqual(got, b"\x04")
        got = yield exchange(self.port, b"PIECES\x00notes.txt\x00")
        self.assertEqual(got[:1], b"\x00")
        got = yield deadline(timed.done, 60)
        self.assertEqual(got, b"\x00" + wire.encode_field(len(BIG)) + BIG[7:])
        took = timed.ended_at - timed.sent_at
        burst = max(RATE // 10, MIN_BURST)
        earliest = (length - burst) / RATE
        self.assertGreaterEqual(took, earliest, f"{length} bytes in {took:.3f} s at {RATE} B/s")
        errors = "\n".join(self.alice.proc.errlines)
        self.assertNotIn("Traceback", errors)
