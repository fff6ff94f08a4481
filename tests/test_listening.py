"""p2p.listening: the one way a p2p server listens, caps its connections and checks its options."""

from __future__ import annotations

import math

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from p2p import listening
from p2p.listening import (
    CappedWrappingFactory,
    ConnectionCap,
    ListeningService,
    listen,
    positive_float,
    positive_int,
)

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)
TAKEN = CannotListenError("127.0.0.1", 9090, OSError(98, "Address already in use"))


class Coercers(TestCase):
    def test_positive_int(self) -> None:
        self.assertEqual(positive_int("1"), 1)
        self.assertEqual(positive_int("1024"), 1024)
        for bad in ("0", "-3", "x", "1.5"):
            self.assertRaises(ValueError, positive_int, bad)

    def test_positive_float(self) -> None:
        self.assertEqual(positive_float("0.5"), 0.5)
        self.assertEqual(positive_float("3"), 3.0)
        for bad in ("0", "-1", "nan", "x"):
            self.assertRaises(ValueError, positive_float, bad)
        self.assertTrue(math.isinf(positive_float("inf")))


class Listen(TestCase):
    def test_listens_and_fires_with_the_port(self) -> None:
        reactor = MemoryReactor()
        factory = protocol.Factory()
        ports = []
        listen(reactor, "tcp:9090:interface=127.0.0.1", factory).addCallback(ports.append)
        [(port_number, used, _backlog, interface)] = reactor.tcpServers
        self.assertEqual((port_number, interface), (9090, "127.0.0.1"))
        self.assertIs(used, factory)
        self.assertEqual(ports[0].getHost().port, 9090)

    def test_failure_known_at_once_is_raised(self) -> None:
        """The port is taken: the caller (twistd starting a service) gets the exception."""
        reactor = RaisingMemoryReactor(listenException=TAKEN)
        exc = self.assertRaises(CannotListenError, listen, reactor, "tcp:9090", protocol.Factory())
        self.assertIs(exc, TAKEN)
        # nothing left behind as an unhandled error in a Deferred
        self.flushLoggedErrors(CannotListenError)

    def test_endpoint_listening_later(self) -> None:
        """An endpoint that answers later: its outcome arrives in the Deferred."""
        later = LaterEndpoint()
        self.patch(listening, "serverFromString", lambda reactor, description: later)
        outcome = []
        listen(MemoryReactor(), "later:", protocol.Factory()).addBoth(outcome.append)
        self.assertEqual(outcome, [])
        later.d.errback(TAKEN)
        self.assertIs(outcome[0].value, TAKEN)


@implementer(IStreamServerEndpoint)
class LaterEndpoint:
    """A server endpoint whose listen() answers only when the test says."""

    def __init__(self) -> None:
        self.d: defer.Deferred = defer.Deferred()
        self.factories: list = []

    def listen(self, factory):
        self.factories.append(factory)
        return self.d


class Says(ListeningService):
    """Records what the service says."""

    label = "test service"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heard: list = []

    def listening(self, port) -> None:
        self.heard.append(("listening", port.getHost().port))


