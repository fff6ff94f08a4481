"""Issue 9, item 2: a hostile peer must not fill the downloader's disk.

Real sockets on 127.0.0.1: each hostile peer is a small Twisted server in the
test, the download runs in this process on the real reactor. Where the rate
window matters its timers run on a Clock the test advances, so a trickle of one
byte every 3 s takes no wall-clock time; the destination's filesystem is
measured by a fake ``statvfs`` so the free-space rule is met in a few MiB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from p2p.peer.download import DownloadFailed, Limits, download, start

MiB = 1024 * 1024
#: What the fake filesystem says is free: far more than any real test disk.
PRETEND_FREE = 512 * 1024**3


def used(folder: Path) -> int:
    """Bytes of disk the files in ``folder`` (hidden ones included) occupy."""
    return sum(entry.stat().st_blocks * 512 for entry in folder.iterdir())


def fake_statvfs(free: Callable[[], int]):
    """A ``statvfs`` for a filesystem of twice ``PRETEND_FREE`` with ``free()`` bytes available."""
    return lambda _path: SimpleNamespace(f_frsize=1, f_blocks=2 * PRETEND_FREE, f_bavail=free())


class _Hostile(protocol.Protocol):
    """Answers the first request with ``factory.answer(request)``; the test goes on writing."""

    def connectionMade(self) -> None:
        self.request = b""
        self.sent = 0

    def dataReceived(self, data: bytes) -> None:
        self.request += data
        if self.request.count(b"\0") >= 2 and not hasattr(self, "answered"):
            self.answered = True
            self.factory.answer(self)

    def connectionLost(self, reason=None) -> None:
        self.factory.gone.append(self)


class _Stream:
    """A pull producer: ``protocol`` streams 64 KiB chunks for as long as it is read."""

    def __init__(self, proto: _Hostile) -> None:
        self.proto = proto
        self.chunk = b"x" * (64 * 1024)

    def resumeProducing(self) -> None:
        self.proto.sent += len(self.chunk)
        self.proto.transport.write(self.chunk)

    def stopProducing(self) -> None:
        pass


class _Progress:
    """The download's progress callback; ``until(n)`` fires once ``n`` bytes arrived
    (or the download ended)."""

    def __init__(self) -> None:
        self.received = -1  # no report yet
        self.ended = False
        self.waiting: list[tuple[int, Deferred]] = []

    def __call__(self, received: int, total: int | None) -> None:
        self.received = received
        self._wake()

    def end(self, result: object) -> object:
        self.ended = True
        self._wake()
        return result

    def _wake(self) -> None:
        for n, d in list(self.waiting):
            if self.ended or self.received >= n:
                self.waiting.remove((n, d))
                d.callback(None)

    def until(self, n: int) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((n, d))
        self._wake()
        return d


class HostilePeerTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.factory = protocol.Factory.forProtocol(_Hostile)
        self.factory.gone = []
        self.factory.connections = []
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def endpoint(self):
        return endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)

    def peer_answers(self, answer) -> Deferred:
        """Let the peer answer with ``answer(proto)``; fires with the connection then."""
        answered: Deferred = Deferred()

        def run(proto: _Hostile) -> None:
            answer(proto)
            answered.callback(proto)

        self.factory.answer = run
        return answered

    @defer.inlineCallbacks
    def trickle(self, limits: Limits, chunk: int, every: float, size: int):
        """A FETCH peer announcing ``size`` and sending ``chunk`` bytes every ``every``
        s of a Clock; returns (outcome, seconds on the clock, most disk the folder used)."""
        clock = task.Clock()
        progress = _Progress()
        answered = self.peer_answers(lambda p: p.transport.write(b"\0%d\0" % size))
        result = start(
            self.endpoint(),
            "hostile",
            "f",
            self.folder / "out",
            progress,
            clock,
            10.0,
            None,
            limits,
        )
        outcome: list[object] = []
        result.addBoth(outcome.append).addBoth(progress.end)
        peer = yield answered
        yield progress.until(0)  # the size arrived: the download reserved what it will
        most = used(self.folder)
        # The reactor keeps turning meanwhile: a call scheduled now fires before the end.
        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(outcome, [])
        sent = 0
        while not outcome and sent < size:
            clock.advance(every)
            if outcome:
                break
            peer.transport.write(b"y" * chunk)
            sent += chunk
            yield progress.until(sent)
            most = max(most, used(self.folder))
        if not outcome:
            peer.transport.loseConnection()
            yield progress.until(size + 1)  # fires when the download ends
        return outcome[0], clock.seconds(), most

    @defer.inlineCallbacks
    def test_huge_size_and_a_trickle(self):
        """The peer announces all the free space the download may use (512 GiB
        free, less the 5 % margin) and sends 1 byte every 3 s: the folder never
        holds more than one reservation step (64 MiB), and the peer is cut by the
        min-rate rule after one 30 s window, with nothing kept. Before the fix the
        whole announced size was reserved at once, the reactor blocked meanwhile."""
        limits = Limits(statvfs=fake_statvfs(lambda: PRETEND_FREE))
        room = PRETEND_FREE - int(limits.min_free_share * 2 * PRETEND_FREE)
        failure, seconds, most = yield self.trickle(limits, 1, 3.0, room)
        self.assertIsInstance(failure.value, DownloadFailed)
        self.assertIn("too slow", str(failure.value))
        self.assertIn("--min-rate", str(failure.value))
        self.assertEqual(seconds, limits.rate_window)
        self.assertLessEqual(most, limits.reserve_step + MiB)
        self.assertEqual(list(self.folder.iterdir()), [])

    @defer.inlineCallbacks
    def test_slow_real_link_is_not_cut(self):
        """1.5 KiB/s, above the 1 KiB/s default, for 90 s of clock: the file arrives whole."""
        limits = Limits(statvfs=fake_statvfs(lambda: PRETEND_FREE))
        size = 1536 * 90
        result, seconds, _most = yield self.trickle(limits, 1536, 1.0, size)
        self.assertEqual(result, size)
        self.assertEqual(seconds, 90.0)
        self.assertEqual((self.folder / "out").stat().st_size, size)

    @defer.inlineCallbacks
    def test_classic_peer_streaming_forever(self):
        """A classic peer (FETCH answered 2, then GET_FILE streamed without end) is
        stopped before the destination's filesystem would have less than the margin
        free: here the fake filesystem has 8 MiB above its margin, so the download
        stops within them, with a clear reason and nothing kept."""
        margin = PRETEND_FREE - 8 * MiB

        def answer(proto: _Hostile) -> None:
            if proto.request.startswith(b"FETCH\0"):
                proto.transport.write(b"\2")
                proto.transport.loseConnection()
            else:
                proto.transport.write(b"\0")
                proto.transport.registerProducer(_Stream(proto), False)
                self.streamer = proto

        self.factory.answer = answer
        limits = Limits(
            reserve_step=MiB,
            min_free_bytes=margin,
            min_free_share=0,
            statvfs=fake_statvfs(lambda: PRETEND_FREE - used(self.folder)),
        )
        d = download("127.0.0.1", self.port.getHost().port, "f", self.folder / "out", limits=limits)
        failure = yield self.assertFailure(d, DownloadFailed)
        self.assertIn("free on the disk holding", str(failure))
        self.assertGreater(self.streamer.sent, 4 * MiB)  # it did stream, and was read
        self.assertEqual(list(self.folder.iterdir()), [])
        while self.streamer not in self.factory.gone:  # the connection is dropped too
            yield task.deferLater(reactor, 0, lambda: None)

    def test_the_whole_free_space_fails_at_once(self):
        """A FETCH size of the whole free space would leave less than the margin
        free: it fails before any disk is reserved, nothing kept."""
        limits = Limits(statvfs=fake_statvfs(lambda: PRETEND_FREE))
        self.peer_answers(lambda p: p.transport.write(b"\0%d\0abc" % PRETEND_FREE))
        d = start(
            self.endpoint(), "hostile", "f", self.folder / "out", None, reactor, 10.0, None, limits
        )

        def check(exc: DownloadFailed) -> None:
            self.assertIn(f"no room for {PRETEND_FREE} bytes", str(exc))
            self.assertEqual(list(self.folder.iterdir()), [])

        return self.assertFailure(d, DownloadFailed).addCallback(check)
