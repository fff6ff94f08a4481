"""p2p.twisted_internals: each fast path applies only where it may, and the switch turns all off."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from p2p import twisted_internals
from tests.support import deadline


class Recorder(protocol.Protocol):
    """Server side: notes what it received and how it ended."""

    def __init__(self) -> None:
        self.received = b""
        self.made: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(reason.value)  # the exception: a Failure would errback


class PlainTransports(TestCase):
    """Transports that are not Twisted's socket transports: nothing fast, data untouched."""

    def test_read_now_does_nothing(self) -> None:
        transport = StringTransport()
        twisted_internals.read_now(transport)
        self.assertEqual(transport.value(), b"")

    def test_send_last_gives_everything_back(self) -> None:
        transport = StringTransport()
        self.assertEqual(twisted_internals.send_last(transport, b"\0reply"), b"\0reply")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_no_sendfile_socket(self) -> None:
        self.assertIsNone(twisted_internals.sendfile_socket(StringTransport()))


class Switch(TestCase):
    """What P2P_PLAIN_TWISTED leaves on."""

    def test_values(self) -> None:
        every = twisted_internals.FAST_PATHS
        self.assertEqual(twisted_internals._enabled(""), every)
        self.assertEqual(twisted_internals._enabled("0"), every)
        self.assertEqual(twisted_internals._enabled("1"), frozenset())
        self.assertEqual(twisted_internals._enabled("yes"), frozenset())
        self.assertEqual(twisted_internals._enabled("read_now"), every - {"read_now"})
        self.assertEqual(
            twisted_internals._enabled("read_now, sendfile"), every - {"read_now", "sendfile"}
        )
        self.assertEqual(twisted_internals._enabled("read_now,typo"), frozenset())

    def test_one_path_off(self) -> None:
        self.patch(twisted_internals, "ENABLED", frozenset({"sendfile"}))
        self.assertTrue(twisted_internals.enabled("sendfile"))
        self.assertFalse(twisted_internals.enabled("send_last"))


class RealSockets(TestCase):
    """A real loopback connection: the fast paths apply, unless switched off."""

    @defer.inlineCallbacks
    def setUp(self):
        self.servers: list[Recorder] = []

        def build():
            proto = Recorder()
            self.servers.append(proto)
            return proto

        factory = protocol.Factory.forProtocol(build)
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def connect(self):
        """A blocking client socket and the server protocol of its connection."""
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(client.close)
        while not self.servers:
            yield deadline(_turn())
        server = self.servers[-1]
        yield deadline(server.made)
        self.addCleanup(lambda: server.transport.abortConnection())
        return client, server

    def switch(self, enabled: bool) -> None:
        on = twisted_internals.FAST_PATHS if enabled else frozenset()
        self.patch(twisted_internals, "ENABLED", on)

    @defer.inlineCallbacks
    def test_read_now_reads_what_is_there(self):
        self.switch(True)
        client, server = yield self.connect()
        client.sendall(b"early")
        # Wait until the bytes are in the server's socket, without letting the reactor read them.
        server.transport.stopReading()
        while not _readable(server.transport.getHandle()):
            yield deadline(_turn())
        twisted_internals.read_now(server.transport)
        self.assertEqual(server.received, b"early")

    @defer.inlineCallbacks
    def test_read_now_switched_off(self):
        self.switch(False)
        client, server = yield self.connect()
        server.transport.stopReading()
        client.sendall(b"early")
        while not _readable(server.transport.getHandle()):
            yield deadline(_turn())
        twisted_internals.read_now(server.transport)
        self.assertEqual(server.received, b"")

    @defer.inlineCallbacks
    def test_send_last_sends_and_closes(self):
        self.switch(True)
        client, server = yield self.connect()
        self.assertIsNone(twisted_internals.send_last(server.transport, b"\0reply"))
        reason = yield deadline(server.lost)
        self.assertIsInstance(reason, ConnectionDone)
        self.assertEqual(_read_all(client), b"\0reply")

    @defer.inlineCallbacks
    def test_send_last_after_buffered_write(self):
        """Bytes already in the transport's buffer go first: the fast path stands aside."""
        self.switch(True)
        client, server = yield self.connect()
        server.transport.write(b"first ")
        self.assertEqual(twisted_internals.send_last(server.transport, b"last"), b"last")
        server.transport.write(b"last")
        server.transport.loseConnection()
        yield deadline(server.lost)
        self.assertEqual(_read_all(client), b"first last")

    @defer.inlineCallbacks
    def test_send_last_switched_off(self):
        self.switch(False)
        _client, server = yield self.connect()
        self.assertEqual(twisted_internals.send_last(server.transport, b"\0"), b"\0")
        self.assertTrue(server.transport.connected)

    @defer.inlineCallbacks
    def test_sendfile_socket(self):
        self.switch(True)
        _client, server = yield self.connect()
        sock = twisted_internals.sendfile_socket(server.transport)
        self.assertIsInstance(sock, socket.socket)
        self.assertEqual(sock.fileno(), server.transport.fileno())

    @defer.inlineCallbacks
    def test_sendfile_socket_switched_off(self):
        self.switch(False)
        _client, server = yield self.connect()
        self.assertIsNone(twisted_internals.sendfile_socket(server.transport))

    @defer.inlineCallbacks
    def test_client_side_transport_too(self):
        """sendfile works on any connected socket transport, not only accepted ones."""
        self.switch(True)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port).connect(
            protocol.Factory.forProtocol(protocol.Protocol)
        )
        self.addCleanup(client.transport.abortConnection)
        self.assertIsNotNone(twisted_internals.sendfile_socket(client.transport))
        # read_now and send_last are for accepted connections only
        self.assertEqual(twisted_internals.send_last(client.transport, b"x"), b"x")


def _turn() -> defer.Deferred:
    """One pass of the reactor."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def _read_all(client: socket.socket) -> bytes:
    client.settimeout(10)
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    return data
