"""The peer server and the downloader over TLS (issue 8, item 5), on 127.0.0.1.

A PeerServer given an identity serves TLS and classic plaintext on one port;
a download given the owner's fingerprint goes over TLS and refuses any other
key before its request leaves (the hijack of the issue: the indexer lists
bob's fingerprint, the address serves mallory's key and mallory's file). A
recording relay between downloader and peer shows what a listener on the
path sees. The guards (timeouts, cap, stop) hold for TLS connections too,
checked on a fake clock where the socket does not matter.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
from pathlib import Path

from twisted.internet import defer, endpoints, protocol, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from p2p import tls, twisted_internals, wire
from p2p.peer import download as download_module
from p2p.peer import sender
from p2p.peer.download import DownloadFailed, NoSuchFile, WrongPeer, download
from p2p.peer.server import PeerServer
from tests.recording_relay import RecordingRelay
from tests.support import _UntilClosed, deadline, exchange, poll_until, rss_bytes, spawn
from tests.test_peer_transfer import share_and_destination

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)

#: Identities are slow-ish to make; a few shared by every test are enough.
BOB = tls.Identity.generate("bob")
MALLORY = tls.Identity.generate("mallory")


class PeerTLSTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.share, self.dest = share_and_destination(self)
        self.asked: list[str] = []
        self.server = self.serve(self.share, BOB)
        self.port = yield self.server.listen("tcp:0:interface=127.0.0.1")

    def serve(self, share: Path, identity: tls.Identity | None, **kwargs) -> PeerServer:
        def published(name: str) -> bool:
            self.asked.append(name)
            return (share / name).exists()

        server = PeerServer(share, published, reactor, identity=identity, **kwargs)
        self.addCleanup(server.stop)
        return server

    def fetch(self, name: str, port: int | None = None, fingerprint: str | None = None):
        return deadline(
            download(
                "127.0.0.1",
                port or self.port,
                name,
                self.dest / "out",
                expected_fingerprint=fingerprint,
            ),
            60,
        )

    def record_sendfile(self) -> list[int]:
        """Count the server's ``os.sendfile`` calls from now on."""
        calls: list[int] = []
        real = os.sendfile

        def counting(*args):
            calls.append(args[0])
            return real(*args)

        self.patch(os, "sendfile", counting)
        return calls

    # --- TLS downloads -------------------------------------------------------

    @defer.inlineCallbacks
    def check_tls_roundtrip(self, data: bytes):
        (self.share / "file.bin").write_bytes(data)
        sendfile_calls = self.record_sendfile()
        got = yield self.fetch("file.bin", fingerprint=BOB.fingerprint)
        self.assertEqual(got, len(data))
        self.assertEqual((self.dest / "out").read_bytes(), data)
        self.assertEqual(os.listdir(self.dest), ["out"])
        self.assertEqual(sendfile_calls, [], "sendfile must never run on a TLS connection")

    def test_tls_empty_file(self):
        return self.check_tls_roundtrip(b"")

    def test_tls_small_file(self):
        return self.check_tls_roundtrip(b"hello\0world\n" * 10)

    def test_tls_a_few_megabytes(self):
        return self.check_tls_roundtrip(os.urandom(1 << 20) * 3 + b"tail")

    def test_tls_a_few_megabytes_plain_twisted(self):
        """The same without the TLS fast path (``P2P_PLAIN_TWISTED=tls_bulk``)."""
        self.patch(twisted_internals, "ENABLED", twisted_internals.FAST_PATHS - {"tls_bulk"})
        return self.check_tls_roundtrip(os.urandom(1 << 20) * 3 + b"tail")

    def test_tls_fast_path_with_record_by_record_writes(self):
        """Where pyOpenSSL's partial-write mode cannot be cleared, the writer loops."""
        self.patch(twisted_internals, "ENABLED", twisted_internals.FAST_PATHS)
        self.patch(twisted_internals, "_whole_writes", lambda connection: None)
        return self.check_tls_roundtrip(os.urandom(1 << 20) + b"tail")

    @defer.inlineCallbacks
    def test_the_tls_fast_path_is_taken(self):
        """Each chunk goes through the bulk writer (the test above covers it switched off)."""
        self.patch(twisted_internals, "ENABLED", twisted_internals.FAST_PATHS)
        written: list[int] = []
        real = twisted_internals.tls_bulk_writer

        def recording(transport):
            write = real(transport)
            self.assertIsNotNone(write)

            def counting(data):
                written.append(len(data))
                write(data)

            return counting

        self.patch(twisted_internals, "tls_bulk_writer", recording)
        yield self.check_tls_roundtrip(b"x" * (sender.TLS_CHUNK * 2 + 5))
        self.assertEqual(written, [sender.TLS_CHUNK, sender.TLS_CHUNK, 5])

    @defer.inlineCallbacks
    def test_tls_no_such_file(self):
        yield self.assertFailure(self.fetch("nothing.txt", fingerprint=BOB.fingerprint), NoSuchFile)
        self.assertEqual(os.listdir(self.dest), [])

    # --- classic plaintext on the same port --------------------------------------

    @defer.inlineCallbacks
    def test_classic_get_file_on_the_same_port(self):
        (self.share / "song.ogg").write_bytes(b"la la la")
        reply = yield exchange(self.port, wire.encode_fields("GET_FILE", "song.ogg"))
        self.assertEqual(reply, b"\0la la la")
        reply = yield exchange(self.port, wire.encode_fields("FETCH", "song.ogg", 3))
        self.assertEqual(reply, b"\x008\0la la")

    @defer.inlineCallbacks
    def test_plaintext_download_still_uses_sendfile(self):
        """The fast path stays for plaintext (and the check above can fail)."""
        self.patch(twisted_internals, "ENABLED", twisted_internals.FAST_PATHS)
        data = os.urandom(300_000)
        (self.share / "file.bin").write_bytes(data)
        sendfile_calls = self.record_sendfile()
        yield self.fetch("file.bin")
        self.assertEqual((self.dest / "out").read_bytes(), data)
        self.assertNotEqual(sendfile_calls, [])

    # --- the hijacked address --------------------------------------------------

    @defer.inlineCallbacks
    def test_hijacked_address_is_refused_and_nothing_is_written(self):
        """The indexer lists bob's fingerprint; mallory answers at the address."""
        evil = Path(self.mktemp()).resolve()
        evil.mkdir()
        (evil / "report.txt").write_bytes(b"MALWARE from mallory")
        mallory = self.serve(evil, MALLORY)
        mallory_port = yield mallory.listen("tcp:0:interface=127.0.0.1")
        (self.dest / "out").write_bytes(b"kept")
        self.asked.clear()
        failure = yield self.assertFailure(
            self.fetch("report.txt", mallory_port, BOB.fingerprint), WrongPeer
        )
        self.assertIsInstance(failure, DownloadFailed)
        self.assertEqual(failure.mismatch.expected, BOB.fingerprint)
        self.assertEqual(failure.mismatch.got, MALLORY.fingerprint)
        self.assertIn(f"127.0.0.1:{mallory_port}", str(failure))
        self.assertEqual(os.listdir(self.dest), ["out"])
        self.assertEqual((self.dest / "out").read_bytes(), b"kept")
        self.assertEqual(self.asked, [], "the request must not reach the impostor")
        # The same address with mallory's own fingerprint works: only the key decided.
        yield self.fetch("report.txt", mallory_port, MALLORY.fingerprint)
        self.assertEqual((self.dest / "out").read_bytes(), b"MALWARE from mallory")

    @defer.inlineCallbacks
    def test_a_plaintext_peer_where_tls_is_expected_is_refused(self):
        plain = self.serve(self.share, None)
        plain_port = yield plain.listen("tcp:0:interface=127.0.0.1")
        (self.share / "a.txt").write_bytes(b"abc")
        failure = yield self.assertFailure(
            self.fetch("a.txt", plain_port, BOB.fingerprint), DownloadFailed
        )
        self.assertNotIsInstance(failure, WrongPeer)
        self.assertIn("no TLS session", str(failure))
        self.assertEqual(os.listdir(self.dest), [])

    # --- what a listener on the path sees --------------------------------------

    @defer.inlineCallbacks
    def test_a_capture_holds_neither_the_name_nor_the_bytes(self):
        name = "secret-plans.txt"
        data = b"the file bytes themselves, " * 2000
        (self.share / name).write_bytes(data)
        relay = RecordingRelay(self, "127.0.0.1", self.port)
        yield self.fetch(name, relay.listening_port, BOB.fingerprint)
        self.assertEqual((self.dest / "out").read_bytes(), data)
        seen = bytes(relay.captured)
        self.assertGreater(len(seen), len(data))  # it did record the transfer
        self.assertNotIn(name.encode(), seen)
        self.assertNotIn(b"the file bytes", seen)
        self.assertNotIn(b"FETCH", seen)
        # The same relay does see a plaintext download: the checks above can fail.
        relay.captured.clear()
        (self.dest / "out").unlink()
        yield self.fetch(name, relay.listening_port)
        self.assertIn(name.encode(), relay.captured)
        self.assertIn(b"the file bytes", relay.captured)

    # --- guards ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_silent_tls_connection_is_cut(self):
        quick = self.serve(self.share, BOB, request_timeout=0.3)
        quick_port = yield quick.listen("tcp:0:interface=127.0.0.1")
        reply = yield exchange(quick_port, bytes([wire.TLS_HANDSHAKE]), timeout=10)
        self.assertEqual(reply, b"")
        yield poll_until(lambda: not quick.connections, what="the connection dropped")
        self.assertEqual(quick.factory.open_connections, 0)

    @defer.inlineCallbacks
    def test_stop_drops_a_connection_before_its_first_byte(self):
        proto = yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), _UntilClosed()
        )
        yield poll_until(lambda: self.server.connections, what="the connection accepted")
        yield deadline(self.server.stop(), 10)
        received = yield deadline(proto.done, 10)
        self.assertEqual(received, b"")
        self.assertEqual(self.server.factory.open_connections, 0)


