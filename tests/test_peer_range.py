"""RANGE and PIECES (protocol.md 2.4, 2.5) and the upload rate cap, at the peer server.

Over in-memory transports on a fake clock: every reply code of both (bad ranges
serve nothing), the stale check, busy, the upload notices; the piece digests of
the client's content cache equal hashlib over the pieces, kept and computed on
demand; the token bucket and the paced producer keep any interval under
``burst + rate * t``, all connections together. Over real loopback sockets: RANGE
and PIECES over TLS on the same port, and through the rate cap.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from p2p import tls, wire
from p2p.client.content import ContentCache, FileChanging, digest_file
from p2p.client.uploads import UploadNotices
from p2p.peer.ratelimit import MIN_BURST, TokenBucket, parse_rate
from p2p.peer.sender import PacedProducer
from p2p.peer.server import NoPieces, PeerServer
from tests.support import _UntilClosed, deadline, exchange

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)
MIB = 1024 * 1024


def piece_digests(data: bytes) -> bytes:
    """What PIECES must list for ``data``: hashlib over each piece, concatenated."""
    step = wire.piece_size(len(data))
    return b"".join(hashlib.sha256(data[i : i + step]).digest() for i in range(0, len(data), step))


class _Watcher:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def started(self, who, name, size, offset, end=None) -> None:
        self.events.append(("started", name, size, offset, end))

    def ended(self, who, name, sent, complete, seconds) -> None:
        self.events.append(("ended", name, sent, complete))


class _Pieces:
    """A PieceSource answering from a dict (None: fails with NoPieces); records the
    descriptors it was given and whether they were open then."""

    def __init__(self, lists: dict[str, bytes | Deferred | None]) -> None:
        self.lists = lists
        self.asked: list[tuple[str, int]] = []

    def pieces(self, name: str, fd: int, size: int):
        self.asked.append((name, size))
        os.fstat(fd)  # open while asked
        found = self.lists[name]
        if found is None:
            return defer.fail(NoPieces(name))
        if isinstance(found, Deferred):
            return found
        return defer.succeed(found)


class RangeTests(TestCase):
    def setUp(self) -> None:
        self.share = Path(self.mktemp())
        self.share.mkdir()
        (self.share / "notes.txt").write_bytes(b"hello\n")
        (self.share / "empty").write_bytes(b"")
        self.clock = MemoryReactorClock()
        self.watcher = _Watcher()
        self.server = PeerServer(
            self.share,
            {"notes.txt", "empty", "missing"}.__contains__,
            self.clock,
            use_sendfile=False,
            uploads=self.watcher,
        )

    def request(self, data: bytes) -> tuple[bytes, StringTransport]:
        proto = self.server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        for _ in range(1000):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        return transport.value(), transport

    def test_the_example(self) -> None:
        """protocol.md 2.4's example, byte for byte."""
        reply, transport = self.request(b"RANGE\x00notes.txt\x002\x003\x00")
        self.assertEqual(reply, b"\x006\x00llo")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            self.watcher.events,
            [("started", "notes.txt", 6, 2, 5), ("ended", "notes.txt", 3, True)],
        )

    def test_the_notice_names_the_bytes(self) -> None:
        notes: list[str] = []
        UploadNotices(notes.append).started("10.0.0.7:4000", "notes.txt", 6, 2, 5)
        self.assertEqual(notes, ["upload: 10.0.0.7:4000 is downloading notes.txt (6 B) bytes 2-4"])

    def test_ranges_that_fit(self) -> None:
        for offset, length, body in ((0, 6, b"hello\n"), (5, 1, b"\n"), (0, 1, b"h")):
            reply, _ = self.request(wire.encode_fields("RANGE", "notes.txt", offset, length))
            self.assertEqual(reply, b"\x006\x00" + body, (offset, length))

    def test_a_range_to_the_end_is_noticed_as_a_fetch(self) -> None:
        self.request(wire.encode_fields("RANGE", "notes.txt", 1, 5))
        self.assertEqual(self.watcher.events[0], ("started", "notes.txt", 6, 1, None))

    def test_one_byte_at_a_time(self) -> None:
        data = b"RANGE\x00notes.txt\x002\x003\x00"
        proto = self.server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        for i in range(len(data) - 1):
            proto.dataReceived(data[i : i + 1])
            self.assertEqual(transport.value(), b"", "nothing before the whole request")
        proto.dataReceived(data[-1:])
        transport.producer.resumeProducing()
        self.assertEqual(transport.value(), b"\x006\x00llo")

    def test_bad_ranges_are_3_and_serve_nothing(self) -> None:
        for offset, length in (
            (b"abc", b"1"),  # not a number
            (b"1", b"x"),
            (b"-1", b"2"),
            (b"+1", b"2"),
            (b"1.0", b"2"),
            (b"", b"2"),
            (b"1", b""),
            (b"0", b"0"),  # length 0
            (b"6", b"0"),
            (b"0", b"7"),  # past the end
            (b"5", b"2"),
            (b"6", b"1"),
            (b"7", b"1"),
            (b"1" * 21, b"1"),  # more than 20 digits
            (b"0", b"9" * 21),
            (b"9" * 20, b"9" * 20),
        ):
            with self.subTest(offset=offset, length=length):
                reply, transport = self.request(
                    b"RANGE\0notes.txt\0" + offset + b"\0" + length + b"\0"
                )
                self.assertEqual(reply, bytes([wire.PEER_BAD_OFFSET]))
                self.assertTrue(transport.disconnecting)
        self.assertEqual(self.watcher.events, [], "no transfer started")
        self.assertEqual(self.server.uploading, 0)

    def test_fields_after_the_request_are_ignored(self) -> None:
        """A fourth field (or more) is no part of the range."""
        reply, _ = self.request(b"RANGE\0notes.txt\x002\x003\0junk\0\0")
        self.assertEqual(reply, b"\x006\x00llo")

    def test_an_empty_file_has_no_range(self) -> None:
        reply, _ = self.request(wire.encode_fields("RANGE", "empty", 0, 1))
        self.assertEqual(reply, bytes([wire.PEER_BAD_OFFSET]))

    def test_no_such_file_and_other_errors(self) -> None:
        cases = (
            (wire.encode_fields("RANGE", "missing", 0, 1), wire.PEER_NO_FILE),
            (wire.encode_fields("RANGE", "private", 0, 1), wire.PEER_NO_FILE),
            (wire.encode_fields("RANGE", "../notes.txt", 0, 1), wire.PEER_NO_FILE),
            (b"RANGE\0a\tb\x000\x001\0", wire.PEER_ERROR),
            (b"RANGE\0" + b"x" * 300 + b"\0", wire.PEER_ERROR),
            (b"RANGE\0notes.txt\0" + b"1" * 300 + b"\0", wire.PEER_ERROR),  # a field over 256
        )
        for data, code in cases:
            with self.subTest(data=data[:40]):
                reply, transport = self.request(data)
                self.assertEqual(reply, bytes([code]))
                self.assertTrue(transport.disconnecting)

    def test_stale_file_is_1(self) -> None:
        self.server.is_current = lambda name, st: False
        for data in (
            wire.encode_fields("RANGE", "notes.txt", 0, 1),
            wire.encode_fields("PIECES", "notes.txt"),
        ):
            reply, _ = self.request(data)
            self.assertEqual(reply, bytes([wire.PEER_NO_FILE]), data)

    def test_busy_counts_range_as_an_upload_but_not_pieces(self) -> None:
        self.server.max_uploads = 1
        self.server.pieces = _Pieces({"notes.txt": piece_digests(b"hello\n")})
        (self.share / "big").write_bytes(b"b" * 1_000_000)
        self.server.is_published = lambda name: True
        proto = self.server.factory.buildProtocol(ADDR)
        first = StringTransport(peerAddress=ADDR)
        proto.makeConnection(first)
        proto.dataReceived(wire.encode_fields("RANGE", "big", 0, 900_000))
        self.assertEqual(self.server.uploading, 1)
        for op in (("RANGE", "notes.txt", 0, 1), ("FETCH", "notes.txt", 0)):
            reply, _ = self.request(wire.encode_fields(*op))
            self.assertEqual(reply, bytes([wire.PEER_BUSY]), op)
        reply, _ = self.request(wire.encode_fields("GET_FILE", "notes.txt"))
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))
        reply, _ = self.request(wire.encode_fields("PIECES", "notes.txt"))
        self.assertEqual(reply[:1], b"\0", "PIECES is no upload")
        while first.producer is not None:
            first.producer.resumeProducing()
        self.assertEqual(self.server.uploading, 0)
        reply, _ = self.request(wire.encode_fields("RANGE", "notes.txt", 0, 1))
        self.assertEqual(reply, b"\x006\x00h")


