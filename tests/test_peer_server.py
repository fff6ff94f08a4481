"""Unit tests of the peer file server over in-memory transports.

Request parsing, every reply code, the unknown-operation close, timeouts on a
fake clock, the chunked producer's memory bound, and share-directory checks.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.peer import sender
from p2p.peer import server as server_module
from p2p.peer.server import PeerServer
from p2p.peer.share import NotShared, open_shared, resolve

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


class ServerUnitTests(TestCase):
    def setUp(self) -> None:
        base = Path(self.mktemp())
        self.share = base / "share"
        self.share.mkdir(parents=True)
        (self.share / "hello.txt").write_bytes(b"hello\0world")
        (self.share / "empty").write_bytes(b"")
        (base / "outside").write_bytes(b"secret")
        self.published = {"hello.txt", "empty", "missing", "../outside"}
        self.clock = MemoryReactorClock()
        self.server = PeerServer(
            self.share,
            self.published.__contains__,
            self.clock,
            request_timeout=5,
            idle_timeout=7,
        )

    def connect(self) -> tuple[object, StringTransport]:
        proto = self.server.factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        return proto, transport

    def drain(self, transport: StringTransport) -> bytes:
        """Pull every chunk the (pull) producer has to give, as the transport would."""
        for _ in range(10_000):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        return transport.value()

    def request(self, *chunks: bytes) -> tuple[bytes, StringTransport]:
        proto, transport = self.connect()
        for chunk in chunks:
            proto.dataReceived(chunk)
        return self.drain(transport), transport

    # --- GET_FILE ------------------------------------------------------------

    def test_get_file(self) -> None:
        reply, transport = self.request(wire.encode_fields("GET_FILE", "hello.txt"))
        self.assertEqual(reply, b"\0hello\0world")
        self.assertTrue(transport.disconnecting)

    def test_get_file_in_pieces(self) -> None:
        """A request split anywhere, even one byte at a time, is understood."""
        data = wire.encode_fields("GET_FILE", "hello.txt")
        reply, _ = self.request(*(data[i : i + 1] for i in range(len(data))))
        self.assertEqual(reply, b"\0hello\0world")

    def test_get_file_empty(self) -> None:
        reply, transport = self.request(wire.encode_fields("GET_FILE", "empty"))
        self.assertEqual(reply, b"\0")
        self.assertTrue(transport.disconnecting)

    def test_get_file_missing(self) -> None:
        reply, transport = self.request(wire.encode_fields("GET_FILE", "missing"))
        self.assertEqual(reply, bytes([wire.PEER_NO_FILE]))
        self.assertTrue(transport.disconnecting)

    def test_get_file_not_published(self) -> None:
        (self.share / "private").write_bytes(b"x")
        reply, _ = self.request(wire.encode_fields("GET_FILE", "private"))
        self.assertEqual(reply, bytes([wire.PEER_NO_FILE]))

    def test_get_file_traversal(self) -> None:
        reply, _ = self.request(wire.encode_fields("GET_FILE", "../outside"))
        self.assertEqual(reply, bytes([wire.PEER_NO_FILE]))

    def test_get_file_unreadable_is_error(self) -> None:
        """An I/O or permission error opening a published file is code 2 (not 1)."""

        def denied(share_dir, name):
            raise PermissionError(13, "Permission denied")

        self.patch(server_module, "open_shared", denied)
        reply, _ = self.request(wire.encode_fields("GET_FILE", "hello.txt"))
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))

    def test_is_published_raising_is_error(self) -> None:
        def broken(name: str) -> bool:
            raise RuntimeError("boom")

        self.server.is_published = broken
        reply, _ = self.request(wire.encode_fields("GET_FILE", "hello.txt"))
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_file_changed_since_published_is_refused_as_not_shared(self) -> None:
        seen: list[tuple[str, int]] = []

        def is_current(name: str, st: os.stat_result) -> bool:
            seen.append((name, st.st_size))
            return name != "hello.txt"

        self.server.is_current = is_current
        for op in (("GET_FILE", "hello.txt"), ("FETCH", "hello.txt", 0)):
            reply, transport = self.request(wire.encode_fields(*op))
            self.assertEqual(reply, bytes([wire.PEER_NO_FILE]), op)
            self.assertTrue(transport.disconnecting)
        # The check sees the opened file; an unchanged one is served as before.
        self.assertEqual(seen, [("hello.txt", 11)] * 2)
        reply, _ = self.request(wire.encode_fields("FETCH", "empty", 0))
        self.assertEqual(reply, b"\x000\x00")
        # A check that raises is "any other error", logged, nothing served.
        self.server.is_current = lambda name, st: 1 / 0
        reply, _ = self.request(wire.encode_fields("GET_FILE", "hello.txt"))
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_a_name_with_spaces(self) -> None:
        (self.share / "my song.mp3").write_bytes(b"la la")
        self.published.add("my song.mp3")
        reply, _ = self.request(wire.encode_fields("GET_FILE", "my song.mp3"))
        self.assertEqual(reply, b"\0la la")

    def test_bad_name_is_error(self) -> None:
        for name in (b"a\tb", b"\xff\xfe", b"x" * (wire.MAX_NAME + 1)):
            reply, transport = self.request(b"GET_FILE\0" + name + b"\0")
            self.assertEqual(reply, bytes([wire.PEER_ERROR]), name)
            self.assertTrue(transport.disconnecting)

    def test_name_without_end_is_error(self) -> None:
        """A name that never ends is cut at its limit, answered 2, and not buffered."""
        reply, transport = self.request(b"GET_FILE\0" + b"x" * 100_000)
        self.assertEqual(reply, bytes([wire.PEER_ERROR]))
        self.assertTrue(transport.disconnecting)

    def test_extra_bytes_after_request_ignored(self) -> None:
        for junk in (b"junk\0more", b"y" * 70_000):
            reply, _ = self.request(wire.encode_fields("GET_FILE", "hello.txt") + junk)
            self.assertEqual(reply, b"\0hello\0world")

    # --- FETCH ---------------------------------------------------------------

    def test_fetch(self) -> None:
        reply, transport = self.request(wire.encode_fields("FETCH", "hello.txt", 0))
        self.assertEqual(reply, b"\0" + b"11\0" + b"hello\0world")
        self.assertTrue(transport.disconnecting)

    def test_fetch_offset(self) -> None:
        reply, _ = self.request(wire.encode_fields("FETCH", "hello.txt", 6))
        self.assertEqual(reply, b"\x0011\0world")

    def test_fetch_offset_at_end(self) -> None:
        reply, _ = self.request(wire.encode_fields("FETCH", "hello.txt", 11))
        self.assertEqual(reply, b"\x0011\0")

    def test_fetch_empty(self) -> None:
        reply, _ = self.request(wire.encode_fields("FETCH", "empty", 0))
        self.assertEqual(reply, b"\x000\0")

    def test_fetch_bad_offset(self) -> None:
        for offset in (b"12", b"abc", b"-1", b"", b"1" * 30, b"1.5"):
            reply, transport = self.request(b"FETCH\0hello.txt\0" + offset + b"\0")
            self.assertEqual(reply, bytes([wire.PEER_BAD_OFFSET]), offset)
            self.assertTrue(transport.disconnecting)

    def test_fetch_missing(self) -> None:
        reply, _ = self.request(wire.encode_fields("FETCH", "missing", 0))
        self.assertEqual(reply, bytes([wire.PEER_NO_FILE]))

    def test_fetch_waits_for_offset(self) -> None:
        """Nothing is answered before the whole request (three fields) arrived."""
        proto, transport = self.connect()
        proto.dataReceived(wire.encode_fields("FETCH", "hello.txt"))
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"0\0")
        self.assertEqual(self.drain(transport), b"\x0011\0hello\0world")

    # --- unknown operations --------------------------------------------------

    def test_unknown_op_closes_without_reply(self) -> None:
        for request in (b"LIST_USERS\0x\0", b"get_file\0hello.txt\0", b"\0", b"X" * 5000):
            reply, transport = self.request(request)
            self.assertEqual(reply, b"", request)
            self.assertTrue(transport.disconnecting, request)

    # --- timeouts ------------------------------------------------------------

    def test_silent_requester_times_out(self) -> None:
        proto, transport = self.connect()
        proto.dataReceived(b"GET_FI")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"LE\0hel")  # activity restarts the timer
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_stalled_transfer_times_out(self) -> None:
        """Once sending, the idle timeout applies; each chunk taken restarts it."""
        proto, transport = self.connect()
        proto.dataReceived(wire.encode_fields("FETCH", "hello.txt", 0))
        self.clock.advance(6.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_connection_cap(self) -> None:
        self.server.max_connections = 2
        self.connect()
        self.connect()
        self.assertIsNone(self.server.factory.buildProtocol(ADDR))


class ChunkProducerTests(TestCase):
    """The fallback producer holds at most one chunk whatever the consumer does."""

    def test_one_chunk_per_resume(self) -> None:
        path = Path(self.mktemp())
        size = sender.CHUNK * 5 + 123
        path.write_bytes(os.urandom(size))
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        transport = StringTransport()
        producer = sender.ChunkProducer(transport, fd, 0, size, b"\0")
        done = producer.start()
        self.assertEqual(transport.value(), b"")  # nothing until asked
        sizes = []
        while not done.called:
            before = len(transport.value())
            producer.resumeProducing()
            sizes.append(len(transport.value()) - before)
        self.assertLessEqual(max(sizes), sender.CHUNK + 1)
        self.assertEqual(transport.value(), b"\0" + path.read_bytes())
        self.assertEqual(self.successResultOf(done), size)

    def test_file_shrinking_fails(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"abc")
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        producer = sender.ChunkProducer(StringTransport(), fd, 0, 10)
        done = producer.start()
        producer.resumeProducing()
        producer.resumeProducing()
        self.failureResultOf(done, sender.FileShrank)

    def test_stop_producing_fails(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"abc")
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        producer = sender.ChunkProducer(StringTransport(), fd, 0, 3)
        done = producer.start()
        producer.stopProducing()
        self.failureResultOf(done, sender.TransferStopped)

    def test_string_transport_gets_chunk_producer(self) -> None:
        producer = sender.make_producer(StringTransport(), 0, 0, 0)
        self.assertIsInstance(producer, sender.ChunkProducer)


class ShareTests(TestCase):
    """Which names resolve to a servable file."""

    def setUp(self) -> None:
        base = Path(self.mktemp()).resolve()
        self.share = base / "share"
        (self.share / "sub").mkdir(parents=True)
        (self.share / "a.txt").write_bytes(b"a")
        (self.share / "sub" / "b.txt").write_bytes(b"bb")
        (base / "outside.txt").write_bytes(b"secret")
        self.outside = base / "outside.txt"

    def assertRefused(self, name: str) -> None:
        with self.assertRaises(NotShared):
            fd, _ = open_shared(self.share, name)
            os.close(fd)

    def test_plain_and_nested(self) -> None:
        fd, size = open_shared(self.share, "a.txt")
        os.close(fd)
        self.assertEqual(size, 1)
        fd, size = open_shared(self.share, "sub/b.txt")
        os.close(fd)
        self.assertEqual(size, 2)

    def test_refused_names(self) -> None:
        for name in (
            "",
            "..",
            "../outside.txt",
            "sub/../../outside.txt",
            "sub/../a.txt",  # any ".." is refused, even one that stays inside
            str(self.outside),
            "/etc/passwd",
            ".",
            "sub",
            "nope",
            "a\0b",
        ):
            self.assertRefused(name)

    def test_symlink_leaving_share(self) -> None:
        (self.share / "link").symlink_to(self.outside)
        (self.share / "dirlink").symlink_to(self.outside.parent)
        self.assertRefused("link")
        self.assertRefused("dirlink/outside.txt")

    def test_symlink_inside_share(self) -> None:
        (self.share / "alias").symlink_to(self.share / "sub" / "b.txt")
        fd, size = open_shared(self.share, "alias")
        os.close(fd)
        self.assertEqual(size, 2)

    def test_fifo_refused_without_blocking(self) -> None:
        os.mkfifo(self.share / "fifo")
        self.assertRefused("fifo")

    def test_share_dir_itself_a_symlink(self) -> None:
        """A share directory reached through a symlink still serves its files."""
        link = self.share.parent / "share-link"
        link.symlink_to(self.share)
        self.assertEqual(resolve(link, "a.txt"), str(self.share / "a.txt"))