class PeerTLSClockTests(TestCase):
    """The guards on a fake clock: the server's own side of a TLS connection."""

    def setUp(self) -> None:
        self.share = Path(self.mktemp())
        self.share.mkdir()
        self.clock = MemoryReactorClock()
        self.server = PeerServer(
            self.share,
            lambda name: True,
            self.clock,
            request_timeout=5,
            request_deadline=12,
            idle_timeout=7,
            identity=BOB,
        )

    def connect(self):
        proto = self.server.listening_factory.buildProtocol(ADDR)
        transport = StringTransport(peerAddress=ADDR)
        proto.makeConnection(transport)
        return proto, transport

    def test_only_a_handshake_byte_then_silence_is_cut(self):
        proto, transport = self.connect()
        proto.dataReceived(bytes([wire.TLS_HANDSHAKE]))
        self.assertEqual(len(self.server.connections), 1)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        proto.connectionLost(protocol.connectionDone)
        self.assertEqual(self.server.factory.open_connections, 0)
        self.assertEqual(self.server.connections, frozenset())

    def test_a_trickled_handshake_is_cut_by_the_request_timeout(self):
        """Handshake bytes are no request bytes: they never restart the request timer."""
        proto, transport = self.connect()
        proto.dataReceived(bytes([wire.TLS_HANDSHAKE]))
        # A partial ClientHello, a byte every few seconds: never complete.
        for byte in b"\x03\x01\x02\x00\x01\x00\x01\xfc":
            self.clock.advance(4)
            if transport.disconnected:
                break
            proto.dataReceived(bytes([byte]))
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.seconds(), 8)  # the first tick past 5 s

    def test_no_first_byte_is_cut_too(self):
        _proto, transport = self.connect()
        self.clock.advance(5.1)
        self.assertTrue(transport.disconnected)

    def test_each_connection_counts_once_against_the_cap(self):
        self.server.max_connections = 2
        first, _ = self.connect()
        second, _ = self.connect()
        second.dataReceived(bytes([wire.TLS_HANDSHAKE]))
        self.assertEqual(self.server.factory.open_connections, 2)
        self.assertIsNone(self.server.listening_factory.buildProtocol(ADDR))
        first.connectionLost(protocol.connectionDone)
        second.connectionLost(protocol.connectionDone)
        self.assertEqual(self.server.factory.open_connections, 0)
        self.assertIsNotNone(self.server.listening_factory.buildProtocol(ADDR))

    def test_plaintext_through_the_sniffer_is_served_as_before(self):
        (self.share / "hello.txt").write_bytes(b"hello")
        proto, transport = self.connect()
        proto.dataReceived(wire.encode_fields("GET_FILE", "hello.txt"))
        for _ in range(100):
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        self.assertEqual(transport.value(), b"\0hello")


