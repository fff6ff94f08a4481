"""Fetch one file from another peer into a local path, all or nothing.

protocol.md section 2. The downloader asks with ``FETCH`` (offset 0) first: the
size that comes back tells a finished transfer from a cut one and feeds the
progress bar. A peer that closes without a reply byte does not know FETCH, so
the download is retried with the classic ``GET_FILE`` on a new connection, where
a clean close after code 0 marks the end. So is a FETCH answered with code 0
and no size at all: a loosely written classic peer that serves a short file
whatever the operation.

Bytes go to a hidden temporary file beside the destination, renamed into place
only when the transfer is complete; any failure removes it, so the destination
either holds the whole file or is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from twisted.internet import endpoints, error, protocol
from twisted.internet.defer import Deferred
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from p2p import wire

#: Bytes asked of the socket per read: fewer, larger reads make a transfer cheaper.
RECV_SIZE = 1024 * 1024
#: Seconds between two progress callbacks (the last one always comes).
PROGRESS_INTERVAL = 0.1

Progress = Callable[[int, "int | None"], None]


class NoSuchFile(Exception):
    """The peer answered 1: no such file, or not shared."""


class DownloadFailed(Exception):
    """Anything else: peer unreachable or gone, cut transfer, peer error, disk error."""


class _NoReply(Exception):
    """The peer closed (or stayed silent) without a reply byte: it may not know FETCH."""


class _PeerClient(protocol.Protocol, TimeoutMixin):
    """One request (FETCH or GET_FILE) and its reply, written into ``download``'s file."""

    def __init__(self, download: _Download, op: str) -> None:
        self.download = download
        self.op = op
        self.code: int | None = None
        self.head = b""  # the FETCH size field while it arrives
        self.size: int | None = None  # FETCH: bytes announced
        self.received = 0
        self.outcome: BaseException | None = None  # decided before the connection closed

    def connectionMade(self) -> None:
        self.download.connected(self)
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = RECV_SIZE
        self.setTimeout(self.download.timeout)
        fields = [self.op, self.download.remote_name]
        if self.op == wire.FETCH:
            fields.append(0)
        self.transport.write(wire.encode_fields(*fields))

    def timeoutConnection(self) -> None:
        if self.code is None:
            self._stop(_NoReply("no reply"))
        else:
            self._stop(DownloadFailed(f"no data for {self.download.timeout:g} s"))

    def _stop(self, outcome: BaseException) -> None:
        """Decide the outcome now and drop the connection."""
        if self.outcome is None:
            self.outcome = outcome
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        self.resetTimeout()
        if self.code is None:
            self.code = data[0]
            data = data[1:]
            if self.code != wire.PEER_OK:
                if self.code == wire.PEER_NO_FILE:
                    self._stop(NoSuchFile(self.download.remote_name))
                elif self.op == wire.FETCH and self.code == wire.PEER_ERROR:
                    # A classic peer may answer an operation it does not know with
                    # "any other error": ask again the classic way, which also
                    # reports a real error of ours (2 again) as a failure.
                    self._stop(_NoReply("FETCH answered 2"))
                else:
                    self._stop(DownloadFailed(f"peer answered code {self.code}"))
                return
        if self.op == wire.FETCH and self.size is None:
            try:
                field, data = wire.take_field(self.head + data, wire.MAX_OFFSET_FIELD)
                if field is None:
                    self.head = data
                    return
                self.size = wire.decode_field(field, wire.FieldKind.OFFSET)
            except (wire.FieldTooLong, wire.BadField):
                # Not a FETCH reply: a peer that ignored the operation. Try GET_FILE.
                self._stop(_NoReply("malformed FETCH reply"))
                return
            self.head = b""
            try:
                self.download.reserve(self.size)
            except OSError as exc:
                self._stop(DownloadFailed(f"no room for {self.size} bytes: {exc}"))
                return
            self.download.report(0, self.size, force=True)
        if not data:
            return
        self.received += len(data)
        if self.size is not None and self.received > self.size:
            self._stop(DownloadFailed("peer sent more than the size it announced"))
            return
        try:
            self.download.write(data)
        except OSError as exc:
            self._stop(DownloadFailed(f"cannot write the file: {exc}"))
            return
        self.download.report(self.received, self.size)

    def connectionLost(self, reason: Failure) -> None:
        self.setTimeout(None)
        self.download.finished(self, self._verdict(reason))

    def _verdict(self, reason: Failure) -> BaseException | None:
        """None for a complete transfer, else the exception the download fails with."""
        if self.outcome is not None:
            return self.outcome
        if self.code is None:
            return _NoReply("closed without a reply byte")
        if self.size is not None:
            if self.received == self.size:
                return None
            return DownloadFailed(f"cut after {self.received} of {self.size} bytes")
        if self.op == wire.FETCH:
            # A classic peer serving a short file whatever the operation: try GET_FILE.
            return _NoReply("closed before the FETCH size arrived")
        if reason.check(error.ConnectionDone):
            return None  # GET_FILE ends with a clean close
        return DownloadFailed(f"connection lost: {reason.value}")


