"""Adversarial tests of the peer file server (protocol.md section 2).

Seeded fuzzing of the request parser over in-memory transports: random
GET_FILE, FETCH and garbage, split at any point, against a hand-written table of
what each name must get. Invariants: one reply per connection (a code of the
protocol, then the file's bytes only after 0), no byte for an unknown operation,
names that leave the share directory always get 1, nothing raises (trial fails
a test that logs an error). Over real TCP: a downloader that half-closes after
its request still gets the whole file, and a slowloris requester is cut.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.peer.server import PeerServer

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)
SEED = 4242
HELLO = b"hello\0world"
BIG = bytes(range(256)) * 40  # 10 KiB
LARGE = 24 * 1024 * 1024  # several of the sender's turns


def make_share(base: Path) -> tuple[Path, dict[str, bytes | int]]:
    """A share directory with traps, and what each name must get: content, or a code."""
    share = base / "share"
    (share / "sub").mkdir(parents=True)
    (share / "hello.txt").write_bytes(HELLO)
    (share / "empty").write_bytes(b"")
    (share / "big").write_bytes(BIG)
    (share / "sub" / "nested.txt").write_bytes(b"nested")
    (share / "é名\U0001f600").write_bytes(b"unicode")
    (base / "outside").write_bytes(b"secret")
    (share / "dir").mkdir()
    os.symlink(base / "outside", share / "link_out")
    os.symlink(share / "hello.txt", share / "link_in")
    os.symlink("..", share / "up")
    os.mkfifo(share / "fifo")
    expected: dict[str, bytes | int] = {
        "hello.txt": HELLO,
        "empty": b"",
        "big": BIG,
        "sub/nested.txt": b"nested",
        "é名\U0001f600": b"unicode",
        "link_in": HELLO,
        "./hello.txt": HELLO,
        "sub//nested.txt": b"nested",
        # Each of these leaves the share, is not a regular file, or does not exist: 1.
        "../outside": 1,
        "link_out": 1,
        "up/outside": 1,
        "up/share/hello.txt": HELLO,  # through a link that leaves, but back inside
        "sub/../hello.txt": 1,
        "/etc/passwd": 1,
        "//etc/passwd": 1,
        str(base / "outside"): 1,
        "dir": 1,
        "sub": 1,
        ".": 1,
        "..": 1,
        "fifo": 1,
        "missing": 1,
        "sub/missing": 1,
        "hello.txt/x": 1,
        "n" * 256: 1,  # a valid name, too long for any file (ENAMETOOLONG): no such file
    }
    return share, expected


#: Published names the server may be asked for; anything else is not published (1).
NOT_PUBLISHED = ["unpublished", "HELLO.TXT", "hello.txt.", "x" * 256, "a b"]
#: Fields that are not a valid file name: 2 (over 256 bytes, empty, a control character,
#: not UTF-8). Spaces are fine in a file name.
BAD_NAMES = [b"", b"tab\there", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x85a", b"a\x7f"]
#: Offsets that are not a decimal number within the file: 3.
BAD_OFFSETS = [b"", b"-1", b"+1", b" 1", b"1 ", b"\xd9\xa3", b"0x1", b"1e3", b"9" * 20]


def split_randomly(rng: random.Random, data: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data) + 1), min(len(data), rng.randrange(1, 6))))
    out, start = [], 0
    for cut in cuts:
        out.append(data[start:cut])
        start = cut
    return out + ([data[start:]] if start < len(data) else [])


class Fuzz(TestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        self.share, self.expected = make_share(base)
        self.published = set(self.expected)
        self.clock = MemoryReactorClock()
        self.server = PeerServer(
            self.share, self.published.__contains__, self.clock, use_sendfile=False
        )

    def run_request(self, chunks: list[bytes]) -> tuple[bytes, StringTransport]:
        proto = self.server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        for chunk in chunks:
            proto.dataReceived(chunk)
        for _ in range(1000):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        self.assertIsNone(transport.producer, "the transfer must finish")
        proto.connectionLost(None)
        return transport.value(), transport

    def expect(self, op: bytes, name: bytes, offset: bytes | None) -> bytes | None:
        """The reply protocol.md requires (None: nothing at all, the connection closed)."""
        if op not in (b"GET_FILE", b"FETCH"):
            return b""
        if len(name) > wire.MAX_NAME or (offset is not None and len(offset) > wire.MAX_NAME):
            return b"\2"
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return b"\2"
        if not text or any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in text):
            return b"\2"
        want = self.expected.get(text, 1) if text in self.published else 1
        if isinstance(want, int):
            return bytes([want])
        if op == b"GET_FILE":
            return b"\0" + want
        if not (offset.isdigit() and len(offset) <= 20 and int(offset) <= len(want)):
            return b"\3"
        return b"\0" + str(len(want)).encode() + b"\0" + want[int(offset) :]

    def test_fuzz(self) -> None:
        rng = random.Random(SEED)
        names = [n.encode() for n in self.expected]
        for i in range(2500):
            op = rng.choice([b"GET_FILE", b"FETCH", b"FETCH", b"get_file", b"LIST", b"", b"F" * 40])
            roll = rng.random()
            if roll < 0.6:
                name = rng.choice(names)
            elif roll < 0.75:
                name = rng.choice(NOT_PUBLISHED).encode()
            elif roll < 0.9:
                name = rng.choice(BAD_NAMES)
            else:
                name = b"y" * rng.choice([257, 300, 1000])
            offset = None
            data = op + b"\0" + name + b"\0"
            if op == b"FETCH":
                if rng.random() < 0.7:
                    offset = str(rng.choice([0, 1, 5, 11, 12, 100, 10240, 10241])).encode()
                else:
                    offset = rng.choice([*BAD_OFFSETS, b"7" * 300, b"007"])
                data += offset + b"\0"
            if rng.random() < 0.2:
                data += rng.choice([b"junk", b"\0\0", b"GET_FILE\0hello.txt\0"])
            reply, transport = self.run_request(split_randomly(rng, data))
            want = self.expect(op, name, offset)
            where = f"request {i}: {data[:100]!r}"
            self.assertEqual(reply, want, where)
            self.assertTrue(transport.disconnecting or transport.disconnected, where)
        self.assertEqual(self.server.connections, frozenset())

    def test_escapes_always_get_1(self) -> None:
        for name, want in self.expected.items():
            if want == 1:
                for op in (b"GET_FILE\0", b"FETCH\0"):
                    data = op + name.encode() + b"\0" + (b"0\0" if op == b"FETCH\0" else b"")
                    reply, _ = self.run_request([data])
                    self.assertEqual(reply, b"\1", (op, name))


class Segmentation(TestCase):
    """The reply never depends on how the request was cut into segments."""

    def test_every_split_point(self) -> None:
        fuzz = Fuzz("test_fuzz")
        fuzz.setUp()
        requests = [
            b"FETCH\0hello.txt\0" + b"7" * 300 + b"\0",  # offset over the field limit
            b"FETCH\0missing\0" + b"7" * 300 + b"\0",
            b"GET_FILE\0" + b"n" * 300 + b"\0",
            b"FETCH\0hello.txt\0" + b"7" * 21 + b"\0",
            b"FETCH\0\xf0\x9f\x98\x80\0" + b"0\0",
            b"GET_FILE\0\xc3\xa9\xe5\x90\x8d\xf0\x9f\x98\x80\0",
            b"X" * 300 + b"\0",
        ]
        for data in requests:
            whole, _ = fuzz.run_request([data])
            for cut in range(1, len(data)):
                reply, _ = fuzz.run_request([data[:cut], data[cut:]])
                self.assertEqual(reply, whole, (data[:40], cut))


class Slowloris(TestCase):
    """One byte just inside the idle timeout, forever: the whole request has a deadline."""

    def test_trickled_request_is_cut(self) -> None:
        clock = MemoryReactorClock()
        base = Path(self.mktemp()).resolve()
        share, _ = make_share(base)
        server = PeerServer(share, {"hello.txt"}.__contains__, clock, request_timeout=10)
        proto = server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        request = b"FETCH\0" + b"a" * 250 + b"\0" + b"1" * 20
        elapsed = 0.0
        for byte in request:
            if transport.disconnecting or transport.disconnected:
                break
            proto.dataReceived(bytes([byte]))
            clock.advance(9)
            elapsed += 9
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertLessEqual(elapsed, server.request_deadline + 9)
        self.assertEqual(transport.value(), b"")


class OverTCP(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        base = Path(self.mktemp()).resolve()
        self.share, self.expected = make_share(base)
        (self.share / "large").write_bytes(os.urandom(LARGE))
        published = {"large", "hello.txt"}
        self.server = PeerServer(self.share, published.__contains__, reactor)
        self.port = yield self.server.listen("tcp:0:interface=127.0.0.1")
        self.addCleanup(self.server.stop)

    def blocking(self, actions):
        def run():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                return actions(s)

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_half_close_after_request_still_gets_the_file(self):
        """A classic client may shutdown(SHUT_WR) once its request is sent."""

        def half_close(s: socket.socket) -> bytes:
            s.sendall(b"GET_FILE\0large\0")
            s.shutdown(socket.SHUT_WR)
            data = bytearray()
            while chunk := s.recv(65536):
                data += chunk
            return bytes(data)

        reply = yield self.blocking(half_close)
        self.assertEqual(len(reply), 1 + LARGE)
        self.assertEqual(reply[1:], (self.share / "large").read_bytes())

    @defer.inlineCallbacks
    def test_half_close_mid_request_closes(self):
        def half(s: socket.socket) -> bytes:
            s.sendall(b"GET_FILE\0lar")
            s.shutdown(socket.SHUT_WR)
            return s.recv(10)

        reply = yield self.blocking(half)
        self.assertEqual(reply, b"")
        self.assertEqual(self.server.connections, frozenset())

    @defer.inlineCallbacks
    def test_reset_mid_transfer_then_served(self):
        import struct

        def reset(s: socket.socket) -> bytes:
            s.sendall(b"FETCH\0large\0" + b"0\0")
            s.recv(1000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""

        for _ in range(5):
            yield self.blocking(reset)

        def fetch(s: socket.socket) -> bytes:
            s.sendall(b"GET_FILE\0hello.txt\0")
            data = b""
            while chunk := s.recv(100):
                data += chunk
            return data

        self.assertEqual((yield self.blocking(fetch)), b"\0" + HELLO)


class _Liar(Protocol):
    """A malicious peer: answers any request with fixed bytes, then closes."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.answer)
        self.transport.loseConnection()