class PiecesTests(TestCase):
    def setUp(self) -> None:
        self.share = Path(self.mktemp())
        self.share.mkdir()
        self.data = os.urandom(2 * MIB + 12345)
        (self.share / "big.bin").write_bytes(self.data)
        (self.share / "notes.txt").write_bytes(b"hello\n")
        (self.share / "empty").write_bytes(b"")
        self.pending: Deferred = Deferred()
        self.source = _Pieces(
            {
                "big.bin": piece_digests(self.data),
                "notes.txt": piece_digests(b"hello\n"),
                "empty": b"",
                "classic.txt": None,
                "short": b"x" * 31,
                "slow": self.pending,
            }
        )
        for name in ("classic.txt", "short", "slow"):
            (self.share / name).write_bytes(b"hello\n")
        self.server = PeerServer(
            self.share, lambda name: True, MemoryReactorClock(), pieces=self.source
        )

    request = RangeTests.request

    def test_the_example(self) -> None:
        """protocol.md 2.5's example, byte for byte."""
        reply, transport = self.request(b"PIECES\x00notes.txt\x00")
        self.assertEqual(reply, b"\x006\x001048576\x00" + hashlib.sha256(b"hello\n").digest())
        self.assertTrue(transport.disconnecting)

    def test_several_pieces(self) -> None:
        reply, _ = self.request(wire.encode_fields("PIECES", "big.bin"))
        head = b"\x00" + wire.encode_fields(len(self.data), MIB)
        self.assertEqual(reply[: len(head)], head)
        digests = reply[len(head) :]
        self.assertEqual(len(digests), 3 * 32)
        for i in range(3):
            piece = self.data[i * MIB : (i + 1) * MIB]
            self.assertEqual(digests[i * 32 : (i + 1) * 32], hashlib.sha256(piece).digest())

    def test_empty_file_has_no_digests(self) -> None:
        reply, _ = self.request(wire.encode_fields("PIECES", "empty"))
        self.assertEqual(reply, b"\x000\x001048576\x00")

    def test_codes(self) -> None:
        for name, code in (
            ("classic.txt", wire.PEER_NO_FILE),  # published without a hash
            ("nope", wire.PEER_NO_FILE),
            ("../x", wire.PEER_NO_FILE),
            ("short", wire.PEER_ERROR),  # a list that is not one digest per piece
        ):
            with self.subTest(name=name):
                reply, transport = self.request(wire.encode_fields("PIECES", name))
                self.assertEqual(reply, bytes([code]))
                self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors(ValueError)
        reply, _ = self.request(b"PIECES\0" + b"x" * 300)
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))

    def test_without_a_source_every_pieces_is_1(self) -> None:
        self.server.pieces = None
        reply, _ = self.request(wire.encode_fields("PIECES", "notes.txt"))
        self.assertEqual(reply, bytes([wire.PEER_NO_FILE]))

    def test_a_failing_source_is_2(self) -> None:
        self.source.lists["notes.txt"] = defer.fail(OSError("disk"))
        reply, _ = self.request(wire.encode_fields("PIECES", "notes.txt"))
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_the_reply_waits_and_the_file_stays_open_until_then(self) -> None:
        before = len(os.listdir("/proc/self/fd"))
        reply, transport = self.request(wire.encode_fields("PIECES", "slow"))
        self.assertEqual(reply, b"")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before + 1)
        self.pending.callback(hashlib.sha256(b"hello\n").digest())
        self.assertEqual(transport.value()[:1], b"\0")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


