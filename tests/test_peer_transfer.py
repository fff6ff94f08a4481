"""End-to-end peer transfers on 127.0.0.1: a real listening PeerServer and download().

Also fake peers (a classic GET_FILE-only peer, a lying one, a silent one), a
serving peer in a child process killed mid-transfer, and stalled downloaders
that must not make the server hold the file in memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from p2p import twisted_internals, wire
from p2p.peer.download import DownloadFailed, NoSuchFile, download
from p2p.peer.sender import SendfileProducer
from p2p.peer.server import PeerServer
from tests.support import deadline, exchange, poll_until, rss_bytes, spawn

#: A peer server in a child process, serving every file of the directory in argv[1].
CHILD_SERVER = """
import sys
from pathlib import Path
from twisted.internet import reactor
from p2p.peer.server import PeerServer
server = PeerServer(Path(sys.argv[1]), lambda name: True, reactor)
server.listen("tcp:0:interface=127.0.0.1").addCallback(lambda port: print(port, flush=True))
reactor.run()
"""

#: "At most a few hundred KiB of the file in memory per connection."
MEMORY_BOUND = 512 * 1024


def open_files() -> set[str]:
    """The regular files this process has open (Linux), to catch leaked descriptors."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("/"):
                    found.add(target)
    return found


def leftovers(directory: Path) -> list[str]:
    """Files in ``directory`` (temporary ones included)."""
    return sorted(os.listdir(directory))


def share_and_destination(case: TestCase) -> tuple[Path, Path]:
    """A fresh share directory and download directory, side by side in the test's temp dir."""
    base = Path(case.mktemp()).resolve()
    share, dest = base / "share", base / "dest"
    share.mkdir(parents=True)
    dest.mkdir()
    return share, dest


class FakePeer(protocol.Protocol):
    """A scripted peer: ``behave(op, fields, transport)`` once the request arrived."""

    def __init__(self, factory: FakePeerFactory) -> None:
        self.factory = factory
        self.reader = wire.FieldReader(wire.MAX_NAME)
        self.fields: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.fields.extend(self.reader.feed(data))
        need = 3 if self.fields[:1] == [b"FETCH"] else 2
        if len(self.fields) == need:
            self.factory.seen.append(self.fields[0].decode())
            self.factory.behave(self.fields[0].decode(), self.fields, self.transport)


class FakePeerFactory(protocol.Factory):
    def __init__(self, behave) -> None:
        self.behave = behave
        self.seen: list[str] = []

    def buildProtocol(self, addr):
        return FakePeer(self)


class PeerTransferTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.share, self.dest = share_and_destination(self)
        self.outside = self.share.parent / "outside.txt"
        self.outside.write_bytes(b"secret")
        self.published: set[str] = set()
        self.server = PeerServer(self.share, self.published.__contains__, reactor)
        self.port = yield self.server.listen("tcp:0:interface=127.0.0.1")
        self.addCleanup(self.server.stop)

    def put(self, name: str, data: bytes) -> bytes:
        (self.share / name).write_bytes(data)
        self.published.add(name)
        return data

    def fetch(self, name: str, local: str = "out", port: int | None = None, **kwargs):
        return deadline(
            download("127.0.0.1", port or self.port, name, self.dest / local, **kwargs), 60
        )

    @defer.inlineCallbacks
    def assertRefused(self, name: str, error=NoSuchFile):
        yield self.assertFailure(self.fetch(name), error)
        self.assertEqual(leftovers(self.dest), [])

    def raw(self, request: bytes, port: int | None = None) -> defer.Deferred:
        """Send one raw request; fire with every byte of the reply until the close."""
        return exchange(port or self.port, request)

    # --- contents ------------------------------------------------------------

    @defer.inlineCallbacks
    def check_roundtrip(self, data: bytes):
        self.put("file.bin", data)
        seen = []
        got = yield self.fetch("file.bin", progress=lambda n, total: seen.append((n, total)))
        self.assertEqual(got, len(data))
        self.assertEqual((self.dest / "out").read_bytes(), data)
        self.assertEqual(leftovers(self.dest), ["out"])
        self.assertEqual(seen[-1], (len(data), len(data)))

    def test_empty_file(self):
        return self.check_roundtrip(b"")

    def test_one_byte(self):
        return self.check_roundtrip(b"x")

    def test_binary_with_nul(self):
        return self.check_roundtrip(bytes(range(256)) * 40 + b"\0\0\0")

    @defer.inlineCallbacks
    def test_large_file(self):
        data = os.urandom(1024 * 1024) * 50
        yield self.check_roundtrip(data)

    @defer.inlineCallbacks
    def test_large_file_without_sendfile(self):
        """The chunked producer (TLS, wrapped transports) delivers the same bytes."""
        self.server.use_sendfile = False
        data = os.urandom(1024 * 1024) * 20
        yield self.check_roundtrip(data)

    @defer.inlineCallbacks
    def test_stop_drops_open_transfers(self):
        self.put("huge", b"")
        os.truncate(self.share / "huge", 1024 * 1024 * 1024)
        stopping = []

        def progress(received, total):
            if received and not stopping:
                stopping.append(self.server.stop())

        yield self.assertFailure(self.fetch("huge", progress=progress), DownloadFailed)
        yield deadline(stopping[0])
        self.assertEqual(self.server.connections, frozenset())
        self.assertEqual(leftovers(self.dest), [])
        yield self.assertFailure(self.fetch("huge"), DownloadFailed)  # no longer listening

    @defer.inlineCallbacks
    def test_two_downloads_at_once(self):
        data = self.put("big.bin", os.urandom(1024 * 1024) * 20)
        a, b = yield defer.gatherResults(
            [self.fetch("big.bin", "one"), self.fetch("big.bin", "two")], consumeErrors=True
        )
        self.assertEqual((a, b), (len(data), len(data)))
        self.assertEqual((self.dest / "one").read_bytes(), data)
        self.assertEqual((self.dest / "two").read_bytes(), data)

    @defer.inlineCallbacks
    def test_overwrites_existing_destination_only_when_complete(self):
        self.put("new", b"new contents")
        (self.dest / "out").write_bytes(b"old")
        yield self.assertFailure(self.fetch("missing"), NoSuchFile)
        self.assertEqual((self.dest / "out").read_bytes(), b"old")
        yield self.fetch("new")
        self.assertEqual((self.dest / "out").read_bytes(), b"new contents")

    # --- refusals ------------------------------------------------------------

    def test_missing_file(self):
        self.published.add("missing")
        return self.assertRefused("missing")

    def test_not_published(self):
        (self.share / "private").write_bytes(b"x")
        return self.assertRefused("private")

    def test_dot_dot(self):
        self.published.add("../outside.txt")
        return self.assertRefused("../outside.txt")

    def test_absolute_path(self):
        self.published.add(str(self.outside))
        return self.assertRefused(str(self.outside))

    def test_symlink_leaving_share(self):
        (self.share / "link").symlink_to(self.outside)
        self.published.add("link")
        return self.assertRefused("link")

    def test_directory(self):
        (self.share / "adir").mkdir()
        self.published.add("adir")
        return self.assertRefused("adir")

    @defer.inlineCallbacks
    def test_refusals_on_the_wire(self):
        """The raw replies: a single byte 1, for GET_FILE and FETCH alike."""
        (self.share / "link").symlink_to(self.outside)
        self.published.update({"../outside.txt", str(self.outside), "link"})
        for name in ("../outside.txt", str(self.outside), "link", "nothing"):
            for request in (
                wire.encode_fields("GET_FILE", name),
                wire.encode_fields("FETCH", name, 0),
            ):
                reply = yield self.raw(request)
                self.assertEqual(reply, bytes([wire.PEER_NO_FILE]), request)

    # --- FETCH on the wire -----------------------------------------------------

    @defer.inlineCallbacks
    def test_fetch_with_offset(self):
        data = self.put("f", os.urandom(300_000))
        reply = yield self.raw(wire.encode_fields("FETCH", "f", 123_456))
        self.assertEqual(reply, b"\0" + b"300000\0" + data[123_456:])
        reply = yield self.raw(wire.encode_fields("FETCH", "f", 300_000))
        self.assertEqual(reply, b"\x00300000\0")

    @defer.inlineCallbacks
    def test_fetch_bad_offset(self):
        self.put("f", b"12345")
        for offset in (b"6", b"x", b"99999999999999999999"):
            reply = yield self.raw(b"FETCH\0f\0" + offset + b"\0")
            self.assertEqual(reply, bytes([wire.PEER_BAD_OFFSET]), offset)

    @defer.inlineCallbacks
    def test_get_file_on_the_wire(self):
        data = self.put("f", b"a\0b" * 1000)
        reply = yield self.raw(wire.encode_fields("GET_FILE", "f"))
        self.assertEqual(reply, b"\0" + data)

    @defer.inlineCallbacks
    def test_unknown_op_on_the_wire(self):
        reply = yield self.raw(b"PUT_FILE\0f\0")
        self.assertEqual(reply, b"")

    @defer.inlineCallbacks
    def test_silent_requester_dropped(self):
        self.server.request_timeout = 0.3
        reply = yield self.raw(b"GET_FILE\0half")
        self.assertEqual(reply, b"")
        yield poll_until(lambda: not self.server.connections)

    # --- fake peers ------------------------------------------------------------

    @defer.inlineCallbacks
    def fake(self, behave) -> defer.Deferred:
        factory = FakePeerFactory(behave)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        factory.port = port.getHost().port
        return factory

    @defer.inlineCallbacks
    def test_fallback_to_get_file(self):
        data = b"classic\0bytes" * 1000

        def classic(op, fields, transport):
            if op != "GET_FILE":
                transport.loseConnection()  # an old peer: FETCH is unknown
                return
            transport.write(b"\0" + data)
            transport.loseConnection()

        peer = yield self.fake(classic)
        seen = []
        got = yield self.fetch("x", port=peer.port, progress=lambda n, t: seen.append((n, t)))
        self.assertEqual(peer.seen, ["FETCH", "GET_FILE"])
        self.assertEqual(got, len(data))
        self.assertEqual((self.dest / "out").read_bytes(), data)
        self.assertEqual(seen[-1], (len(data), len(data)))
        self.assertEqual(leftovers(self.dest), ["out"])

    @defer.inlineCallbacks
    def test_fallback_no_such_file(self):
        def classic(op, fields, transport):
            if op == "GET_FILE":
                transport.write(b"\1")
            transport.loseConnection()

        peer = yield self.fake(classic)
        yield self.assertFailure(self.fetch("x", port=peer.port), NoSuchFile)
        self.assertEqual(peer.seen, ["FETCH", "GET_FILE"])
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_get_file_cut_by_reset(self):
        def classic(op, fields, transport):
            if op == "GET_FILE":
                transport.write(b"\0" + b"partial" * 1000)
            transport.abortConnection()

        peer = yield self.fake(classic)
        yield self.assertFailure(self.fetch("x", port=peer.port), DownloadFailed)
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_short_fetch(self):
        def liar(op, fields, transport):
            transport.write(b"\x00100\0" + b"y" * 50)
            transport.loseConnection()

        peer = yield self.fake(liar)
        yield self.assertFailure(self.fetch("x", port=peer.port), DownloadFailed)
        self.assertEqual(peer.seen, ["FETCH"])
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_fetch_too_long(self):
        def liar(op, fields, transport):
            transport.write(b"\x003\0" + b"y" * 50)
            transport.loseConnection()

        peer = yield self.fake(liar)
        yield self.assertFailure(self.fetch("x", port=peer.port), DownloadFailed)
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_peer_error_code(self):
        """2 to FETCH is asked again as GET_FILE; 2 again is no such file (what a peer of
        the course implementation means by it); another code is a failure."""
        peer = yield self.fake(lambda op, fields, t: (t.write(b"\2"), t.loseConnection()))
        yield self.assertFailure(self.fetch("x", port=peer.port), NoSuchFile)
        self.assertEqual(peer.seen, ["FETCH", "GET_FILE"])
        self.assertEqual(leftovers(self.dest), [])
        peer = yield self.fake(lambda op, fields, t: t.write(b"\2" if op == "FETCH" else b"\3"))
        yield self.assertFailure(self.fetch("x", port=peer.port), DownloadFailed)
        self.assertEqual(peer.seen, ["FETCH", "GET_FILE"])
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_classic_peer_answering_2_to_fetch(self):
        """A classic peer that answers an unknown FETCH with 2 still serves by GET_FILE."""

        def classic(op, fields, t):
            t.write(b"\0classic bytes" if op == "GET_FILE" else b"\2")
            t.loseConnection()

        peer = yield self.fake(classic)
        size = yield self.fetch("x", port=peer.port)
        self.assertEqual(size, len(b"classic bytes"))
        self.assertEqual((self.dest / "out").read_bytes(), b"classic bytes")
        self.assertEqual(peer.seen, ["FETCH", "GET_FILE"])

    @defer.inlineCallbacks
    def test_silent_peer_times_out(self):
        peer = yield self.fake(lambda op, fields, transport: None)
        yield self.assertFailure(self.fetch("x", port=peer.port, timeout=0.3), DownloadFailed)
        self.assertEqual(peer.seen, ["FETCH", "GET_FILE"])
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_stalled_peer_times_out(self):
        peer = yield self.fake(lambda op, fields, transport: transport.write(b"\x00100\0abc"))
        yield self.assertFailure(self.fetch("x", port=peer.port, timeout=0.3), DownloadFailed)
        self.assertEqual(peer.seen, ["FETCH"])
        self.assertEqual(leftovers(self.dest), [])

    # --- local failures ------------------------------------------------------

    @defer.inlineCallbacks
    def test_refused_connection(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: connections are refused
            yield self.assertFailure(self.fetch("x", port=port), DownloadFailed)
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_destination_directory_missing(self):
        self.put("f", b"x")
        d = download("127.0.0.1", self.port, "f", self.dest / "no" / "such" / "out")
        yield self.assertFailure(d, DownloadFailed)

    @defer.inlineCallbacks
    def test_disk_error(self):
        from p2p.peer import download as module

        def full(self, data):
            raise OSError(28, "No space left on device")

        self.patch(module._PartFile, "write", full)
        self.put("f", b"x" * 100_000)
        yield self.assertFailure(self.fetch("f"), DownloadFailed)
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_no_room_for_the_file(self):
        """A FETCH size the disk cannot hold fails before any byte is written."""

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "posix_fallocate", full)
        self.put("f", b"x" * 100_000)
        yield self.assertFailure(self.fetch("f"), DownloadFailed)
        self.assertEqual(leftovers(self.dest), [])

    @defer.inlineCallbacks
    def test_filesystem_without_fallocate(self):
        def unsupported(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        self.patch(os, "posix_fallocate", unsupported)
        data = self.put("f", os.urandom(100_000))
        yield self.fetch("f")
        self.assertEqual((self.dest / "out").read_bytes(), data)

    @defer.inlineCallbacks
    def test_cancel(self):
        self.put("f", b"")
        os.truncate(self.share / "f", 512 * 1024 * 1024)
        d = download("127.0.0.1", self.port, "f", self.dest / "out")
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        self.assertEqual(leftovers(self.dest), [])

    # --- flow control ----------------------------------------------------------

    @defer.inlineCallbacks
    def check_stalled_downloader(self, use_sendfile: bool):
        """A downloader that never reads: the server stops sending and buffers little."""
        self.server.use_sendfile = use_sendfile
        size = 256 * 1024 * 1024
        self.put("huge", b"")
        os.truncate(self.share / "huge", size)
        stalled = socket.create_connection(("127.0.0.1", self.port))
        self.addCleanup(stalled.close)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        stalled.sendall(wire.encode_fields("FETCH", "huge", 0))
        yield poll_until(lambda: any(c.producer for c in self.server.connections))
        (conn,) = self.server.connections
        yield poll_until(lambda: conn.producer.sent > 0)
        # Wait until the sender has made no progress for ten polls in a row.
        quiet = {"polls": 0, "sent": -1}

        def stopped() -> bool:
            if conn.producer.sent == quiet["sent"]:
                quiet["polls"] += 1
            else:
                quiet.update(polls=0, sent=conn.producer.sent)
            return quiet["polls"] >= 10

        yield poll_until(stopped)
        sent = conn.producer.sent
        buffered = len(conn.transport.dataBuffer) - conn.transport.offset
        buffered += conn.transport._tempDataLen
        self.assertLess(sent, 32 * 1024 * 1024, "the sender did not stop")
        self.assertLessEqual(buffered, MEMORY_BOUND, "the server buffered file bytes")
        # sendfile unless P2P_PLAIN_TWISTED switched the fast path off; then chunks
        sendfile = use_sendfile and twisted_internals.enabled("sendfile")
        self.assertEqual(isinstance(conn.producer, SendfileProducer), sendfile)
        if sendfile:
            self.assertEqual(buffered, 0)

    @defer.inlineCallbacks
    def test_downloader_leaving_mid_transfer(self):
        """The server notices, drops the connection and closes the file."""
        self.put("huge", b"")
        os.truncate(self.share / "huge", 256 * 1024 * 1024)
        fds_before = open_files()
        leaving = socket.create_connection(("127.0.0.1", self.port))
        leaving.sendall(wire.encode_fields("FETCH", "huge", 0))
        yield poll_until(
            lambda: any(c.producer and c.producer.sent for c in self.server.connections)
        )
        leaving.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.assertEqual(leaving.recv(1), b"\0")  # already waiting in the socket
        leaving.close()  # with unread data: a reset, as a killed downloader would
        yield poll_until(lambda: not self.server.connections)
        self.assertEqual(open_files() - fds_before, set())

    def test_stalled_downloader_sendfile(self):
        return self.check_stalled_downloader(True)

    def test_stalled_downloader_chunks(self):
        return self.check_stalled_downloader(False)


class ChildPeerTests(TestCase):
    """A serving peer in its own process: killed mid-transfer, and its memory."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        base = Path(self.mktemp()).resolve()
        self.share = base / "share"
        self.dest = base / "dest"
        self.share.mkdir(parents=True)
        self.dest.mkdir()
        self.size = 1024 * 1024 * 1024
        with open(self.share / "huge", "wb") as f:
            f.truncate(self.size)  # sparse: costs no disk, reads as zeros
        self.child = spawn(self, [sys.executable, "-c", CHILD_SERVER, str(self.share)], name="peer")
        match = yield self.child.wait_for_line(r"^(\d+)$")
        self.port = int(match.group(1))

    @defer.inlineCallbacks
    def test_killed_mid_transfer(self):
        killed = []

        def progress(received, total):
            if received > 0 and not killed:
                killed.append(received)
                self.child.signal("KILL")

        d = download("127.0.0.1", self.port, "huge", self.dest / "out", progress=progress)
        yield self.assertFailure(deadline(d, 60), DownloadFailed)
        yield self.child.ended
        self.assertTrue(killed, "no bytes arrived before the end")
        self.assertEqual(leftovers(self.dest), [])

    def rss(self) -> int:
        return rss_bytes(self.child.transport.pid)

    @defer.inlineCallbacks
    def test_stalled_downloader_memory(self):
        if not Path("/proc/self/status").exists():
            self.skipTest("needs /proc to read the child's memory")
        before = self.rss()
        stalled = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", self.port))
            self.addCleanup(s.close)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(wire.encode_fields("FETCH", "huge", 0))
            stalled.append(s)
        # The reply header arrives on every socket once the server is sending.
        for s in stalled:
            s.settimeout(20)
            self.assertEqual(s.recv(1), b"\0")
        # Give the server many chances to (wrongly) fill memory, without sleeping blind:
        # wait until its RSS has been steady across ten samples.
        samples: list[int] = []

        def steady():
            samples.append(self.rss())
            return len(samples) >= 10 and max(samples[-10:]) == min(samples[-10:])

        with contextlib.suppress(defer.TimeoutError):  # still changing: the bound decides
            yield poll_until(steady, timeout=10, interval=0.05)
        grown = max(samples) - before
        self.assertLess(grown, 4 * 1024 * 1024, f"server RSS grew by {grown} bytes")