class TLSBulkWriterTests(TestCase):
    """Where the fast path applies, and where it leaves the plain way."""

    def test_not_for_plaintext_nor_switched_off(self):
        self.patch(twisted_internals, "ENABLED", twisted_internals.FAST_PATHS)
        self.assertIsNone(twisted_internals.tls_bulk_writer(StringTransport()))
        clock = MemoryReactorClock()
        server = PeerServer(Path("."), lambda name: True, clock, identity=BOB)
        sniffer = server.listening_factory.buildProtocol(ADDR)
        wire_bytes = StringTransport(peerAddress=ADDR)
        sniffer.makeConnection(wire_bytes)
        sniffer.dataReceived(bytes([wire.TLS_HANDSHAKE]))  # not a whole ClientHello: waits
        tls_transport = sniffer.target
        self.assertTrue(tls.is_tls(tls_transport))
        write = twisted_internals.tls_bulk_writer(tls_transport)
        self.assertIsNotNone(write)
        # Before the handshake is done, it writes the plain way: held, nothing goes out.
        write(b"early bytes")
        clock.advance(0)
        self.assertEqual(wire_bytes.value(), b"")
        self.assertFalse(wire_bytes.disconnecting)
        self.patch(twisted_internals, "ENABLED", frozenset())
        self.assertIsNone(twisted_internals.tls_bulk_writer(tls_transport))