class Service(TestCase):
    def setUp(self) -> None:
        self.lines: list[str] = []
        self.patch(listening, "say", self.lines.append)

    def later_service(self) -> tuple[LaterEndpoint, MemoryReactor, Says]:
        """A service on an endpoint that answers when the test says."""
        later = LaterEndpoint()
        self.patch(listening, "serverFromString", lambda reactor, description: later)
        reactor = MemoryReactor()
        return later, reactor, Says("later:", protocol.Factory(), reactor)

    def test_privileged_start_listens_once(self) -> None:
        reactor = MemoryReactor()
        service = Says("tcp:9090", protocol.Factory(), reactor)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertEqual(service.heard, [("listening", 9090)])
        self.assertEqual(service.port.getHost().port, 9090)

    def test_start_without_privileged_start_listens(self) -> None:
        reactor = MemoryReactor()
        service = Says("tcp:9090", protocol.Factory(), reactor)
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertTrue(service.running)

    def test_stop_stops_listening(self) -> None:
        reactor = MemoryReactor()
        service = Says("tcp:9090", protocol.Factory(), reactor)
        service.startService()
        stopped = []
        port = service.port
        self.patch(port, "stopListening", lambda: stopped.append(True))
        d = service.stopService()
        self.assertEqual(stopped, [True])
        self.assertIsNone(service.port)
        self.assertIsInstance(d, defer.Deferred)
        # started again, it listens again
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 2)

    def test_port_taken_says_why_and_raises(self) -> None:
        service = Says("tcp:9090", protocol.Factory(), RaisingMemoryReactor(TAKEN))
        self.assertRaises(CannotListenError, service.privilegedStartService)
        self.flushLoggedErrors(CannotListenError)
        [line] = self.lines
        self.assertTrue(line.startswith("s> test service cannot listen on tcp:9090: "), line)
        self.assertIn("Address already in use", line)
        self.assertEqual(service.heard, [])
        self.assertIsNone(service.port)

    def test_failing_later_stops_the_reactor(self) -> None:
        later, reactor, service = self.later_service()
        service.privilegedStartService()
        self.assertEqual(self.lines, [])
        with capturedLogs() as events:
            later.d.errback(TAKEN)
        self.flushLoggedErrors(CannotListenError)
        [line] = self.lines
        self.assertTrue(line.startswith("s> test service cannot listen on later:: "), line)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.critical])
        # the stop waits for the reactor to run
        self.assertEqual(reactor.whenRunningHooks, [(reactor.stop, (), {})])

    def test_stopped_before_the_endpoint_answered(self) -> None:
        """The pending listen is cancelled: no port, no error, the reactor is left alone."""
        later, reactor, service = self.later_service()
        service.startService()
        service.stopService()
        self.assertTrue(later.d.called)
        self.assertEqual((service.heard, self.lines, service.port), ([], [], None))
        self.assertEqual(reactor.whenRunningHooks, [])  # nobody asked it to stop

    def test_listening_later(self) -> None:
        later, _reactor, service = self.later_service()
        service.privilegedStartService()
        self.assertIsNone(service.port)
        later.d.callback(MemoryReactor().listenTCP(5555, protocol.Factory()))
        self.assertEqual(service.heard, [("listening", 5555)])


class Capped(ConnectionCap, protocol.Factory):
    protocol = protocol.Protocol

    def __init__(self, limit: int) -> None:
        self.max_connections = limit

    def buildProtocol(self, addr):
        return super().buildProtocol(addr) if self.admit(addr) else None


class Cap(TestCase):
    def test_counts_and_refuses_beyond_the_cap(self) -> None:
        factory = Capped(2)
        self.assertIsNotNone(factory.buildProtocol(ADDR))
        self.assertIsNotNone(factory.buildProtocol(ADDR))
        self.assertIsNone(factory.buildProtocol(ADDR))
        self.assertIsNone(factory.buildProtocol(ADDR))
        self.assertEqual((factory.open_connections, factory.refused_connections), (2, 2))
        factory.connection_closed()
        self.assertIsNotNone(factory.buildProtocol(ADDR))
        self.assertEqual(factory.open_connections, 2)

    def test_factories_count_apart(self) -> None:
        one, two = Capped(1), Capped(1)
        self.assertIsNotNone(one.buildProtocol(ADDR))
        self.assertIsNotNone(two.buildProtocol(ADDR))
        self.assertIsNone(one.buildProtocol(ADDR))

    def test_warns_once_per_spell_at_the_cap(self) -> None:
        factory = Capped(1)
        factory.buildProtocol(ADDR)
        with capturedLogs() as events:
            for _ in range(5):
                factory.buildProtocol(ADDR)
            factory.connection_closed()
            factory.buildProtocol(ADDR)  # admitted: the spell is over
            factory.buildProtocol(ADDR)  # refused again: a new warning
        warnings = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(factory.refused_connections, 6)


class Wrapping(TestCase):
    def test_cap_in_front_of_a_foreign_factory(self) -> None:
        """The wrapped protocols do not report their end; the wrapper does."""
        built = []

        class Inner(protocol.Protocol):
            def connectionMade(self) -> None:
                built.append(self)

        factory = CappedWrappingFactory(protocol.Factory.forProtocol(Inner), 2)
        first = factory.buildProtocol(ADDR)
        first.makeConnection(StringTransport())
        second = factory.buildProtocol(ADDR)
        second.makeConnection(StringTransport())
        self.assertIsNone(factory.buildProtocol(ADDR))
        self.assertEqual(len(built), 2)
        first.connectionLost(protocol.connectionDone)
        third = factory.buildProtocol(ADDR)
        self.assertIsNotNone(third)
        third.makeConnection(StringTransport())
        self.assertEqual(len(built), 3)
        self.assertEqual(factory.open_connections, 2)
