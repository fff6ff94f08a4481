"""Every use of Twisted's private or internal API, each beside its plain-Twisted fallback.

Nothing else in ``p2p`` may reach below Twisted's public interfaces: a service
that wants a fast path asks this module, which answers with the fast path when
it applies and otherwise with what plain Twisted would do (or tells the caller
to do that itself). The fast paths rely on the socket transports of
``twisted.internet.tcp`` (also the base of UNIX sockets) and on the
``FileDescriptor`` contract between a transport and a pull producer; a Twisted
release that changes them breaks only this module, and the test suite runs
with and without it.

``P2P_PLAIN_TWISTED=1`` in the environment switches every fast path off: the
services then use public Twisted API only (``transport.write`` and
``loseConnection``, ``registerProducer`` with a chunked pull producer). A
comma-separated list of fast path names (``P2P_PLAIN_TWISTED=read_now``)
switches off just those, to measure one at a time; any other value switches
off all. It is read once, at import, so child processes started with it
(twistd, the client) run plain throughout.

Fast paths:

- the indexer reads a request as soon as its connection is accepted
  (:func:`read_now`) and sends its one reply straight on the socket, closing
  at once (:func:`send_last`);
- the peer's file server hands a file to the kernel with ``os.sendfile``
  (:func:`sendfile_socket`, :func:`resume_when_writable`);
- over TLS, it hands OpenSSL a whole chunk of the file at once and sends the
  records that come out in one piece (:func:`tls_bulk_writer`);
- the audit logger sends each RPC reply straight on the socket when nothing
  waits before it (:func:`send_now`), and each UDP reply with one ``sendto``
  (:func:`send_datagram`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from OpenSSL import SSL
from twisted.internet import interfaces, tcp, udp
from twisted.internet.error import ConnectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

#: The names of the fast paths below.
FAST_PATHS = frozenset({"read_now", "send_last", "sendfile", "tls_bulk", "send_now"})


def _enabled(setting: str) -> frozenset[str]:
    """The fast paths left on by a ``P2P_PLAIN_TWISTED`` value."""
    setting = setting.strip()
    if setting in ("", "0"):
        return FAST_PATHS
    off = {name.strip() for name in setting.split(",")}
    return FAST_PATHS - off if off <= FAST_PATHS else frozenset()


#: The fast paths in use (all unless ``P2P_PLAIN_TWISTED`` says otherwise; read once, at import).
ENABLED: frozenset[str] = _enabled(os.environ.get("P2P_PLAIN_TWISTED", ""))


def enabled(name: str) -> bool:
    """Whether the fast path ``name`` is in use in this process."""
    return name in ENABLED


_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: The reason given to a connection closed after its last bytes (shared: it has no traceback).
_DONE = Failure(ConnectionDone("reply sent"))


def read_now(transport: interfaces.ITransport) -> None:
    """Read what a just-accepted TCP connection already holds, instead of one poll later.

    A client sends its request right after connecting, so under load it is
    usually there already. Nothing there (EAGAIN) costs one ``recv``; an EOF
    or error stays readable and the reactor handles it as usual. Plain
    Twisted: nothing to do, the reactor reads it at its next poll.
    """
    if "read_now" in ENABLED and isinstance(transport, tcp.Server):
        transport.doRead()


def send_last(transport: interfaces.ITransport, data: bytes) -> bytes | memoryview | None:
    """Send a connection's last bytes straight on its socket; close it if they all went.

    A fresh connection's send buffer is empty, so a short reply almost always
    fits in one ``send``; the connection is then closed at once instead of
    registering for writability and closing a poll later. ``MSG_MORE`` holds
    the bytes for a moment, so the FIN of that close leaves in the same
    segment. Returns None when the connection is closed, else what is left to
    write the plain way (``transport.write`` then ``loseConnection``): all of
    ``data`` when the fast path does not apply.
    """
    if not (
        "send_last" in ENABLED
        and isinstance(transport, tcp.Server)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        return data
    try:
        sent = transport.socket.send(data, _MSG_MORE)
    except OSError:
        return data  # the transport's own write path sees the error
    if sent == len(data):
        transport.connectionLost(_DONE)
        return None
    return memoryview(data)[sent:] if sent else data


def send_now(transport: interfaces.ITransport, data: bytes) -> None:
    """Write ``data`` on a connection that stays open, sent at once when nothing waits before it.

    ``transport.write`` only buffers: the reactor registers the socket for
    writability, sends one poll later and unregisters it. A client that waits
    for each reply before its next call pays that turn of the reactor on every
    call. On a plain TCP or UNIX transport with an empty buffer the bytes go
    straight to the socket (:func:`_send_or_buffer`); what it does not take,
    or any other transport (TLS, a test's), goes through ``transport.write``,
    so buffering and a registered producer's pause work as usual. Plain
    Twisted: ``transport.write``.
    """
    if "send_now" in ENABLED and not getattr(transport, "TLS", False):
        _send_or_buffer(transport, data)
    else:
        transport.write(data)


def send_datagram(port: interfaces.IUDPTransport, data: bytes, addr: tuple[str, int]) -> None:
    """Send one datagram from an unconnected UDP port to the address one came from.

    ``udp.Port.write`` first checks that the address is an IP address of the
    port's family (parsing it three or four times) before its ``sendto``; an
    address ``recvfrom`` gave is one. Any error goes the plain way, so
    Twisted's handling (a retry on EINTR, MessageLengthError, ...) applies.
    Plain Twisted: ``port.write(data, addr)``.
    """
    if "send_now" in ENABLED and isinstance(port, udp.Port) and port._connectedAddr is None:
        try:
            port.socket.sendto(data, addr)
            return
        except OSError:
            pass
    port.write(data, addr)


def sendfile_socket(transport: interfaces.ITransport) -> socket.socket | None:
    """The connected socket under a plain TCP or UNIX transport, for ``os.sendfile``.

    None when the fast path is off or does not apply (TLS, a wrapped or test
    transport, no ``os.sendfile``): the caller then writes through the
    transport like any producer.
    """
    if "sendfile" not in ENABLED or not hasattr(os, "sendfile"):
        return None
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    return transport.getHandle()


def resume_when_writable(transport: interfaces.ITransport) -> None:
    """Have the transport call its pull producer's ``resumeProducing`` once the socket is writable.

    The producer wrote on the socket itself (past the transport), so the
    transport's buffer is empty; registering for writability makes the
    reactor call the transport's ``doWrite``, which finds nothing to send and
    asks the registered producer for more. Only for a transport that
    :func:`sendfile_socket` accepted.
    """
    transport.startWriting()


def _whole_writes(connection: SSL.Connection) -> None:
    """Let one ``SSL_write`` on ``connection`` write every record of its data (Twisted's own
    writes loop over what ``send`` returns, so they work either way)."""
    lib = getattr(SSL, "_lib", None)
    clear = getattr(lib, "SSL_clear_mode", None)
    handle = getattr(connection, "_ssl", None)
    if clear is not None and handle is not None:
        clear(handle, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


#: TLS 1.3 bytes around each record (header, content type, AEAD tag), rounded up.
_RECORD_OVERHEAD = 64
_RECORD = 16 * 1024


def tls_bulk_writer(transport: interfaces.ITransport) -> Callable[[bytes], None] | None:
    """A ``write`` for large pieces of data on a TLS transport, or None (use ``transport.write``).

    Twisted's ``TLSMemoryBIOProtocol`` hands OpenSSL 16 KiB at a time and moves
    each record from the memory BIO to the socket transport on its own: a dozen
    Python calls per 16 KiB, which caps a file transfer far below what the
    cipher does. A memory BIO never blocks, so one ``SSL_write`` takes the
    whole piece (OpenSSL cuts the records: pyOpenSSL's partial-write mode,
    which would make it stop after each record, is cleared on this connection
    through pyOpenSSL's private binding when it has one; else a loop does it)
    and one ``bio_read`` takes them all out, sent straight on the socket when
    nothing waits before them (:func:`_send_or_buffer`). Any state but the
    plain one (handshake not done, writes waiting for the handshake, the
    connection closing or lost) goes the plain way, as do OpenSSL's errors
    (handled as Twisted handles them). Plain Twisted: None.
    """
    if "tls_bulk" not in ENABLED or not isinstance(transport, TLSMemoryBIOProtocol):
        return None
    _whole_writes(transport._tlsConnection)

    def write(data: bytes) -> None:
        aggregator = getattr(transport, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()  # small writes made before (a reply header) go first
        if (
            transport._lostTLSConnection
            or transport._appSendBuffer
            or not transport._handshakeDone
            or transport.disconnecting
        ):
            transport.write(data)
            return
        connection = transport._tlsConnection
        view = memoryview(data)
        sent = 0
        while sent < len(data):  # once, unless the partial-write mode could not be cleared
            try:
                sent += connection.send(view[sent:])
            except SSL.WantReadError:
                transport._bufferedWrite(bytes(view[sent:]))  # as Twisted's own write does
                break
            except SSL.Error:
                transport._tlsShutdownFinished(Failure())
                return
        room = len(data) + (len(data) // _RECORD + 1) * _RECORD_OVERHEAD
        while True:
            try:
                records = connection.bio_read(room)
            except SSL.WantReadError:
                return
            _send_or_buffer(transport.transport, records)

    return write


def _send_or_buffer(transport: interfaces.ITransport, data: bytes) -> None:
    """Send ``data`` straight on the socket when nothing waits before it, else buffer it.

    When the socket takes it all (as a loopback or a fast link does), the
    transport never holds it, so it never pauses the producer that wrote it:
    the next chunk follows in the same turn of the reactor, not a poll later.
    What the socket does not take is written the plain way (buffered, and the
    producer paused until it has gone).
    """
    if (
        isinstance(transport, tcp.Connection)
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # full (EAGAIN) or broken: the transport's own write path sees to it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