class _Download:
    """One download: the temporary file, the attempts, the outcome."""

    def __init__(
        self,
        host: str,
        port: int,
        remote_name: str,
        destination: Path,
        progress: Progress | None,
        reactor,
        timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.remote_name = remote_name
        self.destination = Path(destination)
        self.progress = progress
        self.reactor = reactor
        self.timeout = timeout
        self.result: Deferred[int] = Deferred(self._cancel)
        self.fd: int | None = None
        self.temp: str | None = None
        self.client: _PeerClient | None = None
        self.connecting: Deferred | None = None
        self.last_report = float("-inf")
        self.cancelled = False

    # --- life cycle --------------------------------------------------------

    def start(self) -> Deferred[int]:
        try:
            self.fd, self.temp = tempfile.mkstemp(
                dir=self.destination.parent, prefix=f".{self.destination.name}.", suffix=".part"
            )
        except OSError as exc:
            self.result.errback(
                DownloadFailed(f"cannot create a file beside {self.destination}: {exc}")
            )
            return self.result
        self._attempt(wire.FETCH)
        return self.result

    def _attempt(self, op: str) -> None:
        endpoint = endpoints.HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.timeout
        )
        self.connecting = endpoints.connectProtocol(endpoint, _PeerClient(self, op))
        self.connecting.addErrback(self._unreachable)

    def connected(self, client: _PeerClient) -> None:
        self.connecting = None
        self.client = client

    def _unreachable(self, reason: Failure) -> None:
        self.connecting = None
        if self.cancelled:
            return
        self._fail(DownloadFailed(f"cannot reach {self.host}:{self.port}: {reason.value}"))

    def finished(self, client: _PeerClient, verdict: BaseException | None) -> None:
        """A connection closed with ``verdict`` (None: complete)."""
        self.client = None
        if self.result.called:
            return
        if isinstance(verdict, _NoReply):
            if client.op == wire.FETCH:
                self._restart_as_get_file()
                return
            verdict = DownloadFailed(f"peer {verdict}")
        if verdict is not None:
            self._fail(verdict)
            return
        self._complete(client.received)

    def _restart_as_get_file(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError as exc:
            self._fail(DownloadFailed(f"cannot reuse the temporary file: {exc}"))
            return
        self._attempt(wire.GET_FILE)

    def _complete(self, received: int) -> None:
        try:
            os.fchmod(self.fd, 0o666 & ~_umask())
            os.close(self.fd)
            self.fd = None
            os.replace(self.temp, self.destination)
        except OSError as exc:
            self._fail(DownloadFailed(f"cannot move the file into place: {exc}"))
            return
        self.temp = None
        self.report(received, received, force=True)
        self.result.callback(received)

    def _fail(self, exc: BaseException) -> None:
        self._cleanup()
        if not self.result.called:
            self.result.errback(exc)

    def _cleanup(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)
            self.temp = None

    def _cancel(self, _result: Deferred) -> None:
        """``result.cancel()``: drop the connection and the temporary file."""
        self.cancelled = True
        self._cleanup()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.client is not None:
            self.client.transport.abortConnection()

    # --- data --------------------------------------------------------------

    def reserve(self, size: int) -> None:
        """Allocate the file's blocks up front: a full disk fails now, and the
        writes that follow are cheaper. Filesystems without the call are fine."""
        if size <= 0 or not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OverflowError as exc:  # a lying peer's 20-digit size, past off_t
            raise OSError(errno.EFBIG, "larger than any file can be") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def report(self, received: int, total: int | None, force: bool = False) -> None:
        if self.progress is None:
            return
        now = self.reactor.seconds()
        if force or now - self.last_report >= PROGRESS_INTERVAL:
            self.last_report = now
            self.progress(received, total)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def download(
    host: str,
    port: int,
    remote_name: str,
    destination: Path,
    progress: Progress | None = None,
    reactor=None,
    timeout: float = 30.0,
) -> Deferred[int]:
    """Download ``remote_name`` from the peer at ``host:port`` into ``destination``.

    Fires with the number of bytes written, or fails with ``NoSuchFile`` (the
    peer answered 1) or ``DownloadFailed`` (anything else); on failure nothing
    is left at ``destination`` and the temporary file is gone. ``progress``
    gets ``(received, total or None)`` as bytes arrive, at most every 0.1 s
    and once at the end. ``timeout`` bounds the connection attempt and any
    silence of the peer. Cancelling the Deferred drops the transfer.
    """
    if reactor is None:
        from twisted.internet import reactor
    return _Download(host, port, remote_name, destination, progress, reactor, timeout).start()