class _Events:
    """Records what a download connection reports."""

    def __init__(self):
        self.seen: list = []

    def data_received(self, data):
        self.seen.append(data)

    def closed(self):
        self.seen.append("closed")

    def connected(self):
        self.seen.append("connected")


class HeldRecordsTests(TestCase):
    """The downloader passes on what TLS delivers record by record once per reactor turn."""

    def test_records_of_one_turn_are_passed_on_together_and_before_the_end(self):
        clock = MemoryReactorClock()
        events = _Events()
        client = download_module._PeerClient(
            events, b"FETCH\0x\0000\0", 30, clock, verify=tls.client_options(BOB.fingerprint)
        )
        client.makeConnection(StringTransport())
        client.handshakeCompleted()
        for record in (b"one", b"two", b"three"):
            client.dataReceived(record)
        self.assertEqual(events.seen, ["connected"])
        clock.advance(0)
        self.assertEqual(events.seen, ["connected", b"onetwothree"])
        client.dataReceived(b"last")
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(events.seen, ["connected", b"onetwothree", b"last", "closed"])
        self.assertEqual(clock.getDelayedCalls(), [])


#: A TLS peer server in a child process, serving every file of the directory in argv[1].
CHILD_TLS_SERVER = """
import sys
from pathlib import Path
from twisted.internet import reactor
from p2p.peer.server import PeerServer
from p2p.tls import Identity
server = PeerServer(Path(sys.argv[1]), lambda name: True, reactor, identity=Identity.generate())
server.listen("tcp:0:interface=127.0.0.1").addCallback(lambda port: print(port, flush=True))
reactor.run()
"""


class StalledTLSDownloaderTests(TestCase):
    """Downloaders that stop reading hold the TLS server to a chunk or so each, as plaintext."""

    timeout = 120

    @defer.inlineCallbacks
    def test_stalled_tls_downloaders_do_not_fill_the_servers_memory(self):
        if not Path("/proc/self/status").exists():
            self.skipTest("needs /proc to read the child's memory")
        share = Path(self.mktemp()).resolve()
        share.mkdir()
        with open(share / "huge", "wb") as f:
            f.truncate(1 << 30)  # sparse: costs no disk, reads as zeros
        child = spawn(self, [sys.executable, "-c", CHILD_TLS_SERVER, str(share)], name="peer")
        match = yield child.wait_for_line(r"^(\d+)$")
        port = int(match.group(1))

        def rss() -> int:
            return rss_bytes(child.transport.pid)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

        def stall() -> ssl.SSLSocket:
            """A TLS downloader that reads the reply's first byte, then nothing more."""
            raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            conn = context.wrap_socket(raw)
            conn.sendall(wire.encode_fields("FETCH", "huge", 0))
            self.assertEqual(conn.recv(1), b"\0")
            return conn

        before = rss()
        for _ in range(4):
            conn = yield threads.deferToThread(stall)
            self.addCleanup(conn.close)
        samples: list[int] = []

        def steady():
            samples.append(rss())
            return len(samples) >= 10 and max(samples[-10:]) == min(samples[-10:])

        with contextlib.suppress(defer.TimeoutError):  # still changing: the bound decides
            yield poll_until(steady, timeout=10, interval=0.05)
        grown = max(samples) - before
        self.assertLess(grown, 4 * 1024 * 1024, f"server RSS grew by {grown} bytes")
