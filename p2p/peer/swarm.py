"""One download from several owners of the same content at once (protocol.md 2.4, 2.5).

Given owners who published the same SHA-256 (``SOURCES``, protocol.md 8.6), the
downloader asks each for the file's piece digests (``PIECES``), uses the list
most of them agree on (one that fits the published size: a source serving
another list is not used), and fetches ranges of whole pieces (``RANGE``) from
all of them in parallel, at most :data:`PER_SOURCE` connections each:

- every piece is checked against its digest (in the reactor's thread pool) and
  only then written at its offset in the hidden partial file and recorded in its
  state (:mod:`p2p.peer.partial`), so a ``kill -9`` resumes with the pieces
  already checked; at most :data:`MAX_CHECKING` pieces wait for their check (a
  disk slower than the network): meanwhile no range goes out and the
  connections stop reading, so TCP slows the sources down;
- a source whose piece does not match its digest is dropped (it lies, or its
  copy changed); one that closes, resets, refuses or sends nothing for
  :data:`STALL` seconds is dropped too; the ranges it held go back to the
  others. Once nothing is left to hand out, an idle source fetches again the
  rest of the slowest range (whichever copy arrives first counts);
- at the end the whole file's SHA-256 (read back in a thread) must be the one
  published before the file is renamed into place.

Fewer than two sources that serve the agreed list: the download streams from
one source (``FETCH``, :func:`p2p.peer.download.start`), resuming the same
partial file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from p2p import wire
from p2p.peer import download as single
from p2p.peer.download import (
    ContentMismatch,
    DiskLimit,
    DownloadFailed,
    Expected,
    Limits,
    Progress,
    Source,
    in_thread,
)
from p2p.peer.partial import Key

#: Connections at once to one source.
PER_SOURCE = 2
#: Pieces asked in one RANGE request (fewer: more requests; more: coarser balance).
CHUNK_PIECES = 4
#: Seconds a range connection may stay silent before its source counts as stalled.
STALL = 10.0
#: Pieces at most waiting for their check in a thread, each holding its bytes (up to
#: 1 MiB below 16 GiB files): at this many no new range goes out and every range
#: connection stops reading (TCP slows the sources down) until checks complete, so a
#: disk slower than the network does not fill the memory.
MAX_CHECKING = 4
DIGEST = 32  # bytes of one SHA-256 piece digest


def _check_and_write(fd: int, offset: int, data: bytes, digest: bytes) -> bool:
    """(In a thread.) Write ``data`` at ``offset`` if its SHA-256 is ``digest``;
    whether it was. ``fd`` is this call's own descriptor, closed here."""
    try:
        if hashlib.sha256(data).digest() != digest:
            return False
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        return True
    finally:
        os.close(fd)


def _check_pieces(fd: int, pieces: list[tuple[int, int, int]], digests: bytes) -> list[int]:
    """(In a thread.) The indices of ``pieces`` (index, offset, length) the file
    holds with their digest; ``fd`` is closed here."""
    good = []
    try:
        for index, offset, length in pieces:
            data = os.pread(fd, length, offset)
            if hashlib.sha256(data).digest() == digests[index * DIGEST : (index + 1) * DIGEST]:
                good.append(index)
    finally:
        os.close(fd)
    return good


def _hash_span(sha: Any, fd: int, offset: int, length: int) -> None:
    """(In a thread.) Hash ``length`` bytes of the file at ``offset`` into ``sha``;
    ``fd`` is closed here."""
    try:
        single._hash_file(sha, fd, offset, length)
    finally:
        os.close(fd)


# --- one request to one source -------------------------------------------------------


