"""Fetch one file from another peer into a local path, all or nothing.

protocol.md section 2. The downloader asks with ``FETCH`` (offset 0) first: the
size that comes back tells a finished transfer from a cut one and feeds the
progress bar. A peer that does not know FETCH is asked again with the classic
``GET_FILE`` on a new connection, where a clean close after code 0 marks the
end. "Does not know FETCH" is: it closes or stays silent without a reply byte,
answers 2 ("any other error", which a classic peer may give an operation it
does not know), or answers 0 without a well-formed size (a loosely written
classic peer that serves a short file whatever the operation).

Peers of the original course implementation answer 1 then the file's bytes for a
file they have and 2 for one they have not, whatever the operation: a 1 followed
by bytes (with it or later, before the close) is that dialect, and the file is
read as a GET_FILE stream; a 1 then the close is "no such file". Asked with
GET_FILE, a 2 is "no such file" too (the peer did not know FETCH, so it is not
one of ours).

Bytes go to a hidden temporary file beside the destination, renamed into place
only when the transfer is complete; any failure removes it, so the destination
either holds the whole file or is untouched. A *resumable* download (``resume``,
what GET_FILE runs) writes to ``.<name>.p2p-part`` instead and keeps it, with its
state, when it stops short (:mod:`p2p.peer.partial`); the next one of the same
content asks ``FETCH`` from the bytes held, whose hash is computed first.

Given what the owner published (:class:`Expected`: the size and SHA-256 from
``LIST_FILES``, protocol.md section 8), the download is *verified* before that
rename: a size other than the one published fails it at once (FETCH) or as soon
as it is exceeded, and the SHA-256 of the bytes, computed as they arrive in a
thread beside the reactor (:class:`_Digest`), must match; otherwise
:class:`ContentMismatch` and nothing is kept.

What a peer can cost (:class:`Limits`): disk is reserved one bounded step ahead
of the bytes written, never for a size merely announced (a lying size would fill
the disk, and reserving it would block the reactor); before each step the
destination's filesystem must keep at least 1 GiB and 5 % free, so neither a
huge FETCH size nor a classic GET_FILE peer streaming forever fills it; and a
peer sending fewer than ``min_rate`` bytes/s over a window is cut, not only a
silent one.

The download is an Automat state machine; its states, and the inputs that
move it (from the connection, the file and the caller)::

    idle ──start──▶ fetch_connecting ──connected──▶ fetch_requesting
    fetch_requesting ──answered_ok──▶ fetch_receiving_size ──sized──▶ fetch_receiving_bytes
    fetch_receiving_bytes ──all_received──▶ fetch_received_all ──closed/lost──▶ verifying
    verifying ──verified──▶ storing ──stored──▶ done
    fetch_requesting ──closed/lost/timed_out/answered_error──▶ get_file_connecting
    fetch_receiving_size ──closed/lost/malformed──▶ get_file_connecting
    fetch_requesting ──answered_bad_offset──▶ fetch_connecting (again from 0)
    fetch_receiving_size ──other_content──▶ fetch_connecting (again from 0)
    get_file_connecting ──connected──▶ get_file_requesting ──answered_ok──▶ get_file_receiving_bytes
    get_file_receiving_bytes ──closed──▶ verifying
    *_receiving_bytes, verifying ──mismatch──▶ failed (ContentMismatch)
    any *_requesting ──answered_no_file──▶ *_after_one
    *_after_one ──closed/lost/timed_out──▶ failed (NoSuchFile)
    fetch_requesting ──answered_course──▶ get_file_connecting ◀──data_received── fetch_after_one
    get_file_requesting ──answered_course──▶ get_file_receiving_bytes ◀──data── get_file_after_one
    get_file_requesting ──answered_error──▶ failed (NoSuchFile: code 2, the course dialect)
    any other trouble (unreachable, a cut, a timeout once bytes flow, a lying
    peer, a disk error, cancel) ──▶ failed (DownloadFailed, CancelledError)

Leaving a connection's states hangs it up: the connection is dropped and
nothing it reports afterwards reaches the machine.

Given the owner's fingerprint (LIST_PEERS), every connection is TLS and the
peer's key is checked during the handshake, before the request leaves: a
connection that ends before its handshake completed (``refused``) fails the
download at once, with :class:`WrongPeer` when the key was not the expected
one (a hijacked address), without asking again with GET_FILE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer, endpoints, error, protocol, threads
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorThreads, IStreamClientEndpoint
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import tls, wire
from p2p.peer.partial import Key, Partial, PartialBusy, open_partial, same_file

#: Bytes asked of the socket per read: fewer, larger reads make a transfer cheaper.
RECV_SIZE = 1024 * 1024
#: Seconds between two progress callbacks (the last one always comes).
PROGRESS_INTERVAL = 0.1

Progress = Callable[[int, "int | None"], None]

#: Default lowest rate a peer may send at, in bytes/s, averaged over ``Limits.rate_window``.
DEFAULT_MIN_RATE = 1024.0
#: Bytes collected before they go to the hashing thread together (one thread hand-off each).
HASH_BATCH = 4 * 1024 * 1024
#: Bytes waiting for the hashing thread past which the peer's connection is paused.
HASH_BACKLOG = 64 * 1024 * 1024
#: Seconds between two records of a resumable download's progress (its JSON state).
SAVE_INTERVAL = 1.0


@dataclass(frozen=True)
class Expected:
    """What the owner published for the file (``LIST_FILES``): its size and SHA-256
    in lowercase hex; None where it published none."""

    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Limits:
    """What one download may cost the downloader (protocol.md section 2.3).

    ``min_rate``: bytes/s a peer must send on average over each ``rate_window``
    seconds once file bytes flow, else it is cut (0: no minimum).
    ``reserve_step``: bytes reserved (``posix_fallocate``) ahead of those written.
    ``min_free_bytes`` / ``min_free_share``: the transfer stops before a step
    would leave less than this many bytes, or this share of the filesystem, free.
    ``statvfs``: how the destination's filesystem is measured (tests fake it).
    """

    min_rate: float = DEFAULT_MIN_RATE
    rate_window: float = 30.0
    reserve_step: int = 64 * 1024 * 1024
    min_free_bytes: int = 1024**3
    min_free_share: float = 0.05
    statvfs: Callable[[Any], Any] | None = None


class DiskLimit(OSError):
    """A reservation step would leave the destination's filesystem too full."""