class ContentPiecesTests(TestCase):
    """The client's side of PIECES: digests in the same pass as the SHA-256, kept by
    content, computed on demand for a file published before."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        self.file = base / "film.bin"
        self.data = os.urandom(3 * MIB + 7)
        self.file.write_bytes(self.data)
        self.pieces_dir = base / "pieces"
        self.cache = ContentCache(
            base / "hashes.json",
            lambda f, *a: defer.maybeDeferred(f, *a),
            pieces_dir=self.pieces_dir,
        )

    def test_digest_file_computes_the_pieces_in_the_same_pass(self) -> None:
        reads: list[int] = []
        real = os.read
        self.patch(os, "read", lambda fd, n: reads.append(n) or real(fd, n))
        found = digest_file(self.file)
        self.assertEqual(found.sha256, hashlib.sha256(self.data).hexdigest())
        self.assertEqual(found.pieces, piece_digests(self.data))
        self.assertEqual(len(found.pieces), 4 * 32)
        self.assertEqual(len(reads), 5, "the file is read once: 4 MiB reads and the EOF")

    def test_publishing_keeps_the_pieces_by_content(self) -> None:
        found = self.successResultOf(self.cache.identify(self.file))
        kept = self.pieces_dir / found.sha256
        self.assertEqual(kept.read_bytes(), piece_digests(self.data))
        self.assertEqual(oct(kept.stat().st_mode & 0o777), "0o600")

    def test_progress_is_reported_from_the_reading_thread(self) -> None:
        seen: list[int] = []
        self.successResultOf(self.cache.identify(self.file, progress=seen.append))
        self.assertEqual(seen[-1], len(self.data))
        self.assertEqual(seen, sorted(seen))

    def open(self) -> int:
        fd = os.open(self.file, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        return fd

    def test_computed_on_demand_and_kept(self) -> None:
        sha = hashlib.sha256(self.data).hexdigest()
        got = self.successResultOf(self.cache.pieces_of(sha, self.open(), len(self.data)))
        self.assertEqual(got, piece_digests(self.data))
        self.assertEqual((self.pieces_dir / sha).read_bytes(), got)
        # Then read from the cache: the file is not read again.
        self.patch(os, "read", lambda fd, n: 1 / 0)
        again = self.successResultOf(self.cache.pieces_of(sha, self.open(), len(self.data)))
        self.assertEqual(again, got)

    def test_a_damaged_cache_entry_is_computed_again(self) -> None:
        sha = hashlib.sha256(self.data).hexdigest()
        self.pieces_dir.mkdir()
        (self.pieces_dir / sha).write_bytes(b"short")
        got = self.successResultOf(self.cache.pieces_of(sha, self.open(), len(self.data)))
        self.assertEqual(got, piece_digests(self.data))

    def test_other_content_than_published_is_refused(self) -> None:
        wrong = hashlib.sha256(b"something else").hexdigest()
        failure = self.failureResultOf(self.cache.pieces_of(wrong, self.open(), len(self.data)))
        failure.trap(FileChanging)
        self.assertFalse((self.pieces_dir / wrong).exists())

    def test_requests_at_once_share_one_computation(self) -> None:
        later: list[tuple] = []
        cache = ContentCache(
            self.pieces_dir.parent / "h.json",
            lambda f, *a: later.append((f, a)) or Deferred(),
            pieces_dir=self.pieces_dir,
        )
        sha = hashlib.sha256(self.data).hexdigest()
        fd = self.open()
        first = cache.pieces_of(sha, fd, len(self.data))
        second = cache.pieces_of(sha, fd, len(self.data))
        self.assertEqual(len(later), 1)
        self.assertNoResult(first)
        self.assertNoResult(second)


class TokenBucketTests(TestCase):
    def test_parse_rate(self) -> None:
        for text, rate in (("1", 1), ("1000", 1000), ("512K", 512 * 1024), ("2m", 2 * MIB)):
            self.assertEqual(parse_rate(text), rate)
        self.assertEqual(parse_rate("1G"), 1024**3)
        for bad in ("", "0", "-5", "1.5M", "K", "10 KB", "12x", "١٢", "0K"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, parse_rate, bad)

    def test_the_client_option(self) -> None:
        """p2p-client --max-upload-rate: 1024-based suffixes, no cap by default, and a
        usage error that names the option for anything else."""
        from twisted.python import usage

        from p2p.client.main import Options

        def parsed(*argv: str) -> int | None:
            options = Options()
            options.parseOptions(["--share-dir", ".", *argv])
            return options["max-upload-rate"]

        self.assertIsNone(parsed())
        self.assertEqual(parsed("--max-upload-rate", "512K"), 512 * 1024)
        self.assertEqual(parsed("--max-upload-rate", "3M"), 3 * MIB)
        for bad in ("12x", "1.5M", "0", "-1K"):
            with self.subTest(bad=bad):
                with self.assertRaises(usage.UsageError) as caught:
                    parsed("--max-upload-rate", bad)
                self.assertIn(
                    "not a byte rate" if bad != "0" else "positive", str(caught.exception)
                )
        self.assertIn("1024-based", Options().__str__())

    def test_burst(self) -> None:
        clock = task.Clock()
        self.assertEqual(TokenBucket(1000, clock).burst, MIN_BURST)
        self.assertEqual(TokenBucket(10 * MIB, clock).burst, MIB)

    def test_any_interval_stays_under_burst_plus_rate(self) -> None:
        clock = task.Clock()
        rate = 100_000
        bucket = TokenBucket(rate, clock)
        sent: list[tuple[float, int]] = []
        woken: list[int] = []
        for _ in range(600):
            got = bucket.take(30_000, turn=bool(woken))
            woken.clear()
            if got:
                sent.append((clock.seconds(), got))
                continue
            bucket.queue(lambda: woken.append(1), 30_000)
            while not woken:
                clock.advance(0.001)
        total = sum(n for _, n in sent)
        self.assertGreater(total, 10 * rate)
        # Every window [start, end] of grants: prefix sums make it O(n^2).
        times = [t for t, _ in sent]
        before = [0]
        for _, n in sent:
            before.append(before[-1] + n)
        for i in range(len(sent)):
            for j in range(i, len(sent)):
                window = before[j + 1] - before[i]
                self.assertLessEqual(window, bucket.burst + rate * (times[j] - times[i]) + 1)


class PacedTransferTests(TestCase):
    """The server's transfers through the cap, on a fake clock."""

    def setUp(self) -> None:
        share = Path(self.mktemp())
        share.mkdir()
        self.data = os.urandom(1_000_000)
        (share / "big").write_bytes(self.data)
        self.clock = task.Clock()
        self.rate = 200_000
        self.server = PeerServer(
            share, lambda name: True, self.clock, max_upload_rate=self.rate, idle_timeout=1000
        )

    def start(self, data: bytes) -> StringTransport:
        proto = self.server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        return transport

    def run_until_done(self, transports: list[StringTransport]) -> list[tuple[float, int]]:
        """Advance the clock in 50 ms steps; (time, total bytes so far) at each step."""
        samples = []
        for _ in range(10_000):
            samples.append((self.clock.seconds(), sum(len(t.value()) for t in transports)))
            if all(t.disconnecting for t in transports):
                break
            self.clock.advance(0.05)
        return samples

    def check_cap(self, samples: list[tuple[float, int]]) -> None:
        burst = self.server.bucket.burst
        for i, (t0, n0) in enumerate(samples):
            for t1, n1 in samples[i + 1 :]:
                self.assertLessEqual(n1 - n0, burst + self.rate * (t1 - t0) + 100)

    def test_one_transfer_keeps_to_the_rate(self) -> None:
        transport = self.start(wire.encode_fields("FETCH", "big", 0))
        self.assertIsInstance(transport.producer, PacedProducer)
        samples = self.run_until_done([transport])
        self.assertEqual(transport.value(), b"\x00" + b"1000000\x00" + self.data)
        self.check_cap(samples)
        done_at = samples[-1][0]
        self.assertGreaterEqual(done_at, (len(self.data) - self.server.bucket.burst) / self.rate)
        self.assertLessEqual(done_at, len(self.data) / self.rate + 1)

    def test_all_connections_together(self) -> None:
        transports = [
            self.start(wire.encode_fields("GET_FILE", "big")),
            self.start(wire.encode_fields("FETCH", "big", 500_000)),
            self.start(wire.encode_fields("RANGE", "big", 100, 400_000)),
        ]
        self.clock.pump([0.05] * 60)  # 3 s
        shares = [len(t.value()) for t in transports]
        self.assertLessEqual(sum(shares), self.server.bucket.burst + 3 * self.rate + 100)
        for share in shares:  # fair: each gets about a third
            self.assertGreater(share, sum(shares) / 5, shares)
        samples = self.run_until_done(transports)
        self.check_cap(samples)
        self.assertEqual(transports[0].value(), b"\0" + self.data)
        self.assertEqual(transports[2].value(), b"\x001000000\x00" + self.data[100:400_100])
        total = 1_000_000 + 500_000 + 400_000
        self.assertGreaterEqual(samples[-1][0], (total - self.server.bucket.burst) / self.rate)

    def test_a_full_transport_pauses_and_a_lost_one_stops(self) -> None:
        transport = self.start(wire.encode_fields("FETCH", "big", 0))
        producer = transport.producer
        producer.pauseProducing()
        self.clock.advance(1)
        held = len(transport.value())
        self.clock.advance(1)
        self.assertEqual(len(transport.value()), held, "nothing written while paused")
        producer.resumeProducing()
        self.clock.advance(0.5)
        self.assertGreater(len(transport.value()), held)
        producer.stopProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [], "no call left behind")