class HostilePeer(TestCase):
    """The downloader against a peer that lies in its FETCH header."""

    timeout = 30

    @defer.inlineCallbacks
    def fetch_from(self, answer: bytes):
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.internet.protocol import Factory

        from p2p.peer.download import download

        factory = Factory.forProtocol(_Liar)
        factory.answer = answer
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        dest = Path(self.mktemp()).resolve()
        dest.mkdir()
        try:
            got = yield download(
                "127.0.0.1", port.getHost().port, "x", dest / "out", reactor=reactor, timeout=5
            )
        except Exception as exc:
            self.assertEqual(sorted(os.listdir(dest)), [])  # nothing left on failure
            return exc
        self.assertEqual(sorted(os.listdir(dest)), ["out"])
        self.assertEqual((dest / "out").stat().st_size, got)
        return None

    @defer.inlineCallbacks
    def test_absurd_sizes_fail_cleanly(self):
        """A 20-digit size (over 2**63) made posix_fallocate raise OverflowError."""
        from p2p.peer.download import DownloadFailed

        for size in (b"9" * 20, b"18446744073709551616", b"9223372036854775808"):
            failure = yield self.fetch_from(b"\0" + size + b"\0" + b"data")
            self.assertIsInstance(failure, DownloadFailed, size)
            self.assertIn("no room", str(failure))

    @defer.inlineCallbacks
    def test_garbage_replies(self):
        """Whatever a peer answers: a clean success or failure, never an unhandled error."""
        from p2p.peer.download import DownloadFailed, NoSuchFile

        answers = [
            b"",
            b"\0",
            b"\1",
            b"\2",
            b"\3",
            b"\x05",
            b"\xff" * 10,
            b"\0abc\0",
            b"\0-1\0",
            b"\0" + b"1" * 21,
            b"\0 5\0xxxxx",
            b"\0005\0xxxxx",
            b"\03\0xxxxx",
            b"\0\0",
            b"\x00\xd9\xa3\0x",
        ]
        for answer in answers:
            outcome = yield self.fetch_from(answer)
            if outcome is not None:
                self.assertIsInstance(outcome, (DownloadFailed, NoSuchFile), answer)