class _Exchange:
    """One request on its own connection: a code byte, ``FIELDS`` numbers, then a body.

    Implements what :class:`p2p.peer.download._PeerClient` reports to; subclasses
    take the header (:meth:`headed`), the body (:meth:`body`) and the end
    (:meth:`ended`, with None or what went wrong).
    """

    FIELDS = 1

    def __init__(self, swarm: _Swarm, source: Source, request: bytes, timeout: float) -> None:
        self.swarm = swarm
        self.source = source
        self.code: int | None = None
        self.head: list[int] = []
        self.buffer = b""
        self.over = False
        endpoint, verify = swarm.endpoint(source)
        self.client = single._PeerClient(self, request, timeout, swarm.clock, verify)
        self.endpoint = endpoint
        self.attempt: Deferred | None = None

    def go(self) -> _Exchange:
        """Connect and send the request."""
        self.attempt = endpoints.connectProtocol(self.endpoint, self.client)
        self.attempt.addErrback(self.client.unreachable)
        return self

    # what the connection reports

    def connected(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.over:
            return
        if self.code is None:
            self.code, data = data[0], data[1:]
            if self.code != wire.PEER_OK:
                self.finish(f"answered code {self.code}")
                return
        while len(self.head) < self.FIELDS:
            try:
                field, rest = wire.take_field(self.buffer + data, wire.MAX_OFFSET_FIELD)
                if field is None:
                    self.buffer, data = rest, b""
                    return
                value = wire.decode_field(field, wire.FieldKind.OFFSET)
            except (wire.FieldTooLong, wire.BadField):
                self.finish("sent a malformed reply")
                return
            self.buffer, data = b"", rest
            self.head.append(value)
            if len(self.head) == self.FIELDS and not self.headed():
                return
        if data:
            self.body(data)

    def closed(self) -> None:
        self.finish(None)

    def lost(self, reason: Failure) -> None:
        self.finish(f"connection lost: {reason.value}")

    def timed_out(self) -> None:
        self.finish(f"sent nothing for {self.client.timeout:g} s")

    def refused(self, why: BaseException) -> None:
        self.finish(f"no TLS session: {why}")

    def unreachable(self, reason: Failure) -> None:
        self.finish(f"cannot be reached: {reason.value}")

    # the end

    def finish(self, problem: str | None) -> None:
        if self.over:
            return
        self.hang_up()
        self.ended(problem)

    def hang_up(self) -> None:
        """Report nothing more; drop the connection or its attempt."""
        self.over = True
        self.client.hang_up()
        if self.attempt is not None and not self.attempt.called:
            self.attempt.cancel()

    def headed(self) -> bool:
        return True

    def body(self, data: bytes) -> None:
        raise NotImplementedError

    def ended(self, problem: str | None) -> None:
        raise NotImplementedError


class _PiecesAsk(_Exchange):
    """``PIECES``: fires ``result`` with ``(size, piece size, digests)`` or None."""

    FIELDS = 2

    def __init__(self, swarm: _Swarm, source: Source) -> None:
        self.result: Deferred = Deferred()
        self.digests = bytearray()
        self.old = False
        request = wire.encode_fields("PIECES", source.remote)
        super().__init__(swarm, source, request, swarm.timeout)

    def headed(self) -> bool:
        size, piece = self.head
        if size != self.swarm.size:
            self.finish(f"lists pieces of a {size}-byte file, not the {self.swarm.size} published")
            return False
        if piece != wire.piece_size(size):
            # The piece size is a function of the size (protocol.md 2.5): any other would
            # only let a peer make us hold up to 32 bytes of "digests" per byte of file.
            self.finish(
                f"lists pieces of {piece} bytes, not the {wire.piece_size(size)} the size fixes"
            )
            return False
        return True

    def body(self, data: bytes) -> None:
        size, piece = self.head
        if len(self.digests) + len(data) > -(-size // piece) * DIGEST:
            self.finish("sent more piece digests than the file has pieces")
            return
        self.digests += data

    def ended(self, problem: str | None) -> None:
        if problem is None and len(self.head) == self.FIELDS:
            size, piece = self.head
            if len(self.digests) == -(-size // piece) * DIGEST:
                self.result.callback((size, piece, bytes(self.digests)))
                return
            problem = "cut its list of piece digests short"
        #: Closed without a reply byte: a peer that does not know PIECES (an older one).
        self.old = self.code is None and problem is None
        if not self.old:
            self.swarm.say(
                self.source, f"gives no piece list ({problem or 'a cut reply'}): not used"
            )
        self.result.callback(None)


class _RangeFetch(_Exchange):
    """``RANGE`` of pieces ``[first, end)``: each piece is handed to the swarm as it
    completes."""

    def __init__(
        self, swarm: _Swarm, source: Source, first: int, end: int, again: bool = False
    ) -> None:
        #: Whether these pieces are asked a second time (another source is slow
        #: with them), and whether another source was given them a second time.
        self.again = again
        self.doubled = False
        self.first = first
        self.end = end
        self.piece = first  # the piece being received
        self.offset = first * swarm.piece
        self.length = swarm.piece_end(end - 1) - self.offset
        self.received = 0
        self.current = bytearray()
        #: Bytes received while the swarm had as many pieces waiting for their check
        #: as it takes (:data:`MAX_CHECKING`): split into pieces once it has room.
        self.pending = bytearray()
        self.paused = False
        request = wire.encode_fields("RANGE", source.remote, self.offset, self.length)
        super().__init__(swarm, source, request, min(swarm.timeout, STALL))

    def remaining(self) -> range:
        """The pieces this request has not delivered yet."""
        return range(self.piece, self.end)

    def pause(self) -> None:
        """Read nothing more until :meth:`resume` (the swarm waits for checks).
        Only once the reply has begun: a connection still in its handshake or
        waiting for its reply goes on (it holds no piece; its first one waits)."""
        if not self.paused and not self.over and self.code is not None:
            self.paused = True
            self.client.pause()

    def resume(self) -> None:
        """Hand over the pieces held back, then read again if the swarm has room."""
        if not self.paused or self.over or self.swarm.saturated():
            return
        self.paused = False
        held, self.pending = self.pending, bytearray()
        self.split(memoryview(held))
        if not self.paused and not self.over:
            self.client.resume()

    def headed(self) -> bool:
        if self.head[0] != self.swarm.size:
            self.finish(
                f"announces a {self.head[0]}-byte file, not the {self.swarm.size} published"
            )
            return False
        return True

    def body(self, data: bytes) -> None:
        if self.received + len(data) > self.length:
            self.finish("sent more than the range asked")
            return
        self.received += len(data)
        self.swarm.arrived += len(data)
        if self.pending:
            self.pending += data
        else:
            self.split(memoryview(data))
        self.swarm.report()

    def split(self, view: memoryview) -> None:
        """Add ``view`` to the piece being received, handing each whole piece to the
        swarm; what would complete one while the swarm has no room waits in
        ``pending``, the connection paused."""
        while view and not self.over:
            want = self.swarm.piece_end(self.piece) - self.piece * self.swarm.piece
            take = want - len(self.current)
            if len(view) >= take and self.swarm.saturated():
                self.pending += view
                self.pause()
                return
            self.current += view[:take]
            view = view[take:]
            if len(self.current) == want:
                index, data_, self.current = self.piece, bytes(self.current), bytearray()
                self.piece += 1
                self.swarm.piece_arrived(self, index, data_)

    def ended(self, problem: str | None) -> None:
        if problem is None and self.received < self.length:
            problem = f"cut after {self.received} of the {self.length} bytes asked"
        self.swarm.range_ended(self, problem)


# --- the swarm -------------------------------------------------------------------


@dataclass
class _Peer:
    """One source as the swarm uses it."""

    source: Source
    fetches: list[_RangeFetch]
    dropped: bool = False
    #: Requests at once it takes (fewer once it answered busy, 4, with others running).
    limit: int = PER_SOURCE


class _Swarm:
    """One multi-source download: its pieces, its sources and its requests in flight."""

    def __init__(
        self,
        sources: Sequence[Source],
        destination: Path,
        expected: Expected,
        progress: Progress | None,
        reactor: Any,
        timeout: float,
        limits: Limits | None,
        notice: Callable[[str], None] | None,
    ) -> None:
        self.sources = list(sources)
        self.destination = destination
        self.expected = expected
        self.size = expected.size or 0
        self.progress = progress
        self.reactor = reactor
        self.timeout = timeout
        self.limits = limits
        self.notice = notice or (lambda _text: None)
        self.result: Deferred[int] = Deferred(lambda _d: self.cancel())
        self.part: single._PartFile | None = None
        self.asks: list[_PiecesAsk] = []
        self.peers: list[_Peer] = []
        self.piece = wire.piece_size(self.size)
        self.count = -(-self.size // self.piece)
        self.digests = b""
        self.complete: set[int] = set()
        self.checking: set[int] = set()
        self.queue: collections.deque[tuple[int, int]] = collections.deque()
        self.complete_bytes = 0
        self.arrived = 0  # bytes received in this run (progress between pieces)
        self.last_report = float("-inf")
        self.last_saved = reactor.seconds()
        self.stream: Deferred | None = None
        self.finishing = False
        self.endpoints: dict[Source, tuple[Any, Any]] = {}
        #: What times the sources' silence (the reactor; a test's Clock).
        self.clock = reactor
        #: The whole file's running SHA-256 and the pieces it has read (from 0).
        self.whole = hashlib.sha256()
        self.hashed = 0
        self.hashing = False
        #: Pieces being checked and written in threads, and what to do once none is.
        self.writing = 0
        self.release: Callable[[], None] | None = None

    # --- the steps ------------------------------------------------------------

    def start(self) -> Deferred[int]:
        named = self.sources[0]
        key = Key(self.expected.sha256, self.size, named.owner, named.remote)
        self.part, failure = single.open_part(self.destination, self.limits, key)
        if failure is not None:
            self.result.errback(failure)
            return self.result
        self.asks = [_PiecesAsk(self, source) for source in self.sources]
        for ask in self.asks:
            ask.go()
        lists = defer.gatherResults([ask.result for ask in self.asks])
        lists.addCallback(self.choose)
        lists.addErrback(self.crashed)
        return self.result

    def choose(self, lists: list[tuple[int, int, bytes] | None]) -> None:
        """Use the piece list most sources agree on (of the expected piece size),
        and the sources that serve it; fewer than two: stream from one (the owner
        named, if it is an older peer that does not know PIECES: as before)."""
        asks, self.asks = self.asks, []
        if self.result.called:
            return
        votes = collections.Counter(
            got[2] for got in lists if got is not None and got[1] == self.piece
        )
        agreed = votes.most_common(1)[0][0] if votes else None
        users = [
            source
            for source, got in zip(self.sources, lists, strict=True)
            if got is not None and got[2] == agreed
        ]
        for source, got in zip(self.sources, lists, strict=True):
            if got is not None and got[2] != agreed:
                self.say(source, "lists other piece digests than the other sources: not used")
        if len(users) < 2:
            named_is_old = asks[0].old if asks else True
            self.stream_from(users[0] if users and not named_is_old else self.sources[0])
            return
        self.digests = agreed
        self.peers = [_Peer(source, []) for source in users]
        self.resume()

    def stream_from(self, source: Source) -> None:
        """One source only: the streaming FETCH download, resuming the same files."""
        assert self.part is not None
        self.part.keep()
        self.part = None
        endpoint, verify = single.peer_endpoint(
            self.reactor, source.host, source.port, self.timeout, source.fingerprint
        )
        self.stream = single.start(
            endpoint,
            source.where,
            source.remote,
            self.destination,
            self.progress,
            self.reactor,
            self.timeout,
            verify,
            self.limits,
            self.expected,
            resume=True,
            owner=source.owner,
            notice=self.notice,
        )
        self.stream.chainDeferred(self.result)

    def resume(self) -> None:
        """Count the pieces held (checking, in a thread, those of a streamed prefix),
        reserve the disk, then fetch the rest."""
        assert self.part is not None and self.part.partial is not None
        state = self.part.partial.state
        if state.piece_size != self.piece:
            state.piece_size, state.pieces = self.piece, set()
        self.complete = {i for i in state.pieces if i < self.count}
        prefix = [
            (i, i * self.piece, self.piece_end(i) - i * self.piece)
            for i in range(self.count)
            if i not in self.complete and self.piece_end(i) <= state.prefix
        ]
        fd = self.descriptor()
        if fd is None:
            return
        work = in_thread(self.reactor, _check_pieces, fd, prefix, self.digests)
        work.addCallback(self.held)
        work.addErrback(self.crashed)

    def held(self, good: list[int]) -> None:
        if self.result.called:
            return
        assert self.part is not None and self.part.partial is not None
        self.complete.update(good)
        state = self.part.partial.state
        state.pieces = set(self.complete)
        state.prefix = 0
        self.complete_bytes = sum(self.piece_end(i) - i * self.piece for i in self.complete)
        if self.complete_bytes:
            self.notice(f"resuming {self.destination} at {self.complete_bytes} bytes")
        part = self.part

        def save_and_check() -> None:
            part.partial.save()
            # The whole size must fit; the disk is reserved a step at a time as
            # pieces arrive (piece_arrived), never all at once on the reactor.
            part.check_room(self.size)

        if not self.on_disk(save_and_check):
            return
        missing = [i for i in range(self.count) if i not in self.complete]
        # The last pieces go one at a time, so the sources end together.
        tail = PER_SOURCE * len(self.peers)
        while missing:
            longest = CHUNK_PIECES if len(missing) - CHUNK_PIECES >= tail else 1
            run = [missing.pop(0)]
            while missing and missing[0] == run[-1] + 1 and len(run) < longest:
                run.append(missing.pop(0))
            self.queue.append((run[0], run[-1] + 1))
        self.report(force=True)
        self.advance_hash()
        self.fill()

    def fill(self) -> None:
        """Give every live source work, up to :data:`PER_SOURCE` requests each."""
        if self.result.called or self.finishing or self.part is None:
            return  # (part None: failing, waiting for a piece's write to end)
        if len(self.complete) == self.count:
            self.verify_whole()
            return
        if self.saturated():
            return  # (no new range while pieces wait for their check: see checked)
        live = [peer for peer in self.peers if not peer.dropped]
        if not live:
            self.fail(DownloadFailed("every source failed; what was received is kept"))
            return
        for peer in live:
            while len(peer.fetches) < peer.limit and not peer.dropped:
                fetch = self.next_range(peer)
                if fetch is None:
                    break
                peer.fetches.append(fetch)
                fetch.go()

    def next_range(self, peer: _Peer) -> _RangeFetch | None:
        """The next request for ``peer``: queued pieces, else (the end game, for an
        idle source) the rest of another source's unfinished range, once."""
        while self.queue:
            first, end = self.queue.popleft()
            while first < end and (first in self.complete or first in self.checking):
                first += 1
            if first < end:
                return _RangeFetch(self, peer.source, first, end)
        if peer.fetches:
            return None
        slowest, left = None, 0
        for other in self.peers:
            if other is peer or other.dropped:
                continue
            for fetch in other.fetches:
                missing = sum(1 for i in fetch.remaining() if i not in self.complete)
                if not fetch.again and not fetch.doubled and missing > left:
                    slowest, left = fetch, missing
        if slowest is None:
            return None
        slowest.doubled = True
        return _RangeFetch(self, peer.source, slowest.piece, slowest.end, again=True)

    def piece_arrived(self, fetch: _RangeFetch, index: int, data: bytes) -> None:
        """A whole piece came: check it against its digest and write it, in a thread."""
        if index in self.complete or index in self.checking or self.part is None:
            return
        offset = index * self.piece
        part = self.part
        if not self.on_disk(lambda: part.make_room(offset + len(data), self.size)):
            return
        fd = self.descriptor(os.O_WRONLY)
        if fd is None:
            return
        self.checking.add(index)
        if self.saturated():
            for fetch in self.fetches():
                fetch.pause()
        digest = self.digests[index * DIGEST : (index + 1) * DIGEST]
        work = in_thread(self.reactor, _check_and_write, fd, offset, data, digest)
        self.writing += 1
        work.addBoth(self.written)
        work.addCallbacks(self.checked, self.crashed, (fetch.source, index, len(data)))

    def written(self, result: Any) -> Any:
        """A piece's thread is done: once none is left, a stopped download lets go of
        its file (its lock), so no write of ours lands in the next download's."""
        self.writing -= 1
        if not self.writing and self.release is not None:
            release, self.release = self.release, None
            release()
        return result

    def checked(self, good: bool, source: Source, index: int, length: int) -> None:
        self.checking.discard(index)
        if self.result.called or self.part is None:
            return
        if good:
            self.complete.add(index)
            self.complete_bytes += length
            assert self.part.partial is not None
            self.part.partial.state.pieces.add(index)
            now = self.reactor.seconds()
            if now - self.last_saved >= single.SAVE_INTERVAL:
                self.last_saved = now
                self.save()
            # Requests whose remaining pieces all arrived by another way are done.
            for peer in self.peers:
                for fetch in list(peer.fetches):
                    if all(i in self.complete for i in fetch.remaining()) and not fetch.current:
                        fetch.hang_up()
                        peer.fetches.remove(fetch)
        else:
            self.drop(source, f"sent piece {index} with a wrong digest")
            self.queue.appendleft((index, index + 1))
        # Room for one more piece: those held back go first, lowest first (the
        # order the whole file is hashed in; each request stops again as soon as
        # the swarm is full), then new ranges (fill).
        for fetch in sorted(self.fetches(), key=lambda f: f.piece):
            fetch.resume()
        self.report()
        self.advance_hash()
        self.fill()

    def range_ended(self, fetch: _RangeFetch, problem: str | None) -> None:
        peer = next((p for p in self.peers if fetch in p.fetches), None)
        if peer is None:
            return
        peer.fetches.remove(fetch)
        if fetch.piece < fetch.end:
            # (cut short; or ended while paused with pieces held back, unsplit)
            self.queue.appendleft((fetch.piece, fetch.end))
        if problem is not None:
            if fetch.code == wire.PEER_BUSY and peer.fetches:
                peer.limit = len(peer.fetches)  # serving us already: no more at once
            else:
                self.drop(peer.source, problem)
        self.fill()

    def drop(self, source: Source, why: str) -> None:
        """Use ``source`` no more; its unfinished ranges go back to the queue."""
        for peer in self.peers:
            if peer.source != source or peer.dropped:
                continue
            peer.dropped = True
            self.say(source, f"{why}; its ranges go to the other sources")
            for fetch in peer.fetches:
                fetch.hang_up()
                if fetch.piece < fetch.end:
                    self.queue.appendleft((fetch.piece, fetch.end))
            peer.fetches = []

    def verify_whole(self) -> None:
        """Every piece is in: compare the whole file's SHA-256 once the running hash
        has read the last pieces."""
        assert self.part is not None
        self.finishing = True
        self.hang_up()
        self.save()
        self.advance_hash()

    def advance_hash(self) -> None:
        """Feed the whole file's SHA-256 (in a thread, reading the file back) the
        pieces complete from where it stopped, in order; so at the end little is left
        to read. With every piece hashed and the download finishing: compare."""
        if self.hashing or self.part is None or self.result.called:
            return
        end = self.hashed
        while end < self.count and end in self.complete:
            end += 1
        if end == self.hashed:
            if self.finishing and self.hashed == self.count:
                self.compare(self.whole.hexdigest())
            return
        fd = self.descriptor()
        if fd is None:
            return
        self.hashing = True
        offset = self.hashed * self.piece
        length = self.piece_end(end - 1) - offset
        work = in_thread(self.reactor, _hash_span, self.whole, fd, offset, length)
        work.addCallbacks(self.hashed_to, self.crashed, (end,))

    def hashed_to(self, _: None, end: int) -> None:
        self.hashing = False
        self.hashed = end
        self.advance_hash()

    def compare(self, got: str) -> None:
        if self.result.called or self.part is None:
            return
        if got != self.expected.sha256:
            self.fail(
                ContentMismatch(
                    f"the SHA-256 of what arrived ({got}) is not the one published "
                    f"({self.expected.sha256}); nothing was kept"
                )
            )
            return
        try:
            self.part.written = self.size
            self.part.store()
        except OSError as exc:
            self.fail(DownloadFailed(f"cannot move the file into place: {exc}"))
            return
        self.part = None
        self.report(force=True)
        self.result.callback(self.size)

    # --- the ends -------------------------------------------------------------

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            return
        self.fail(CancelledError())

    def crashed(self, failure: Failure) -> None:
        if not self.result.called:
            self.fail(DownloadFailed(f"cannot go on: {failure.getErrorMessage()}"))

    def fail(self, exc: BaseException) -> None:
        """End with ``exc``: bytes found wrong are removed, the pieces checked kept.
        The end is told once no piece is being written any more (a cancel: at once)."""
        if self.part is None and self.release is not None:
            return  # (already failing, waiting for a piece's write: that end stands)
        self.hang_up()
        part, self.part = self.part, None

        def end() -> None:
            if part is not None:
                state = part.partial.state
                if isinstance(exc, ContentMismatch) or not (state.prefix or state.pieces):
                    part.discard()  # wrong bytes, or none: nothing hidden stays
                else:
                    with contextlib.suppress(OSError):
                        part.partial.save()
                    part.partial.close()
            if not self.result.called:
                self.result.errback(exc)

        if self.writing:
            self.release = end
        else:
            end()

    def hang_up(self) -> None:
        for ask in self.asks:
            ask.hang_up()
        for peer in self.peers:
            for fetch in peer.fetches:
                fetch.hang_up()
            peer.fetches = []

    # --- helpers --------------------------------------------------------------

    def endpoint(self, source: Source) -> tuple[Any, Any]:
        """Where to connect to ``source`` and its TLS options (made once per source)."""
        known = self.endpoints.get(source)
        if known is None:
            known = self.endpoints[source] = single.peer_endpoint(
                self.reactor, source.host, source.port, self.timeout, source.fingerprint
            )
        return known

    def on_disk(self, action: Callable[[], object]) -> bool:
        """Run ``action`` (a write of the state, a reservation); False, and the
        download failed, if the disk or its limits refuse it."""
        try:
            action()
        except DiskLimit as exc:
            self.fail(DownloadFailed(exc.strerror))
            return False
        except OSError as exc:
            self.fail(DownloadFailed(f"cannot write beside {self.destination}: {exc}"))
            return False
        return True

    def descriptor(self, flags: int = os.O_RDONLY) -> int | None:
        """A descriptor of the file for a thread, or None (the download failed) if
        none can be opened (too many open files, the file removed...)."""
        assert self.part is not None
        try:
            return self.part.another(flags)
        except OSError as exc:
            self.fail(DownloadFailed(f"cannot open {self.part.path}: {exc}"))
            return None

    def saturated(self) -> bool:
        """Whether as many pieces wait for their check as the swarm takes."""
        return len(self.checking) >= MAX_CHECKING

    def fetches(self) -> list[_RangeFetch]:
        """Every range request running."""
        return [fetch for peer in self.peers for fetch in peer.fetches]

    def piece_end(self, index: int) -> int:
        return min((index + 1) * self.piece, self.size)

    def save(self) -> None:
        if self.part is not None and self.part.partial is not None:
            # (failing, the next save, or the next attempt, does with less)
            with contextlib.suppress(OSError):
                self.part.partial.save()

    def say(self, source: Source, what: str) -> None:
        self.notice(f"GET_FILE: source {source.owner} ({source.where}) {what}")

    def report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = self.reactor.seconds()
        if force or now - self.last_report >= single.PROGRESS_INTERVAL:
            self.last_report = now
            in_flight = sum(len(f.current) + len(f.pending) for f in self.fetches())
            self.progress(min(self.complete_bytes + in_flight, self.size), self.size)


def download(
    sources: Sequence[Source],
    destination: Path,
    expected: Expected,
    progress: Progress | None = None,
    reactor: Any = None,
    timeout: float = 30.0,
    limits: Limits | None = None,
    notice: Callable[[str], None] | None = None,
) -> Deferred[int]:
    """Download the content ``expected`` (its size and SHA-256, both required)
    from ``sources`` (the owner asked for first) into ``destination``, resumably.

    Fires with the size, or fails as :func:`p2p.peer.download.download` does;
    the pieces already checked stay in the partial file when it stops short.
    """
    if reactor is None:
        from twisted.internet import reactor
    return _Swarm(
        sources, Path(destination), expected, progress, reactor, timeout, limits, notice
    ).start()