class TLSAndRealSocketsTests(TestCase):
    """RANGE and PIECES on a real port: plaintext and TLS on the same one, and the cap."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.share = Path(self.mktemp())
        self.share.mkdir()
        self.data = os.urandom(3 * MIB + 5)
        (self.share / "big.bin").write_bytes(self.data)
        self.identity = tls.Identity.generate("alice")
        self.server = PeerServer(
            self.share,
            lambda name: True,
            reactor,
            identity=self.identity,
            pieces=_Pieces({"big.bin": piece_digests(self.data)}),
        )
        self.addCleanup(self.server.stop)
        self.port = yield self.server.listen("tcp:0:interface=127.0.0.1")

    @defer.inlineCallbacks
    def over_tls(self, data: bytes):
        endpoint = endpoints.wrapClientTLS(
            tls.client_options(self.identity.fingerprint),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        proto = yield endpoints.connectProtocol(endpoint, _UntilClosed())
        proto.transport.write(data)
        received = yield deadline(proto.done)
        return received

    @defer.inlineCallbacks
    def test_range_and_pieces_over_tls_and_plaintext(self):
        head = b"\x00" + wire.encode_field(len(self.data))
        range_request = wire.encode_fields("RANGE", "big.bin", MIB - 3, MIB + 7)
        for ask in (self.over_tls, lambda data: exchange(self.port, data)):
            got = yield ask(range_request)
            self.assertEqual(got, head + self.data[MIB - 3 : 2 * MIB + 4])
            got = yield ask(wire.encode_fields("PIECES", "big.bin"))
            self.assertEqual(got, head + b"1048576\x00" + piece_digests(self.data))
            got = yield ask(wire.encode_fields("RANGE", "big.bin", 0, len(self.data) + 1))
            self.assertEqual(got, bytes([wire.PEER_BAD_OFFSET]))

    @defer.inlineCallbacks
    def test_a_capped_range_over_tls(self):
        self.server.bucket = TokenBucket(4 * MIB, reactor)
        got = yield self.over_tls(wire.encode_fields("RANGE", "big.bin", 1, len(self.data) - 1))
        self.assertEqual(got[-(len(self.data) - 1) :], self.data[1:])