class NoSuchFile(Exception):
    """The peer answered 1: no such file, or not shared."""


class DownloadFailed(Exception):
    """Anything else: peer unreachable or gone, cut transfer, peer error, disk error."""


class PeerBusy(DownloadFailed):
    """The peer answered 4: it serves as many uploads as it allows; ask again later."""


class ContentMismatch(DownloadFailed):
    """What arrived is not what the owner published (its size or SHA-256 differs)."""


class WrongPeer(DownloadFailed):
    """The peer's key is not the owner's: whoever answers at that address is someone else."""

    def __init__(self, where: str, mismatch: tls.FingerprintMismatch) -> None:
        super().__init__(f"the peer at {where} is not the expected one: {mismatch}")
        self.where = where
        self.mismatch = mismatch


# --- the temporary file --------------------------------------------------------


class _PartFile:
    """The hidden ``.<name>.*.part`` file beside the destination.

    Written as bytes arrive, with disk reserved one step ahead of them
    (:meth:`make_room`), then either renamed over the destination
    (:meth:`store`) or removed (:meth:`discard`). Raises OSError on disk trouble.

    With ``partial`` (a resumable download, :mod:`p2p.peer.partial`) the file is
    that download's ``.<name>.p2p-part``: writing continues after the bytes it
    already holds, :meth:`keep` records how far it got and leaves it for the
    next attempt, and :meth:`discard` removes it with its state.
    """

    def __init__(
        self, destination: Path, limits: Limits | None = None, partial: Partial | None = None
    ) -> None:
        self.destination = destination
        self.limits = limits or Limits()
        self.partial = partial
        self.fd: int | None
        self.written = 0
        if partial is None:
            self.fd, self.path = tempfile.mkstemp(
                dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
            )
        else:
            self.fd, self.path = partial.fd, str(partial.data_path)
            self.written = partial.state.held()
            os.lseek(self.fd, self.written, os.SEEK_SET)
        self.reserved = self.written  # bytes allocated from the start of the file

    def another(self, flags: int = os.O_RDONLY) -> int:
        """A descriptor of its own on the file, for a thread: not a ``dup``, so the
        lock on a resumable download's file goes when the download's own does.
        Opened by name, so it must still be that file: a name swapped for a link
        to someone else's file meanwhile is refused (OSError)."""
        assert self.fd is not None and self.path is not None
        fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not same_file(self.fd, os.fstat(fd)):
                raise OSError(f"{self.path} was replaced while the download ran")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def restart(self) -> None:
        """Forget the bytes held: write again from the start of an empty file."""
        if self.partial is not None:
            self.partial.reset()
        else:
            os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.written = self.reserved = 0

    def record(self) -> None:
        """Record in the partial state that the bytes written so far are complete."""
        if self.partial is not None and self.partial.state.prefix != self.written:
            self.partial.state.prefix = self.written
            self.partial.save()

    def keep(self) -> None:
        """The download stopped short: keep the bytes for the next attempt when it
        is resumable (their state recorded), else :meth:`discard` them."""
        if self.partial is None or not (self.written or self.partial.state.pieces):
            self.discard()  # (nothing to continue from: no hidden files left behind)
            return
        with contextlib.suppress(OSError):
            self.record()
        self.partial.close()
        self.fd = self.path = None

    def room(self) -> int:
        """Bytes the destination's filesystem can still take while keeping the
        limits' margin free (negative when it is already past it)."""
        st = (self.limits.statvfs or os.statvfs)(self.destination.parent)
        keep = max(
            self.limits.min_free_bytes, int(self.limits.min_free_share * st.f_blocks * st.f_frsize)
        )
        return st.f_bavail * st.f_frsize - keep

    def check_room(self, end: int) -> None:
        """Raise :class:`DiskLimit` if growing the file to ``end`` bytes (from those
        reserved) would leave less free than the limits' margin."""
        grow = end - self.reserved
        room = self.room()
        if grow > room:
            raise DiskLimit(
                errno.ENOSPC,
                f"stopped at {self.written} bytes: {grow} more would leave less than "
                f"{_size(self.limits.min_free_bytes)} or {self.limits.min_free_share:.0%} "
                f"free on the disk holding {self.destination.parent} "
                f"(room for {max(room, 0)} bytes)",
            )

    def make_room(self, end: int, cap: int | None = None) -> None:
        """Make sure the file's first ``end`` bytes are reserved, reserving one
        step further (never past ``cap``, the announced size) when they are not.
        Raises :class:`DiskLimit` when the step would leave too little free, and
        OSError when the disk refuses it; filesystems without the call are fine."""
        if end <= self.reserved:
            return
        target = end + self.limits.reserve_step
        if cap is not None:
            target = max(end, min(cap, target))
        grow = target - self.reserved
        self.check_room(target)
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(self.fd, self.reserved, grow)
            except OverflowError as exc:  # past off_t
                raise OSError(errno.EFBIG, "larger than any file can be") from exc
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
        self.reserved = target

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(data)

    def store(self) -> None:
        """Give back what was reserved past the bytes written, give the file the
        usual permissions and rename it over the destination."""
        if self.partial is not None:
            self.partial.finish(self.written, 0o666 & ~_umask())
            self.fd = self.path = None
            return
        if self.reserved > self.written:
            os.ftruncate(self.fd, self.written)
        os.fchmod(self.fd, 0o666 & ~_umask())
        os.close(self.fd)
        self.fd = None
        os.replace(self.path, self.destination)
        self.path = None

    def discard(self) -> None:
        """Close and remove the file (idempotent; nothing is left behind)."""
        if self.partial is not None:
            self.partial.remove()
            self.fd = self.path = None
            return
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


