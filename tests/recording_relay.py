"""A TCP relay that records every byte it forwards, both ways: what a listener on the path sees."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase


class _Server(portforward.ProxyServer):
    """Client -> relay: recorded, then forwarded."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.captured.extend(data)
        super().dataReceived(data)


class _Client(portforward.ProxyClient):
    """Server -> relay: recorded (in the buffer of the relay its peer belongs to), forwarded."""

    def dataReceived(self, data: bytes) -> None:
        self.peer.factory.captured.extend(data)
        super().dataReceived(data)


class _ClientFactory(portforward.ProxyClientFactory):
    protocol = _Client


_Server.clientProtocolFactory = _ClientFactory


class RecordingRelay(portforward.ProxyFactory):
    """Listens on 127.0.0.1 (a free port: :attr:`port`) and forwards to ``host:port``.

    Every byte in either direction is appended to :attr:`captured`.
    """

    protocol = _Server
    noisy = False

    def __init__(self, testcase: TestCase, host: str, port: int) -> None:
        super().__init__(host, port)
        self.captured = bytearray()
        listening = reactor.listenTCP(0, self, interface="127.0.0.1")
        testcase.addCleanup(listening.stopListening)
        self.listening_port: int = listening.getHost().port
