"""The download's state machine, driven over in-memory transports and a Clock.

Each test plays the peer by hand: it accepts the connection attempts the
download makes (a fake endpoint), reads the request from a StringTransport,
feeds reply bytes, closes, or lets the Clock run out. No sockets, no sleeps.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from twisted.internet import defer, error, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from p2p.peer import download as module
from p2p.peer.download import DownloadFailed, NoSuchFile

TIMEOUT = 5.0
FETCH_F = b"FETCH\x00f\x000\x00"
GET_FILE_F = b"GET_FILE\x00f\x00"
CLEAN = Failure(error.ConnectionDone())
RESET = Failure(error.ConnectionLost())


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Records connection attempts; the test decides how each one ends."""

    def __init__(self) -> None:
        self.attempts: list[tuple[object, Deferred]] = []

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((factory, d))
        return d


class Peer:
    """One accepted connection, as the peer sees it."""

    def __init__(self, factory, attempt: Deferred) -> None:
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        attempt.callback(self.protocol)

    @property
    def request(self) -> bytes:
        return self.transport.value()

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    def close(self, reason: Failure = CLEAN) -> None:
        self.protocol.connectionLost(reason)


class MachineCase(TestCase):
    """A download started on a fake endpoint and a Clock, its destination in a fresh folder."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.endpoint = FakeEndpoint()
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.dest = self.dir / "out"
        self.progress: list[tuple[int, int | None]] = []

    def start(self, destination: Path | None = None, **how) -> Deferred:
        """``module.start`` on the fake endpoint; ``how``: its keyword arguments."""
        return module.start(
            self.endpoint,
            "peer:1",
            "f",
            self.dest if destination is None else destination,
            lambda received, total: self.progress.append((received, total)),
            self.clock,
            TIMEOUT,
            **how,
        )

    def accept(self, index: int = -1) -> Peer:
        factory, attempt = self.endpoint.attempts[index]
        return Peer(factory, attempt)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.dir))

    def assertNothingLeft(self) -> None:
        self.assertEqual(self.files(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def failure(self, d: Deferred, kind: type[BaseException]) -> BaseException:
        return self.failureResultOf(d, kind).value


class DownloadMachineTests(MachineCase):
    # --- FETCH: connecting -> requesting -> receiving size -> receiving bytes -> done ---

    def test_fetch_to_the_end(self) -> None:
        d = self.start()
        self.assertEqual(len(self.endpoint.attempts), 1)
        peer = self.accept()
        self.assertEqual(peer.request, FETCH_F)
        peer.send(b"\x00", b"5\x00", b"hel", b"lo")
        self.assertNoResult(d)
        self.assertEqual(self.files()[0][:5], ".out.")  # only the hidden part file so far
        self.assertFalse(self.dest.exists())
        peer.close()
        self.assertEqual(self.successResultOf(d), 5)
        self.assertEqual(self.dest.read_bytes(), b"hello")
        self.assertEqual(self.files(), ["out"])
        self.assertEqual(self.progress[0], (0, 5))
        self.assertEqual(self.progress[-1], (5, 5))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_every_split_point_of_the_reply(self) -> None:
        reply = b"\x0012\x00hello world!"
        for cut in range(1, len(reply)):
            d = self.start()
            peer = self.accept()
            peer.send(reply[:cut], reply[cut:])
            peer.close()
            self.assertEqual(self.successResultOf(d), 12, cut)
            self.assertEqual(self.dest.read_bytes(), b"hello world!")
        self.assertEqual(len(self.endpoint.attempts), len(reply) - 1)  # never a fallback

    def test_empty_file(self) -> None:
        d = self.start()
        peer = self.accept()
        peer.send(b"\x000\x00")
        peer.close()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.dest.read_bytes(), b"")

    def test_all_bytes_then_a_reset_is_complete(self) -> None:
        """The size tells a finished transfer from a cut one, whatever the close."""
        d = self.start()
        peer = self.accept()
        peer.send(b"\x003\x00abc")
        peer.close(RESET)
        self.assertEqual(self.successResultOf(d), 3)

    def test_existing_destination_replaced_only_when_complete(self) -> None:
        self.dest.write_bytes(b"old")
        d = self.start()
        peer = self.accept()
        peer.send(b"\x003\x00ab")
        self.assertEqual(self.dest.read_bytes(), b"old")
        peer.send(b"c")
        peer.close()
        self.successResultOf(d)
        self.assertEqual(self.dest.read_bytes(), b"abc")

    # --- FETCH failures -------------------------------------------------------------

    def test_no_such_file(self) -> None:
        d = self.start()
        peer = self.accept()
        peer.send(b"\x01")
        self.assertNoResult(d)  # bytes may follow: a peer of the course implementation
        peer.close()
        self.failure(d, NoSuchFile)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertNothingLeft()

    def test_unknown_code_fails_without_a_fallback(self) -> None:
        d = self.start()
        self.accept().send(b"\x07")
        self.assertIn("peer answered code 7", str(self.failure(d, DownloadFailed)))
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertNothingLeft()

    def test_cut_transfer(self) -> None:
        for reason in (CLEAN, RESET):
            d = self.start()
            peer = self.accept()
            peer.send(b"\x0010\x00abc")
            peer.close(reason)
            self.assertIn("cut after 3 of 10", str(self.failure(d, DownloadFailed)))
            self.assertNothingLeft()

    def test_more_than_announced(self) -> None:
        for chunks in ((b"\x003\x00abcd",), (b"\x003\x00abc", b"d")):
            d = self.start()
            peer = self.accept()
            peer.send(*chunks)
            self.assertIn("more than the size", str(self.failure(d, DownloadFailed)))
            self.assertTrue(peer.transport.disconnecting)
            self.assertNothingLeft()

    def test_stalled_after_the_size(self) -> None:
        d = self.start()
        peer = self.accept()
        peer.send(b"\x00100\x00abc")
        self.clock.advance(TIMEOUT - 0.5)
        peer.send(b"def")  # data restarts the timer
        self.clock.advance(TIMEOUT - 0.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertIn("no data for 5 s", str(self.failure(d, DownloadFailed)))
        self.assertTrue(peer.transport.disconnecting)
        self.assertNothingLeft()

    def test_stalled_in_the_size_field(self) -> None:
        d = self.start()
        peer = self.accept()
        peer.send(b"\x0012")
        self.clock.advance(TIMEOUT)
        self.failure(d, DownloadFailed)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertNothingLeft()

    def test_no_room_for_the_announced_size(self) -> None:
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "posix_fallocate", full)
        d = self.start()
        peer = self.accept()
        peer.send(b"\x00100\x00abc")
        self.assertIn("no room for 100 bytes", str(self.failure(d, DownloadFailed)))
        self.assertTrue(peer.transport.disconnecting)
        self.assertNothingLeft()

    def test_disk_error_while_writing(self) -> None:
        def broken(self, data):
            raise OSError(errno.EIO, "I/O error")

        self.patch(module._PartFile, "write", broken)
        d = self.start()
        self.accept().send(b"\x003\x00abc")
        self.assertIn("cannot write the file", str(self.failure(d, DownloadFailed)))
        self.assertNothingLeft()

    def test_rename_into_place_fails(self) -> None:
        self.dest.mkdir()  # a directory where the file should go
        d = self.start()
        peer = self.accept()
        peer.send(b"\x003\x00abc")
        peer.close()
        self.assertIn("cannot move the file into place", str(self.failure(d, DownloadFailed)))
        self.assertEqual(self.files(), ["out"])
        self.assertEqual(os.listdir(self.dest), [])

    def test_no_place_for_the_part_file(self) -> None:
        d = self.start(self.dir / "missing" / "out")
        self.assertIn("cannot create a file beside", str(self.failure(d, DownloadFailed)))
        self.assertEqual(self.endpoint.attempts, [])

    def test_unreachable(self) -> None:
        d = self.start()
        self.endpoint.attempts[0][1].errback(error.ConnectionRefusedError())
        self.assertIn("cannot reach peer:1", str(self.failure(d, DownloadFailed)))
        self.assertNothingLeft()

    # --- the fallback to GET_FILE ---------------------------------------------------

    def fall_back(self, *reply: bytes, close: Failure | None = None, wait: bool = False):
        """Start; have the FETCH connection end as described; return (d, first, second)."""
        d = self.start()
        first = self.accept()
        first.send(*reply)
        if close is not None:
            first.close(close)
        if wait:
            self.clock.advance(TIMEOUT)
        self.assertEqual(len(self.endpoint.attempts), 2)
        second = self.accept()
        self.assertEqual(second.request, GET_FILE_F)
        return d, first, second

    def test_every_reason_to_fall_back(self) -> None:
        cases = {
            "closed without a reply byte": dict(close=CLEAN),
            "reset without a reply byte": dict(close=RESET),
            "silent": dict(wait=True),
            "answered 2": dict(reply=(b"\x02",)),
            "size not a number": dict(reply=(b"\x00abc\x00",)),
            "size too long": dict(reply=(b"\x00" + b"1" * 21,)),
            "closed in the size": dict(reply=(b"\x0012",), close=CLEAN),
            "code 0 and bytes, no size": dict(reply=(b"\x00short file",), close=CLEAN),
        }
        for why, case in cases.items():
            self.progress.clear()
            d, first, second = self.fall_back(
                *case.get("reply", ()), close=case.get("close"), wait=case.get("wait", False)
            )
            if case.get("close") is None:
                self.assertTrue(first.transport.disconnecting, why)  # hung up
            second.send(b"\x00classic", b" bytes")
            self.assertNoResult(d)
            second.close()
            self.assertEqual(self.successResultOf(d), 13, why)
            self.assertEqual(self.dest.read_bytes(), b"classic bytes", why)
            self.assertEqual(self.progress[-1], (13, 13), why)
            self.assertEqual(self.files(), ["out"], why)
            self.assertEqual(self.clock.getDelayedCalls(), [], why)
            self.dest.unlink()
            self.endpoint.attempts.clear()

    def test_the_abandoned_connection_is_not_heard_any_more(self) -> None:
        d, first, second = self.fall_back(b"\x02")
        first.send(b"\x01")  # late bytes and close of the FETCH connection
        first.close(RESET)
        second.send(b"\x00ok")
        second.close()
        self.assertEqual(self.successResultOf(d), 2)

    def test_get_file_no_such_file(self) -> None:
        d, _first, second = self.fall_back(close=CLEAN)
        second.send(b"\x01")
        self.assertNoResult(d)  # bytes may follow: a peer of the course implementation
        second.close()
        self.failure(d, NoSuchFile)
        self.assertTrue(second.transport.disconnecting)
        self.assertNothingLeft()

    def test_the_course_implementation_dialect(self) -> None:
        """Its peers send 1 then the file's bytes (not 0): after FETCH (an operation they
        ignore) the downloader asks again with GET_FILE, whose bytes are the file, whether
        they come with the 1 or after it."""
        for first_reply, second_reply in (
            ((b"\x01file", b" bytes"), (b"\x01file bytes",)),
            ((b"\x01", b"file bytes"), (b"\x01", b"file", b" bytes")),
        ):
            d, first, second = self.fall_back(*first_reply)
            self.assertTrue(first.transport.disconnecting)  # hung up: asked again
            second.send(*second_reply)
            self.assertNoResult(d)
            second.close()
            self.assertEqual(self.successResultOf(d), 10)
            self.assertEqual(self.dest.read_bytes(), b"file bytes")
            self.dest.unlink()
            self.endpoint.attempts.clear()

    def test_get_file_error_codes(self) -> None:
        # 2 from a peer that does not know FETCH: what the course implementation means
        # by a missing file.
        d, _first, second = self.fall_back(close=CLEAN)
        second.send(b"\x02")
        self.failure(d, NoSuchFile)
        self.assertNothingLeft()
        self.endpoint.attempts.clear()
        for code in (3, 255):
            d, _first, second = self.fall_back(close=CLEAN)
            second.send(bytes([code]))
            self.assertIn(f"peer answered code {code}", str(self.failure(d, DownloadFailed)))
            self.assertEqual(len(self.endpoint.attempts), 2)  # no third attempt
            self.assertNothingLeft()
            self.endpoint.attempts.clear()

    def test_get_file_cut_by_a_reset(self) -> None:
        d, _first, second = self.fall_back(close=CLEAN)
        second.send(b"\x00partial")
        second.close(RESET)
        self.assertIn("connection lost", str(self.failure(d, DownloadFailed)))
        self.assertNothingLeft()

    def test_get_file_without_a_reply(self) -> None:
        d, _first, second = self.fall_back(close=CLEAN)
        second.close()
        self.assertIn("without a reply byte", str(self.failure(d, DownloadFailed)))
        self.assertNothingLeft()

    def test_get_file_silent(self) -> None:
        d, _first, second = self.fall_back(wait=True)
        self.clock.advance(TIMEOUT)
        self.failure(d, DownloadFailed)
        self.assertTrue(second.transport.disconnecting)
        self.assertNothingLeft()

    def test_get_file_stalled(self) -> None:
        d, _first, second = self.fall_back(close=CLEAN)
        second.send(b"\x00some")
        self.clock.advance(TIMEOUT)
        self.assertIn("no data", str(self.failure(d, DownloadFailed)))
        self.assertNothingLeft()

    def test_get_file_unreachable(self) -> None:
        d = self.start()
        self.accept().close()
        self.endpoint.attempts[1][1].errback(error.ConnectionRefusedError())
        self.failure(d, DownloadFailed)
        self.assertNothingLeft()

    # --- cancel, from every state with a connection or an attempt ----------------------

    def test_cancel_while_connecting(self) -> None:
        d = self.start()
        attempt = self.endpoint.attempts[0][1]
        d.cancel()
        self.failure(d, defer.CancelledError)
        self.assertIsNone(self.successResultOf(attempt))  # cancelled, its failure handled
        self.assertNothingLeft()

    def test_cancel_while_receiving(self) -> None:
        for reply in (b"", b"\x00", b"\x005\x00ab", b"\x005\x00hello"):
            d = self.start()
            peer = self.accept()
            if reply:
                peer.send(reply)
            d.cancel()
            self.failure(d, defer.CancelledError)
            self.assertTrue(peer.transport.disconnecting, reply)
            peer.close(RESET)  # the connection's end reaches nobody
            self.assertNothingLeft()
            self.endpoint.attempts.clear()

    def test_cancel_during_get_file(self) -> None:
        d, _first, second = self.fall_back(close=CLEAN)
        second.send(b"\x00abc")
        d.cancel()
        self.failure(d, defer.CancelledError)
        self.assertTrue(second.transport.disconnecting)
        self.assertNothingLeft()

    # --- progress ----------------------------------------------------------------------

    def test_progress_is_throttled_but_the_ends_always_come(self) -> None:
        d = self.start()
        peer = self.accept()
        peer.send(b"\x0010\x00")
        for _ in range(9):
            peer.send(b"x")  # the clock does not move: no report in between
        self.assertEqual(self.progress, [(0, 10)])
        self.clock.advance(module.PROGRESS_INTERVAL)
        peer.send(b"x")
        peer.close()
        self.successResultOf(d)
        self.assertEqual(self.progress, [(0, 10), (10, 10), (10, 10)])
