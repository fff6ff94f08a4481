"""Verified downloads: the bytes checked against the published size and SHA-256
before the file is renamed into place (``p2p.peer.download``, ``Expected``).

The state machine over in-memory transports and a Clock (as tests/test_peer_download.py),
the running hash's hand-off to its thread and its back-pressure with a scripted
thread, and real transfers on 127.0.0.1 with the real reactor's thread pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from p2p.peer import download as module
from p2p.peer.download import ContentMismatch, Expected, download
from p2p.peer.server import PeerServer
from tests.support import deadline
from tests.test_peer_download import FETCH_F, GET_FILE_F, MachineCase
from tests.test_peer_transfer import share_and_destination

BODY = b"hello world\n"
SHA = hashlib.sha256(BODY).hexdigest()


class VerifiedMachineTests(MachineCase):
    def start(self, expected: Expected | None) -> Deferred:
        return super().start(expected=expected)

    def assertNothingKept(self, d: Deferred) -> str:
        why = str(self.failureResultOf(d, ContentMismatch).value)
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("nothing was kept", why)
        return why

    def test_what_was_published_is_kept(self) -> None:
        d = self.start(Expected(len(BODY), SHA))
        peer = self.accept()
        peer.send(b"\x00", b"12\x00", BODY[:5], BODY[5:])
        peer.close()
        self.assertEqual(self.successResultOf(d), len(BODY))
        self.assertEqual(self.dest.read_bytes(), BODY)

    def test_same_size_other_bytes_keep_nothing(self) -> None:
        self.dest.write_bytes(b"the old file")  # left as it was
        d = self.start(Expected(len(BODY), SHA))
        peer = self.accept()
        peer.send(b"\x00", b"12\x00", b"HELLO WORLD\n")
        peer.close()
        why = str(self.failureResultOf(d, ContentMismatch).value)
        self.assertIn(SHA, why)
        self.assertIn(hashlib.sha256(b"HELLO WORLD\n").hexdigest(), why)
        self.assertEqual(os.listdir(self.dir), ["out"])
        self.assertEqual(self.dest.read_bytes(), b"the old file")

    def test_another_announced_size_fails_at_once(self) -> None:
        d = self.start(Expected(len(BODY), SHA))
        peer = self.accept()
        peer.send(b"\x00", b"13\x00")
        self.assertTrue(peer.transport.disconnecting)  # hung up without reading the bytes
        why = self.assertNothingKept(d)
        self.assertIn("13 bytes, not the 12 published", why)

    def test_a_classic_peer_sending_more_is_cut(self) -> None:
        d = self.start(Expected(len(BODY), SHA))
        self.accept().close()  # FETCH unknown: GET_FILE next
        peer = self.accept()
        self.assertEqual(peer.request, GET_FILE_F)
        peer.send(b"\x00" + BODY, b"and more")
        self.assertTrue(peer.transport.disconnecting)
        self.assertIn("more than the 12 bytes published", self.assertNothingKept(d))

    def test_a_classic_peer_sending_less(self) -> None:
        d = self.start(Expected(len(BODY), SHA))
        self.accept().close()
        peer = self.accept()
        peer.send(b"\x00" + BODY[:-1])
        peer.close()
        self.assertIn("11 bytes, not the 12 published", self.assertNothingKept(d))

    def test_a_classic_peer_verified_too(self) -> None:
        d = self.start(Expected(len(BODY), SHA))
        self.accept().close()
        peer = self.accept()
        peer.send(b"\x00" + BODY)
        peer.close()
        self.assertEqual(self.successResultOf(d), len(BODY))
        self.assertEqual(self.dest.read_bytes(), BODY)

    def test_a_hash_without_a_size(self) -> None:
        d = self.start(Expected(None, SHA))
        peer = self.accept()
        self.assertEqual(peer.request, FETCH_F)
        peer.send(b"\x00", b"12\x00", b"HELLO WORLD\n")
        peer.close()
        self.assertNothingKept(d)

    def test_nothing_published_nothing_checked(self) -> None:
        for expected in (None, Expected()):
            d = self.start(expected)
            peer = self.accept()
            peer.send(b"\x00", b"12\x00", b"HELLO WORLD\n")
            peer.close()
            self.assertEqual(self.successResultOf(d), 12)


@implementer(IReactorThreads)
class _ThreadedClock(task.Clock):
    """A Clock that says it has threads (the thread itself is scripted by the test)."""


class DigestHandOffTests(TestCase):
    """The running hash: batches, in order, one at a time; the connection paused
    while too much waits for the thread."""

    def setUp(self) -> None:
        self.calls: list[tuple[Deferred, object, tuple]] = []

        def scripted(reactor, f, *args):
            d: Deferred = Deferred()
            self.calls.append((d, f, args))
            return d

        self.patch(module, "in_thread", scripted)
        self.patch(module, "HASH_BATCH", 10)
        self.patch(module, "HASH_BACKLOG", 30)
        self.throttled: list[bool] = []
        self.digest = module._Digest(_ThreadedClock(), self.throttled.append)

    def run_next(self) -> None:
        d, f, args = self.calls.pop(0)
        d.callback(f(*args))

    def test_batches_in_order_and_back_pressure(self) -> None:
        data = [bytes([i]) * 6 for i in range(12)]
        self.digest.update(data[0])
        self.assertEqual(self.calls, [])  # under a batch: waits
        self.digest.update(data[1])
        self.assertEqual(len(self.calls), 1)  # one batch in the thread
        for chunk in data[2:8]:  # 36 bytes wait behind it
            self.digest.update(chunk)
        self.assertEqual(len(self.calls), 1)  # one at a time
        self.assertEqual(self.throttled, [True])  # paused past the backlog
        self.run_next()  # the thread takes the waiting bytes: resumed
        self.assertEqual(self.throttled, [True, False])
        self.assertEqual(len(self.calls), 1)
        for chunk in data[8:]:
            self.digest.update(chunk)
        result = self.digest.hexdigest()
        self.assertNoResult(result)
        while self.calls:
            self.run_next()
        self.assertEqual(self.successResultOf(result), hashlib.sha256(b"".join(data)).hexdigest())


class FileDigestTests(DigestHandOffTests):
    """The same hand-off when the thread reads the bytes back from the file written."""

    def setUp(self) -> None:
        super().setUp()
        path = self.mktemp()
        self.out = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        self.addCleanup(os.close, self.out)
        self.fd = os.open(path, os.O_RDONLY)
        self.digest = module._Digest(_ThreadedClock(), self.throttled.append, self.fd)
        real_update = self.digest.update

        def written_then_update(data: bytes) -> None:  # as the download does
            os.write(self.out, data)
            real_update(data)

        self.digest.update = written_then_update

    def closed(self) -> bool:
        try:
            os.fstat(self.fd)
        except OSError:
            return True
        return False

    def test_the_descriptor_is_given_back(self) -> None:
        self.digest.update(b"x" * 25)  # one batch in the thread
        self.digest.close()
        self.assertFalse(self.closed())  # the thread still reads it
        self.run_next()
        self.assertTrue(self.closed())
        self.assertEqual(self.calls, [])


class RealTransferTests(TestCase):
    """Over 127.0.0.1 with the reactor's thread pool hashing."""

    @defer.inlineCallbacks
    def test_a_large_file_verified_and_a_changed_one_refused(self) -> None:
        from twisted.internet import reactor

        share, dest = share_and_destination(self)
        data = os.urandom(3 * module.HASH_BATCH + 12345)
        (share / "big.bin").write_bytes(data)
        server = PeerServer(share, lambda name: True, reactor)
        port = yield server.listen("tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        published = Expected(len(data), hashlib.sha256(data).hexdigest())
        got = yield deadline(
            download("127.0.0.1", port, "big.bin", dest / "a", reactor=reactor, expected=published)
        )
        self.assertEqual(got, len(data))
        self.assertEqual((dest / "a").read_bytes(), data)
        # The same size, one byte changed: nothing at the destination.
        altered = bytearray(data)
        altered[len(data) // 2] ^= 1
        (share / "big.bin").write_bytes(bytes(altered))
        with self.assertRaises(ContentMismatch):
            yield deadline(
                download(
                    "127.0.0.1", port, "big.bin", dest / "b", reactor=reactor, expected=published
                )
            )
        self.assertEqual(sorted(os.listdir(dest)), ["a"])
        # No descriptor left open on a file there (the download's, or the hash's copy).
        held = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
        self.assertEqual([p for p in held if p.startswith(str(dest))], [])
