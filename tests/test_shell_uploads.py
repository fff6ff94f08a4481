"""The serving side as the person at the terminal sees it: a notice when a peer
starts and ends downloading one of their files, and ``--max-uploads``: beyond it
a FETCH is answered 4 (busy: ask again later), a classic GET_FILE 2.

The peer server over in-memory transports; the downloader's reading of 4; the
notices' lines.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client.uploads import UploadNotices
from p2p.peer.download import PeerBusy
from p2p.peer.server import PeerServer
from tests.test_client_e2e import ShellProcess
from tests.test_client_tty import TerminalCase
from tests.test_peer_download import MachineCase


class _Watcher:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def started(self, who, name, size, offset) -> None:
        self.events.append(("started", who, name, size, offset))

    def ended(self, who, name, sent, complete, seconds) -> None:
        self.events.append(("ended", who, name, sent, complete))


class ServerTests(TestCase):
    def setUp(self) -> None:
        share = Path(self.mktemp())
        share.mkdir()
        (share / "my song.mp3").write_bytes(b"s" * 300_000)
        self.watcher = _Watcher()
        self.server = PeerServer(
            share,
            {"my song.mp3"}.__contains__,
            MemoryReactorClock(),
            use_sendfile=False,
            max_uploads=1,
            uploads=self.watcher,
        )

    def request(self, data: bytes, port: int) -> StringTransport:
        addr = IPv4Address("TCP", "10.0.0.7", port)
        proto = self.server.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        return transport

    def drain(self, transport: StringTransport) -> bytes:
        while transport.producer is not None:
            transport.producer.resumeProducing()
        return transport.value()

    def test_busy_beyond_max_uploads_then_served_again(self) -> None:
        first = self.request(wire.encode_fields("FETCH", "my song.mp3", 0), 1)
        self.assertEqual(self.server.uploading, 1)
        self.assertEqual(
            self.watcher.events, [("started", "10.0.0.7:1", "my song.mp3", 300_000, 0)]
        )
        # A second one while the first is under way: FETCH gets 4, GET_FILE 2.
        busy = self.request(wire.encode_fields("FETCH", "my song.mp3", 0), 2)
        self.assertEqual(busy.value(), bytes([wire.PEER_BUSY]))
        self.assertTrue(busy.disconnecting)
        classic = self.request(wire.encode_fields("GET_FILE", "my song.mp3"), 3)
        self.assertEqual(classic.value(), bytes([wire.PEER_ERROR]))
        # The first ends: told, and the next request is served.
        self.assertTrue(self.drain(first).endswith(b"s" * 1000))
        self.assertEqual(
            self.watcher.events[-1], ("ended", "10.0.0.7:1", "my song.mp3", 300_000, True)
        )
        self.assertEqual(self.server.uploading, 0)
        again = self.request(wire.encode_fields("GET_FILE", "my song.mp3"), 4)
        self.assertEqual(self.drain(again), b"\0" + b"s" * 300_000)

    def test_a_cut_transfer_is_told_as_stopped(self) -> None:
        transport = self.request(wire.encode_fields("FETCH", "my song.mp3", 100_000), 5)
        transport.producer.stopProducing()  # as when the downloader's connection is lost
        kind, who, name, sent, complete = self.watcher.events[-1]
        self.assertEqual((kind, who, name, complete), ("ended", "10.0.0.7:5", "my song.mp3", False))
        self.assertLess(sent, 200_000)
        self.assertEqual(self.server.uploading, 0)

    def test_a_failing_watcher_costs_only_its_notice(self) -> None:
        self.server.uploads = None
        self.server.uploads = type(
            "Broken", (), {"started": lambda *a: 1 / 0, "ended": lambda *a: 1 / 0}
        )()
        transport = self.request(wire.encode_fields("GET_FILE", "my song.mp3"), 6)
        self.assertEqual(len(self.drain(transport)), 300_001)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)


class BusyDownloadTests(MachineCase):
    """The downloader reads 4 to FETCH as busy, and says to try again later."""

    def test_busy(self) -> None:
        d = self.start()
        self.accept().send(bytes([wire.PEER_BUSY]))
        failure = self.failure(d, PeerBusy)
        self.assertIn("busy", str(failure))
        self.assertIn("try again later", str(failure))
        self.assertEqual(len(self.endpoint.attempts), 1)  # no GET_FILE: it would be refused too


class NoticeTests(TestCase):
    def test_the_lines(self) -> None:
        notes: list[str] = []
        notices = UploadNotices(notes.append)
        notices.started("10.0.0.7:40000", "my song.mp3", 3 * 1024 * 1024, 0)
        notices.ended("10.0.0.7:40000", "my song.mp3", 3 * 1024 * 1024, True, 75.0)
        notices.started("10.0.0.8:1", "a.txt", 10, 4)
        notices.ended("10.0.0.8:1", "a.txt", 2, False, 0.2)
        self.assertEqual(
            notes,
            [
                'upload: 10.0.0.7:40000 is downloading "my song.mp3" (3.0 MiB)',
                'upload: 10.0.0.7:40000 downloaded "my song.mp3": 3.0 MiB in 1:15',
                "upload: 10.0.0.8:1 is downloading a.txt (10 B) from byte 4",
                "upload: 10.0.0.8:1 stopped downloading a.txt: 2 B in 0:00",
            ],
        )


class _StuckReader(protocol.Protocol):
    """Asks for a file with FETCH, then reads nothing: its transfer stays under way."""

    def connectionMade(self) -> None:
        self.transport.write(wire.encode_fields("FETCH", "big.bin", 0))
        self.transport.pauseProducing()


class TerminalUploadTests(TerminalCase):
    """A shell in a terminal serving with --max-uploads 1; another downloads from it."""

    extra = ("--max-uploads", "1")

    @defer.inlineCallbacks
    def test_notices_and_a_busy_refusal_that_can_be_retried(self):
        big = self.cwd / "big.bin"
        with big.open("wb") as out:
            out.truncate(64 * 1024 * 1024)  # beyond what socket buffers hold
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        yield self.type_keys(b"PUBLISH big.bin zeros\r", "c> PUBLISH OK")
        port = int(self.indexer.users["alice"]["addr"][1])
        stuck = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), _StuckReader()
        )
        yield self.type_keys(b"", "is downloading big.bin (64.0 MiB)")
        b = ShellProcess(self, "bob", self.port, "http://127.0.0.1:1/?wsdl")
        yield b.check("REGISTER bob", "c> REGISTER OK")
        yield b.check("CONNECT bob", "c> CONNECT OK")
        yield b.check("GET_FILE alice big.bin", "c> GET_FILE FAIL")
        yield b.proc.wait_for_line(r"is busy: it serves its maximum of uploads; try again later")
        stuck.transport.abortConnection()
        yield self.type_keys(b"", "stopped downloading big.bin")
        yield b.check("GET_FILE alice big.bin", "c> GET_FILE OK")
        self.assertEqual((b.cwd / "big.bin").stat().st_size, 64 * 1024 * 1024)
        yield self.type_keys(b"", "downloaded big.bin: 64.0 MiB")
        yield b.quit()
