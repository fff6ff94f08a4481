"""Producers that stream a byte range of an open file into a transport.

Both are pull producers (``IPullProducer``): the transport asks for more only
when it has sent what it had, so a slow or stalled downloader holds at most
one chunk of the file in this process.

- ``SendfileProducer`` hands the kernel the work: ``os.sendfile`` from the
  file to the connected socket, no file bytes in user space at all. It runs
  only when the socket is writable: after a short write it asks the
  transport to resume it once the socket can take more. Both steps reach
  below Twisted's public API, so they come from ``p2p.twisted_internals``,
  which offers them for plain TCP and UNIX transports only and not at all
  under ``P2P_PLAIN_TWISTED=1``.
- ``ChunkProducer`` reads ``CHUNK`` bytes with ``os.pread`` and writes them to
  the transport; the public-API fallback for any other transport (TLS, tests).
  On TLS it writes through ``twisted_internals.tls_bulk_writer`` when that
  applies: each chunk encrypted in one call rather than 16 KiB at a time.

- ``PacedProducer`` sends no faster than a shared :class:`~p2p.peer.ratelimit.TokenBucket`
  allows (``p2p-client --max-upload-rate``): a push producer that writes what the
  bucket grants, and waits on the reactor's clock when it is empty or the
  transport is full. Any transport; with a cap, ``sendfile`` is not used.

Each fires ``done`` with the number of file bytes sent, or fails with the
reason (the connection went away, the file shrank under us).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from zope.interface import implementer

from p2p import twisted_internals
from p2p.peer.ratelimit import TokenBucket

#: Bytes read per ``resumeProducing`` by ``ChunkProducer``: the memory bound per connection.
CHUNK = 256 * 1024
#: The same over TLS: smaller pieces stay in the allocator's reused memory (each chunk is
#: copied twice more, encrypted and out of OpenSSL; fresh pages for them cost more than
#: the cipher does).
TLS_CHUNK = 64 * 1024
#: Bytes ``SendfileProducer`` hands to the kernel per turn before yielding to other connections.
SENDFILE_TURN = 4 * 1024 * 1024


class FileShrank(Exception):
    """The file ended before the size announced to the downloader."""


class TransferStopped(Exception):
    """The transport stopped the producer (the connection was lost)."""


class _RangeProducer:
    """Common state: the file, the range ``[offset, end)``, the header, the outcome."""

    def __init__(
        self,
        transport: interfaces.ITransport,
        fd: int,
        offset: int,
        end: int,
        header: bytes = b"",
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.transport = transport
        self.fd = fd
        self.offset = offset
        self.end = end
        self.header = header
        self.sent = 0
        self.on_progress = on_progress
        self.done: Deferred[int] = Deferred()
        self._finished = False

    def start(self) -> Deferred[int]:
        """Register with the transport, which immediately asks for the first bytes."""
        self.transport.registerProducer(self, False)
        return self.done

    def _advance(self, count: int) -> None:
        self.offset += count
        self.sent += count
        if self.on_progress is not None and count:
            self.on_progress(count)

    def _read(self, count: int) -> bytes | None:
        """Up to ``count`` bytes at the offset; None once finished by an error or the
        file ending early."""
        try:
            data = os.pread(self.fd, count, self.offset)
        except OSError as exc:
            self._finish(exc)
            return None
        if not data:
            self._finish(FileShrank(self.offset))
            return None
        return data

    def _finish(self, failure: BaseException | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if failure is None:
            self.done.callback(self.sent)
        else:
            self.done.errback(failure)

    def stopProducing(self) -> None:
        self._finish(TransferStopped())


@implementer(interfaces.IPullProducer)
class ChunkProducer(_RangeProducer):
    """Read a chunk, write it, wait for the transport to want more."""

    def __init__(self, transport: interfaces.ITransport, *args, **kwargs) -> None:
        super().__init__(transport, *args, **kwargs)
        self._write = twisted_internals.tls_bulk_writer(transport) or transport.write
        self._chunk = TLS_CHUNK if interfaces.ISSLTransport.providedBy(transport) else CHUNK

    def resumeProducing(self) -> None:
        if self._finished:
            return
        if self.header:
            header, self.header = self.header, b""
            self.transport.write(header)
        if self.offset >= self.end:
            self._finish()
            return
        data = self._read(min(self._chunk, self.end - self.offset))
        if data is None:
            return
        self._write(data)
        self._advance(len(data))
        if self.offset >= self.end:
            self._finish()


@implementer(interfaces.IPullProducer)
class SendfileProducer(_RangeProducer):
    """``os.sendfile`` from the file into the socket whenever the socket is writable."""

    def __init__(
        self, transport: interfaces.ITransport, sock: socket.socket, *args, **kwargs
    ) -> None:
        super().__init__(transport, *args, **kwargs)
        self._socket = sock

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            self._send_header()
            budget = SENDFILE_TURN
            while not self.header and self.offset < self.end and budget > 0:
                count = os.sendfile(
                    self._socket.fileno(), self.fd, self.offset, min(self.end - self.offset, budget)
                )
                if count == 0:
                    self._finish(FileShrank(self.offset))
                    return
                self._advance(count)
                budget -= count
        except (BlockingIOError, InterruptedError):
            pass  # the socket is full: wait until it is writable again
        except OSError as exc:
            self._finish(exc)  # EPIPE, ECONNRESET, an I/O error reading the file
            return
        if not self.header and self.offset >= self.end:
            self._finish()
            return
        twisted_internals.resume_when_writable(self.transport)

    def _send_header(self) -> None:
        while self.header:
            count = self._socket.send(self.header)
            self.header = self.header[count:]


@implementer(interfaces.IPushProducer)
class PacedProducer(_RangeProducer):
    """Writes what ``bucket`` grants, one chunk at a time, on ``clock``'s schedule.

    Pushes while the transport takes bytes; ``pauseProducing`` (its buffer is
    full) stops it until ``resumeProducing``; an empty bucket queues it until the
    bucket wakes it in turn. At most one chunk is held in memory.
    """

    def __init__(
        self,
        transport: interfaces.ITransport,
        bucket: TokenBucket,
        clock,
        *args,
        **kwargs,
    ) -> None:
        super().__init__(transport, *args, **kwargs)
        self.bucket = bucket
        self.clock = clock
        self._chunk = min(
            TLS_CHUNK if interfaces.ISSLTransport.providedBy(transport) else CHUNK, bucket.burst
        )
        self._paused = False
        self._queued = False  # waiting for its turn at the bucket
        self._call = None

    def start(self) -> Deferred[int]:
        self.transport.registerProducer(self, True)
        self._schedule(0)
        return self.done

    def _schedule(self, delay: float) -> None:
        if self._call is None and not self._finished:
            self._call = self.clock.callLater(delay, self._pump)

    def _wake(self) -> None:
        """The bucket says it is this transfer's turn."""
        self._queued = False
        self._pump(turn=True)

    def _pump(self, turn: bool = False) -> None:
        self._call = None
        if self.header and not self._finished:
            header, self.header = self.header, b""
            self.transport.write(header)
        while not self._paused and not self._finished and not self._queued:
            if self.offset >= self.end:
                self._finish()
                return
            want = min(self._chunk, self.end - self.offset)
            granted = self.bucket.take(want, turn)
            turn = False
            if not granted:
                self._queued = True
                self.bucket.queue(self._wake, want)
                return
            data = self._read(granted)
            if data is None:
                return
            self.transport.write(data)  # may pause us (the transport's buffer is full)
            self._advance(len(data))

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule(0)

    def _finish(self, failure: BaseException | None = None) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._queued:
            self._queued = False
            self.bucket.cancel(self._wake)
        super()._finish(failure)


def make_producer(
    transport: interfaces.ITransport,
    fd: int,
    offset: int,
    end: int,
    header: bytes = b"",
    on_progress: Callable[[int], None] | None = None,
    use_sendfile: bool = True,
    bucket: TokenBucket | None = None,
    clock=None,
) -> _RangeProducer:
    """The fastest producer this transport allows (sendfile on a plain socket); with a
    ``bucket``, the one that keeps to its rate (on ``clock``, the reactor)."""
    if bucket is not None:
        return PacedProducer(transport, bucket, clock, fd, offset, end, header, on_progress)
    sock = twisted_internals.sendfile_socket(transport) if use_sendfile else None
    if sock is None:
        return ChunkProducer(transport, fd, offset, end, header, on_progress)
    return SendfileProducer(transport, sock, fd, offset, end, header, on_progress)