def _size(n: int) -> str:
    """``n`` bytes for a message: in GiB or MiB when it is a whole number of them."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- the running hash --------------------------------------------------------------


def in_thread(reactor: Any, f: Callable[..., Any], *args: Any) -> Deferred:
    """``f(*args)`` in the reactor's thread pool, off the reactor; fires with its result.
    A reactor without threads (a test's Clock) runs it inline."""
    if IReactorThreads.providedBy(reactor):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return defer.maybeDeferred(f, *args)


class _Digest:
    """SHA-256 of the bytes as they arrive, computed beside the reactor.

    Bytes are collected into batches of about :data:`HASH_BATCH` and hashed in
    the reactor's thread pool one batch at a time, in order; hashlib releases
    the GIL, so the hash runs on another core while the reactor keeps
    receiving. ``throttle(True)`` is called when more than :data:`HASH_BACKLOG`
    bytes wait for the thread (pause the connection), ``throttle(False)`` when
    they no longer do. A reactor without threads (a test's Clock) hashes inline.
    """

    def __init__(
        self, reactor: Any, throttle: Callable[[bool], None], fd: int | None = None
    ) -> None:
        self._sha = hashlib.sha256()
        self._reactor = reactor
        self._threaded = IReactorThreads.providedBy(reactor)
        self._throttle = throttle
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._busy = False
        self._paused = False
        self._failure: Failure | None = None
        self._result: Deferred[str] | None = None
        #: With ``fd`` (the file the bytes are written to, this object's own copy of
        #: the descriptor), the thread reads them back from it (the page cache): the
        #: bytes received are not kept alive for the thread, which costs more than
        #: reading them again (allocations and page faults on every chunk).
        self._fd = fd if self._threaded else None
        if fd is not None and self._fd is None:
            os.close(fd)
        self._hashed_to = 0  # file mode: bytes of the file the thread has hashed
        self._closing = False

    def update(self, data: bytes) -> None:
        if not self._threaded:
            self._sha.update(data)
            return
        if self._fd is not None:
            self._waiting_bytes += len(data)
        else:
            self._waiting.append(data)
            self._waiting_bytes += len(data)
        if not self._busy and self._waiting_bytes >= HASH_BATCH:
            self._submit()
        if not self._paused and self._waiting_bytes >= HASH_BACKLOG:
            self._paused = True
            self._throttle(True)

    def held(self, fd: int, count: int) -> None:
        """The file ``fd`` already holds ``count`` bytes from its start (a resumed
        download): they are hashed first, in the thread, while new bytes arrive
        after them (inline, reading ``fd``, without threads)."""
        if self._fd is None:
            _hash_file(self._sha, fd, 0, count)
            return
        self._waiting_bytes += count
        if not self._busy:
            self._submit()

    def hexdigest(self) -> Deferred[str]:
        """Fires with the hash of every byte given, once the thread has seen them all."""
        self._result = Deferred()
        if not self._busy:
            self._next()
        return self._result

    def _submit(self) -> None:
        self._busy = True
        if self._fd is not None:
            start, count = self._hashed_to, self._waiting_bytes
            self._hashed_to, self._waiting_bytes = start + count, 0
            work = in_thread(self._reactor, _hash_file, self._sha, self._fd, start, count)
        else:
            batch, self._waiting, self._waiting_bytes = self._waiting, [], 0
            work = in_thread(self._reactor, _hash_batch, self._sha, batch)
        work.addBoth(self._hashed)

    def close(self) -> None:
        """Nothing more will be asked (the download ended): give the descriptor back,
        now or when the thread is done with it."""
        self._closing = True
        if not self._busy:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _hashed(self, result: object) -> None:
        self._busy = False
        if isinstance(result, Failure):
            self._failure = result
        if self._closing:
            self._close_fd()
            return
        self._next()
        if self._paused and self._waiting_bytes < HASH_BACKLOG:
            self._paused = False
            self._throttle(False)

    def _next(self) -> None:
        """Hash what waits when there is enough of it (or the end came); fire at the end."""
        finishing = self._result is not None
        if self._waiting_bytes and (finishing or self._waiting_bytes >= HASH_BATCH):
            self._submit()  # (only threaded: inline, nothing waits)
            return
        if finishing and not self._result.called:
            if self._failure is not None:
                self._result.errback(self._failure)
            else:
                self._result.callback(self._sha.hexdigest())


def _hash_batch(sha: Any, batch: list[bytes]) -> None:
    for data in batch:
        sha.update(data)


def _hash_file(sha: Any, fd: int, start: int, count: int) -> None:
    """Hash ``count`` bytes of the file at ``start`` (in a thread), through one buffer."""
    buffer = bytearray(min(count, HASH_BATCH))
    view = memoryview(buffer)
    offset, end = start, start + count
    while offset < end:
        got = os.preadv(fd, [view[: min(len(buffer), end - offset)]], offset)
        if got <= 0:
            raise OSError(errno.EIO, f"the file ended at {offset} bytes, {end} written")
        sha.update(view[:got])
        offset += got


# --- the machine's inputs ------------------------------------------------------


class _Events(Protocol):
    """What can happen to a download: the inputs of its state machine."""

    def start(self) -> None:
        "Begin: ask with FETCH."

    def connected(self) -> None:
        "The connection is up and the request was sent."

    def unreachable(self, reason: Failure) -> None:
        "The connection attempt failed."

    def data_received(self, data: bytes) -> None:
        "Bytes from the peer."

    def answered_ok(self, rest: bytes) -> None:
        "Reply code 0, with the bytes that followed it."

    def answered_no_file(self) -> None:
        "Reply code 1: no such file, or not shared (if nothing follows it: see below)."

    def answered_course(self, rest: bytes) -> None:
        "Reply code 1 followed by bytes: a peer of the course implementation sending a file."

    def answered_error(self, code: int) -> None:
        "Reply code 2: any other error (or, from a classic peer, 'what is FETCH?')."

    def answered_unknown(self, code: int) -> None:
        "Any other reply code."

    def answered_bad_offset(self) -> None:
        "Reply code 3 to a FETCH from the bytes held: the peer's file is shorter."

    def other_content(self) -> None:
        "The FETCH size says the bytes held are of other content (no hash to tell)."

    def sized(self, size: int, rest: bytes) -> None:
        "The FETCH size field, with the bytes that followed it."

    def malformed(self) -> None:
        "A FETCH reply whose size field is not one: the peer ignored the operation."

    def all_received(self) -> None:
        "As many bytes as the FETCH size announced."

    def closed(self) -> None:
        "The peer closed the connection cleanly."

    def lost(self, reason: Failure) -> None:
        "The connection ended otherwise (reset, aborted)."

    def timed_out(self) -> None:
        "The peer said nothing for ``timeout`` seconds."

    def too_slow(self, got: int) -> None:
        "The peer sent only ``got`` bytes in the last rate window: under the minimum rate."

    def refused(self, why: BaseException) -> None:
        "A TLS connection ended before its handshake completed (``why``: a wrong key, or not TLS)."

    def broken(self, why: str) -> None:
        "The transfer cannot go on: a disk error, or a peer breaking its word."

    def mismatch(self, why: str) -> None:
        "What arrives is not what the owner published (its size or its SHA-256)."

    def verified(self) -> None:
        "All bytes arrived and they are what the owner published (or nothing was published)."

    def stored(self) -> None:
        "The file is in place at the destination."

    def cancel(self) -> None:
        "The caller cancelled the download's Deferred."


# --- the connection ------------------------------------------------------------


@implementer(IHandshakeListener)
class _PeerClient(protocol.Protocol, TimeoutMixin):
    """One connection to the peer: sends one request, then tells the machine
    what happens on the connection, until the machine hangs it up.

    Over TLS (``verify``: the connection's :class:`p2p.tls.ClientOptions`) the
    request waits in the TLS layer until the handshake has checked the peer's key.
    """

    def __init__(
        self,
        events: _Events,
        request: bytes,
        timeout: float,
        reactor: Any,
        verify: tls.ClientOptions | None = None,
    ) -> None:
        self.events: _Events | None = events
        self.request = request
        self.timeout = timeout
        self.callLater = reactor.callLater  # TimeoutMixin: the download's clock
        self.verify = verify
        self.secured = False
        # Over TLS each record (16 KiB) arrives on its own: held until the reactor's
        # next turn and passed on together, one write per socket read rather than 16.
        self._held: list[bytes] = []
        self._flush_call = None

    def connectionMade(self) -> None:
        if self.events is None:
            # Hung up while connecting (the attempt's cancel came too late): say
            # nothing, arm no timer, and do not leave the connection open.
            self.transport.abortConnection()
            return
        socket_transport = getattr(self.transport, "transport", self.transport)  # under TLS
        if hasattr(socket_transport, "bufferSize"):
            socket_transport.bufferSize = RECV_SIZE
        self.setTimeout(self.timeout)
        self.transport.write(self.request)
        if self.events is not None:
            self.events.connected()

    def dataReceived(self, data: bytes) -> None:
        if self.events is None or not data:
            return
        if self.verify is None:
            self.resetTimeout()
            self.events.data_received(data)
            return
        self._held.append(data)
        if self._flush_call is None:
            self.resetTimeout()
            self._flush_call = self.callLater(0, self._flush)

    def _flush(self) -> None:
        """Pass on the records held since the last turn (see ``dataReceived``)."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        held, self._held = self._held, []
        if self.events is not None and held:
            self.events.data_received(b"".join(held))

    def timeoutConnection(self) -> None:
        if self.events is not None:
            self.events.timed_out()

    def pause(self) -> None:
        """Read nothing more from the peer for now (TCP then slows it down), and
        stop timing its silence meanwhile: it is we who are not reading."""
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        """Read from the peer again (after :meth:`pause`), timing its silence anew."""
        if self.transport is not None:
            self.transport.resumeProducing()
        if self.events is not None:
            self.setTimeout(self.timeout)

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: the peer holds the expected key."""
        self.secured = True

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._flush()  # what arrived before the end comes before it
        events, self.events = self.events, None
        if events is None:
            return
        if self.verify is not None and not self.secured:
            events.refused(self.verify.explain(reason.value))
        elif reason.check(error.ConnectionDone):
            events.closed()
        else:
            events.lost(reason)

    def unreachable(self, reason: Failure) -> None:
        """The connection attempt failed (errback of the attempt)."""
        events, self.events = self.events, None
        if events is not None:
            events.unreachable(reason)

    def hang_up(self) -> None:
        """Report nothing more and drop the connection, if there is one."""
        self.events = None
        self._flush()  # reports nothing now: only cancels the call and drops what was held
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.abortConnection()


# --- the download: what the transitions act on -----------------------------------


class _Download:
    """One download's data and actions; the machine decides which run when."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        where: str,
        remote_name: str,
        part: _PartFile,
        progress: Progress | None,
        reactor: Any,
        timeout: float,
        verify: tls.ClientOptions | None = None,
        expected: Expected | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.verify = verify
        self.expected = expected or Expected()
        self.part = part
        self.reactor = reactor
        self.digest = self.new_digest()
        self.limits = part.limits
        self.where = where
        self.remote_name = remote_name
        self.progress = progress
        self.timeout = timeout
        self.events: _Events
        self.result: Deferred[int] = Deferred(lambda _d: self.events.cancel())
        self.client: _PeerClient | None = None
        self.attempt: Deferred | None = None
        self.head = b""  # the FETCH size field while it arrives
        self.size = 0  # FETCH: bytes announced
        self.received = part.written  # a resumed download: the bytes already held
        #: A mismatch that says nothing of the bytes held (the peer offers another size).
        self.held_intact = False
        self.last_saved = reactor.seconds()
        self.last_report = float("-inf")
        self.window_start = 0  # bytes received when the current rate window began
        self.rate_call: Any = None

    def new_digest(self) -> _Digest | None:
        """The running hash of a verified download, fed first with the bytes held."""
        if not self.expected.sha256:
            return None
        digest = _Digest(self.reactor, self.throttle, self.part.another())
        if self.part.written:
            digest.held(self.part.fd, self.part.written)
        return digest

    def start_over(self, now: bool = True) -> None:
        """The bytes held cannot be continued (a classic peer, another size): count
        from 0 again. They are dropped now, or (``now`` false) only once the peer
        actually starts sending the file (:meth:`drop_held`): a peer that fails
        before that leaves them for the next attempt."""
        self.hang_up()
        self.head = b""
        if self.received:
            self.received = 0
            if now:
                self.drop_held()

    def drop_held(self) -> None:
        """Empty the file of bytes held from an earlier attempt (:meth:`start_over`)."""
        if self.part.written and not self.received:
            self.part.restart()
            if self.digest is not None:
                self.digest.close()
                self.digest = self.new_digest()

    def connect(self, op: str) -> None:
        """Open a new connection that asks ``op`` for the file (FETCH: from the
        bytes held on)."""
        fields: list[str | int] = [op, self.remote_name]
        if op == wire.FETCH:
            fields.append(self.received)
        self.client = _PeerClient(
            self.events, wire.encode_fields(*fields), self.timeout, self.reactor, self.verify
        )
        self.attempt = endpoints.connectProtocol(self.endpoint, self.client)
        self.attempt.addErrback(self.client.unreachable)

    def watch_rate(self) -> None:
        """Start a rate window: at its end the peer must have sent ``min_rate``
        bytes/s on average, or it is cut (``too_slow``)."""
        if self.limits.min_rate <= 0:
            return
        self.window_start = self.received
        self.rate_call = self.reactor.callLater(self.limits.rate_window, self._check_rate)

    def _check_rate(self) -> None:
        self.rate_call = None
        got = self.received - self.window_start
        if got < self.limits.min_rate * self.limits.rate_window:
            self.events.too_slow(got)
        else:
            self.watch_rate()

    def stop_watching_rate(self) -> None:
        call, self.rate_call = self.rate_call, None
        if call is not None and call.active():
            call.cancel()

    def hang_up(self) -> None:
        """Drop the current connection or connection attempt."""
        self.stop_watching_rate()
        client, self.client = self.client, None
        attempt, self.attempt = self.attempt, None
        if client is not None:
            client.hang_up()
        if attempt is not None and not attempt.called:
            attempt.cancel()

    def take(self, events: _Events, data: bytes, size: int | None = None) -> bool:
        """Write bytes of the file (of ``size`` bytes, if announced), reserving
        disk a step ahead, and hash them; False (and ``broken``) if the disk, or
        its limits, refused them, or (``mismatch``) they go past the size published."""
        published = self.expected.size
        if published is not None and self.received + len(data) > published:
            events.mismatch(f"the peer sent more than the {published} bytes published")
            return False
        try:
            self.part.make_room(self.received + len(data), size)
            self.part.write(data)
        except DiskLimit as exc:
            events.broken(exc.strerror)
            return False
        except OSError as exc:
            events.broken(f"cannot write the file: {exc}")
            return False
        self.received += len(data)
        if self.digest is not None:
            self.digest.update(data)
        now = self.reactor.seconds()
        if now - self.last_saved >= SAVE_INTERVAL:
            self.last_saved = now
            try:
                self.part.record()
            except OSError as exc:
                events.broken(f"cannot record the download's progress: {exc}")
                return False
        return True

    def throttle(self, pause: bool) -> None:
        """Pause (or resume) reading from the peer while the hash catches up."""
        if self.client is not None:
            (self.client.pause if pause else self.client.resume)()

    def other_content(self, size: int) -> bool:
        """Whether a FETCH size shows the bytes held belong to other content: more
        than ``size``, or (content without a hash) not the size recorded with them.
        Else the size is recorded with them."""
        partial = self.part.partial
        if partial is not None and partial.state.key.sha256:
            return False  # the hash is the content: a size other than it published fails
        if not self.received or partial is None:
            if partial is not None and partial.state.key.size is None:
                partial.state.key = dataclasses.replace(partial.state.key, size=size)
            return False
        known = partial.state.key.size
        if self.received > size or (known is not None and known != size):
            return True
        if known is None:
            partial.state.key = dataclasses.replace(partial.state.key, size=size)
        return False

    def check_size(self, events: _Events, size: int, announced: bool = False) -> bool:
        """False (and ``mismatch``) if the peer announces (``announced``: in its FETCH
        reply, before any byte) or sent a size other than the one published."""
        published = self.expected.size
        if published is not None and size != published:
            # Announced, it says nothing of the bytes held: they stay for another peer.
            self.held_intact = announced
            events.mismatch(f"the peer offers {size} bytes, not the {published} published")
            return False
        return True

    def check(self, events: _Events) -> None:
        """All bytes are in: ``verified`` if they are what was published, else ``mismatch``
        (the hash may come later, from its thread)."""
        if not self.check_size(events, self.received):
            return
        if self.digest is None:
            events.verified()
            return

        def compare(got: str) -> None:
            if self.result.called:  # cancelled while the hash was finishing
                return
            if got == self.expected.sha256:
                events.verified()
            else:
                events.mismatch(
                    f"the SHA-256 of what arrived ({got}) is not the one published "
                    f"({self.expected.sha256})"
                )

        def trouble(failure: Failure) -> None:
            if not self.result.called:
                events.mismatch(f"the SHA-256 could not be computed: {failure.value}")

        self.digest.hexdigest().addCallbacks(compare, trouble)

    def report(self, total: int | None, force: bool = False) -> None:
        if self.progress is None:
            return
        now = self.reactor.seconds()
        if force or now - self.last_report >= PROGRESS_INTERVAL:
            self.last_report = now
            self.progress(self.received, total)

    def fail(self, exc: BaseException) -> None:
        """End with ``exc``. Bytes found wrong are removed; otherwise a resumable
        download keeps what it holds for the next attempt."""
        self.hang_up()
        if self.digest is not None:
            self.digest.close()
        if isinstance(exc, ContentMismatch) and not self.held_intact:
            self.part.discard()
        else:
            self.part.keep()
        if not self.result.called:
            self.result.errback(exc)

    def succeed(self) -> None:
        if self.digest is not None:
            self.digest.close()
        self.report(self.received, force=True)
        self.result.callback(self.received)


# --- the machine ------------------------------------------------------------------

_machine = TypeMachineBuilder(_Events, _Download)
idle = _machine.state("idle")
fetch_connecting = _machine.state("fetch_connecting")
fetch_requesting = _machine.state("fetch_requesting")
fetch_receiving_size = _machine.state("fetch_receiving_size")
fetch_receiving_bytes = _machine.state("fetch_receiving_bytes")
fetch_received_all = _machine.state("fetch_received_all")
get_file_connecting = _machine.state("get_file_connecting")
get_file_requesting = _machine.state("get_file_requesting")
get_file_receiving_bytes = _machine.state("get_file_receiving_bytes")
fetch_after_one = _machine.state("fetch_after_one")
get_file_after_one = _machine.state("get_file_after_one")
verifying = _machine.state("verifying")
storing = _machine.state("storing")
done = _machine.state("done")
failed = _machine.state("failed")

_LIVE = (
    fetch_connecting,
    fetch_requesting,
    fetch_receiving_size,
    fetch_receiving_bytes,
    fetch_received_all,
    get_file_connecting,
    get_file_requesting,
    get_file_receiving_bytes,
    fetch_after_one,
    get_file_after_one,
)


@idle.upon(_Events.start).to(fetch_connecting)
def _ask_with_fetch(events: _Events, d: _Download) -> None:
    d.connect(wire.FETCH)


@fetch_requesting.upon(_Events.answered_error).to(get_file_connecting)
@fetch_requesting.upon(_Events.closed).to(get_file_connecting)
@fetch_requesting.upon(_Events.lost).to(get_file_connecting)
@fetch_requesting.upon(_Events.timed_out).to(get_file_connecting)
@fetch_receiving_size.upon(_Events.malformed).to(get_file_connecting)
@fetch_receiving_size.upon(_Events.closed).to(get_file_connecting)
@fetch_receiving_size.upon(_Events.lost).to(get_file_connecting)
@fetch_requesting.upon(_Events.answered_course).to(get_file_connecting)
@fetch_after_one.upon(_Events.data_received).to(get_file_connecting)
def _ask_with_get_file(events: _Events, d: _Download, *_why: object) -> None:
    # Nothing was written in this attempt; bytes held from an earlier one cannot be
    # continued by GET_FILE (it always starts at 0): they go once its bytes start.
    d.start_over(now=False)
    d.connect(wire.GET_FILE)


@fetch_requesting.upon(_Events.answered_bad_offset).to(fetch_connecting)
def _ask_again_from_0(events: _Events, d: _Download) -> None:
    # The peer's file is shorter than the bytes held: they go only if it then
    # announces a size that may be kept (_expect).
    d.start_over(now=False)
    d.connect(wire.FETCH)


@fetch_receiving_size.upon(_Events.other_content).to(fetch_connecting)
def _ask_from_the_start(events: _Events, d: _Download) -> None:
    d.start_over()
    d.connect(wire.FETCH)


@fetch_connecting.upon(_Events.connected).to(fetch_requesting)
@get_file_connecting.upon(_Events.connected).to(get_file_requesting)
@fetch_requesting.upon(_Events.answered_no_file).to(fetch_after_one)
@get_file_requesting.upon(_Events.answered_no_file).to(get_file_after_one)
def _wait_for_reply(events: _Events, d: _Download) -> None:
    pass


@fetch_connecting.upon(_Events.unreachable).to(failed)
@get_file_connecting.upon(_Events.unreachable).to(failed)
def _unreachable(events: _Events, d: _Download, reason: Failure) -> None:
    d.fail(DownloadFailed(f"cannot reach {d.where}: {reason.value}"))


@fetch_requesting.upon(_Events.data_received).loop()
@get_file_requesting.upon(_Events.data_received).loop()
def _read_code(events: _Events, d: _Download, data: bytes) -> None:
    code, rest = data[0], data[1:]
    if code == wire.PEER_OK:
        events.answered_ok(rest)
    elif code == wire.PEER_NO_FILE and rest:
        events.answered_course(rest)
    elif code == wire.PEER_NO_FILE:
        events.answered_no_file()
    elif code == wire.PEER_ERROR:
        events.answered_error(code)
    elif code == wire.PEER_BAD_OFFSET and d.received:
        events.answered_bad_offset()
    else:
        events.answered_unknown(code)


# Code 1 means "no such file" when the peer closes after it (protocol.md section 2); a
# peer of the course implementation sends 1 then the file's bytes instead of 0. So after
# a lone 1 the downloader waits (_wait_for_reply) for the close (no such file) or for
# bytes: asking with FETCH, it asks again with GET_FILE (that peer ignored the
# operation); asking with GET_FILE, the bytes are the file.
@fetch_after_one.upon(_Events.closed).to(failed)
@fetch_after_one.upon(_Events.lost).to(failed)
@fetch_after_one.upon(_Events.timed_out).to(failed)
@get_file_after_one.upon(_Events.closed).to(failed)
@get_file_after_one.upon(_Events.lost).to(failed)
@get_file_after_one.upon(_Events.timed_out).to(failed)
# Asked with GET_FILE, the peer did not know FETCH: not one of ours. Its code 2 is "no
# such file" in the course implementation's dialect ("any other error" in the classic text).
@get_file_requesting.upon(_Events.answered_error).to(failed)
def _no_such_file(events: _Events, d: _Download, *_why: object) -> None:
    d.fail(NoSuchFile(d.remote_name))


@fetch_requesting.upon(_Events.answered_unknown).to(failed)
@get_file_requesting.upon(_Events.answered_unknown).to(failed)
def _peer_error(events: _Events, d: _Download, code: int) -> None:
    if code == wire.PEER_BUSY:
        d.fail(PeerBusy(f"{d.where} is busy: it serves its maximum of uploads; try again later"))
        return
    d.fail(DownloadFailed(f"peer answered code {code}"))


@get_file_requesting.upon(_Events.closed).to(failed)
@get_file_requesting.upon(_Events.lost).to(failed)
def _closed_without_reply(events: _Events, d: _Download, *_why: object) -> None:
    d.fail(DownloadFailed("peer closed without a reply byte"))


@get_file_requesting.upon(_Events.timed_out).to(failed)
def _no_reply(events: _Events, d: _Download) -> None:
    d.fail(DownloadFailed(f"peer sent no reply in {d.timeout:g} s"))


@fetch_requesting.upon(_Events.answered_ok).to(fetch_receiving_size)
@fetch_receiving_size.upon(_Events.data_received).loop()
def _read_size(events: _Events, d: _Download, data: bytes) -> None:
    try:
        field, rest = wire.take_field(d.head + data, wire.MAX_OFFSET_FIELD)
        if field is None:
            d.head = rest
            return
        size = wire.decode_field(field, wire.FieldKind.OFFSET)
    except (wire.FieldTooLong, wire.BadField):
        events.malformed()
        return
    d.head = b""
    if d.other_content(size):
        events.other_content()
        return
    events.sized(size, rest)


@fetch_receiving_size.upon(_Events.sized).to(fetch_receiving_bytes)
def _expect(events: _Events, d: _Download, size: int, rest: bytes) -> None:
    # Only the first step is reserved now; a size past the room left fails at once.
    if not d.check_size(events, size, announced=True):
        return
    d.drop_held()
    try:
        room = d.part.room()
        if size - d.received > room:
            raise DiskLimit(errno.ENOSPC, f"room for {max(room, 0)} bytes within the disk limits")
        d.part.make_room(min(size, d.received + max(len(rest), 1)), size)
    except OSError as exc:
        events.broken(f"no room for {size} bytes: {exc}")
        return
    d.size = size
    d.report(size, force=True)
    d.watch_rate()
    _take_fetch_bytes(events, d, rest)


@fetch_receiving_bytes.upon(_Events.data_received).loop()
def _take_fetch_bytes(events: _Events, d: _Download, data: bytes) -> None:
    if d.received + len(data) > d.size:
        events.broken("peer sent more than the size it announced")
    elif d.take(events, data, d.size):
        d.report(d.size)
        if d.received == d.size:
            events.all_received()


@fetch_receiving_bytes.upon(_Events.all_received).to(fetch_received_all)
def _wait_for_close(events: _Events, d: _Download) -> None:
    d.stop_watching_rate()


@fetch_received_all.upon(_Events.data_received).to(failed)
def _too_much(events: _Events, d: _Download, data: bytes) -> None:
    d.fail(DownloadFailed("peer sent more than the size it announced"))


@fetch_receiving_bytes.upon(_Events.closed).to(failed)
@fetch_receiving_bytes.upon(_Events.lost).to(failed)
def _cut(events: _Events, d: _Download, *_why: object) -> None:
    d.fail(DownloadFailed(f"cut after {d.received} of {d.size} bytes"))


@get_file_requesting.upon(_Events.answered_ok).to(get_file_receiving_bytes)
@get_file_requesting.upon(_Events.answered_course).to(get_file_receiving_bytes)
@get_file_after_one.upon(_Events.data_received).to(get_file_receiving_bytes)
def _stream(events: _Events, d: _Download, rest: bytes) -> None:
    d.drop_held()
    d.watch_rate()
    _take_get_file_bytes(events, d, rest)


@get_file_receiving_bytes.upon(_Events.data_received).loop()
def _take_get_file_bytes(events: _Events, d: _Download, data: bytes) -> None:
    if d.take(events, data):
        d.report(None)


@get_file_receiving_bytes.upon(_Events.lost).to(failed)
def _lost(events: _Events, d: _Download, reason: Failure) -> None:
    d.fail(DownloadFailed(f"connection lost: {reason.value}"))


@fetch_receiving_size.upon(_Events.timed_out).to(failed)
@fetch_receiving_bytes.upon(_Events.timed_out).to(failed)
@fetch_received_all.upon(_Events.timed_out).to(failed)
@get_file_receiving_bytes.upon(_Events.timed_out).to(failed)
def _stalled(events: _Events, d: _Download) -> None:
    d.fail(DownloadFailed(f"no data for {d.timeout:g} s"))


@fetch_receiving_bytes.upon(_Events.too_slow).to(failed)
@get_file_receiving_bytes.upon(_Events.too_slow).to(failed)
def _too_slow(events: _Events, d: _Download, got: int) -> None:
    window = d.limits.rate_window
    d.fail(
        DownloadFailed(
            f"peer too slow: {got} bytes in the last {window:g} s, under the minimum "
            f"{d.limits.min_rate:g} bytes/s (--min-rate); "
            + ("nothing was kept" if d.part.partial is None else "what arrived is kept to resume")
        )
    )


@fetch_received_all.upon(_Events.closed).to(verifying)
@fetch_received_all.upon(_Events.lost).to(verifying)
@get_file_receiving_bytes.upon(_Events.closed).to(verifying)
def _verify(events: _Events, d: _Download, *_why: object) -> None:
    d.hang_up()
    d.check(events)


@fetch_receiving_bytes.upon(_Events.mismatch).to(failed)
@get_file_receiving_bytes.upon(_Events.mismatch).to(failed)
@verifying.upon(_Events.mismatch).to(failed)
def _mismatch(events: _Events, d: _Download, why: str) -> None:
    kept = d.held_intact and d.received and d.part.partial is not None
    outcome = "what was held from before stays, hidden, to resume" if kept else "nothing was kept"
    d.fail(ContentMismatch(f"{why}; {outcome}"))


@verifying.upon(_Events.verified).to(storing)
def _store(events: _Events, d: _Download) -> None:
    try:
        d.part.store()
    except OSError as exc:
        events.broken(f"cannot move the file into place: {exc}")
        return
    events.stored()


@storing.upon(_Events.stored).to(done)
def _done(events: _Events, d: _Download) -> None:
    d.succeed()


@fetch_receiving_bytes.upon(_Events.broken).to(failed)
@get_file_receiving_bytes.upon(_Events.broken).to(failed)
@storing.upon(_Events.broken).to(failed)
def _broken(events: _Events, d: _Download, why: str) -> None:
    d.fail(DownloadFailed(why))


def _cancelled(events: _Events, d: _Download) -> None:
    d.fail(CancelledError())


def _refused(events: _Events, d: _Download, why: BaseException) -> None:
    if isinstance(why, tls.FingerprintMismatch):
        d.fail(WrongPeer(d.where, why))
    else:
        d.fail(DownloadFailed(f"no TLS session with {d.where}: {why}"))


for _state in _LIVE:
    _state.upon(_Events.cancel).to(failed)(_cancelled)
    _state.upon(_Events.refused).to(failed)(_refused)
verifying.upon(_Events.cancel).to(failed)(_cancelled)

_Machine = _machine.build()


# --- the public entry point ---------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One owner serving the content: its name, its name for the file, its
    address, and its key's fingerprint (None: plaintext, unclaimed)."""

    owner: str
    remote: str
    host: str
    port: int
    fingerprint: str | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def peer_endpoint(
    reactor: Any, host: str, port: int, timeout: float, fingerprint: str | None
) -> tuple[IStreamClientEndpoint, tls.ClientOptions | None]:
    """Where to connect for one request to a peer, and the TLS options its key is
    checked with (None: plaintext, as classic peers speak)."""
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if fingerprint is None:
        return endpoint, None
    verify = tls.client_options(fingerprint)
    return endpoints.wrapClientTLS(verify, endpoint), verify


def open_part(
    destination: Path, limits: Limits | None, key: Key | None
) -> tuple[_PartFile | None, Failure | None]:
    """The file a download writes to: resumable (``key``: what it is) or not."""
    try:
        partial = open_partial(destination, key) if key is not None else None
        return _PartFile(destination, limits, partial), None
    except PartialBusy as exc:
        return None, Failure(DownloadFailed(str(exc)))
    except (OSError, ValueError) as exc:  # ValueError: a name the system cannot take
        why = f"cannot create a file beside {destination}: {exc}"
        return None, Failure(DownloadFailed(why))


def start(
    endpoint: IStreamClientEndpoint,
    where: str,
    remote_name: str,
    destination: Path,
    progress: Progress | None,
    reactor: Any,
    timeout: float,
    verify: tls.ClientOptions | None = None,
    limits: Limits | None = None,
    expected: Expected | None = None,
    resume: bool = False,
    owner: str | None = None,
    notice: Callable[[str], None] | None = None,
) -> Deferred[int]:
    """Run one download over connections from ``endpoint`` (``where`` names it
    in messages; ``verify``: the TLS options ``endpoint`` checks the peer with,
    if any); see :func:`download`."""
    destination = Path(destination)
    key = None
    if resume:
        published = expected or Expected()
        key = Key(published.sha256, published.size, owner, remote_name)
    part, failure = open_part(destination, limits, key)
    if failure is not None:
        return defer.fail(failure)
    if part.partial is not None:
        # The stream writes on from the bytes held over whatever follows: only they count.
        part.partial.state.prefix, part.partial.state.pieces = part.written, set()
    if part.written and notice is not None:
        notice(f"resuming {destination} at {part.written} bytes")
    d = _Download(endpoint, where, remote_name, part, progress, reactor, timeout, verify, expected)
    d.events = _Machine(d)
    d.events.start()
    return d.result


def download(
    host: str,
    port: int,
    remote_name: str,
    destination: Path,
    progress: Progress | None = None,
    reactor=None,
    timeout: float = 30.0,
    expected_fingerprint: str | None = None,
    limits: Limits | None = None,
    expected: Expected | None = None,
    resume: bool = False,
    owner: str | None = None,
    notice: Callable[[str], None] | None = None,
    sources: Sequence[Source] = (),
) -> Deferred[int]:
    """Download ``remote_name`` from the peer at ``host:port`` into ``destination``.

    Fires with the number of bytes written, or fails with ``NoSuchFile`` (the
    peer answered 1) or ``DownloadFailed`` (anything else); on failure nothing
    is left at ``destination`` and the temporary file is gone. ``progress``
    gets ``(received, total or None)`` as bytes arrive, at most every 0.1 s
    and once at the end. ``timeout`` bounds the connection attempt and any
    silence of the peer. Cancelling the Deferred drops the transfer.
    ``limits`` bound what the peer can cost: disk reserved a step at a time, a
    margin kept free, a minimum rate (:class:`Limits`; its defaults if None).

    With ``expected_fingerprint`` (the owner's, from LIST_PEERS) the download
    goes over TLS and a peer whose key has another fingerprint is refused
    during the handshake, before the request is sent: :class:`WrongPeer`.
    Without it, plaintext, as classic peers speak.

    With ``expected`` (what the owner published: size, SHA-256) the bytes are
    checked before the file is renamed into place: :class:`ContentMismatch`
    when they differ, and nothing is kept.

    With ``resume`` the bytes go to ``.<name>.p2p-part`` beside the destination
    and stay there when the download stops short (cut, cancelled, killed), with
    what they are (:mod:`p2p.peer.partial`; ``owner`` names whose content it
    is when no hash was published); the next download of the same content
    continues after them (``FETCH`` from that offset), saying so through
    ``notice`` (``resuming <destination> at <N> bytes``). With ``sources``
    too (other owners of the same published SHA-256), ranges are fetched
    from all of them at once (:mod:`p2p.peer.swarm`).
    """
    if reactor is None:
        from twisted.internet import reactor
    if resume and sources and expected is not None and expected.sha256 and expected.size:
        from p2p.peer import swarm  # (swarm builds on this module)

        named = Source(owner or "", remote_name, host, port, expected_fingerprint)
        return swarm.download(
            [named, *sources],
            destination,
            expected,
            progress=progress,
            reactor=reactor,
            timeout=timeout,
            limits=limits,
            notice=notice,
        )
    endpoint, verify = peer_endpoint(reactor, host, port, timeout, expected_fingerprint)
    return start(
        endpoint,
        f"{host}:{port}",
        remote_name,
        destination,
        progress,
        reactor,
        timeout,
        verify,
        limits,
        expected,
        resume,
        owner,
        notice,
    )
