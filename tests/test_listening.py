"""p2p.listening: the one way a p2p server listens, caps its connections and checks its options."""

from __future__ import annotations

import math

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
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


def tcp(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class PerSource(TestCase):
    """``max_per_source``: one address holds at most its share of the slots."""

    def capped(self, limit: int, per_source: int, known=None) -> Capped:
        factory = Capped(limit)
        factory.max_per_source = per_source
        factory.known = known
        return factory

    def test_one_source_is_refused_beyond_its_share_others_are_not(self) -> None:
        factory = self.capped(10, 3)
        for port in range(3):
            self.assertIsNotNone(factory.buildProtocol(tcp("127.0.0.2", port)))
        self.assertIsNone(factory.buildProtocol(tcp("127.0.0.2", 99)))
        self.assertIsNotNone(factory.buildProtocol(tcp("127.0.0.1")))
        self.assertEqual((factory.open_connections, factory.refused_connections), (4, 1))

    def test_counted_by_host_not_port_ipv6_too(self) -> None:
        factory = self.capped(10, 1)
        self.assertTrue(factory.admit(IPv6Address("TCP", "::1", 1)))
        self.assertFalse(factory.admit(IPv6Address("TCP", "::1", 2)))
        self.assertTrue(factory.admit(IPv6Address("TCP", "::2", 1)))

    def test_unix_sockets_are_one_source(self) -> None:
        factory = self.capped(10, 2)
        self.assertTrue(factory.admit(UNIXAddress(b"/run/a")))
        self.assertTrue(factory.admit(UNIXAddress(None)))
        self.assertFalse(factory.admit(UNIXAddress(b"/run/b")))
        self.assertEqual(listening.source_of(UNIXAddress(None)), "local")

    def test_a_closed_connection_gives_its_source_a_slot_back(self) -> None:
        factory = self.capped(10, 2)
        a, b = tcp("10.0.0.1", 1), tcp("10.0.0.1", 2)
        self.assertTrue(factory.admit(a))
        self.assertTrue(factory.admit(b))
        self.assertFalse(factory.admit(tcp("10.0.0.1", 3)))
        factory.connection_closed(a)
        self.assertTrue(factory.admit(tcp("10.0.0.1", 3)))
        factory.connection_closed(b)
        factory.connection_closed(tcp("10.0.0.1", 3))
        self.assertEqual((factory.open_connections, factory._held), (0, {}))

    def test_the_total_cap_still_holds_across_sources(self) -> None:
        factory = self.capped(4, 2)
        for host in ("10.0.0.1", "10.0.0.2"):
            for port in (1, 2):
                self.assertTrue(factory.admit(tcp(host, port)))
        self.assertFalse(factory.admit(tcp("10.0.0.3")))
        self.assertEqual(factory.open_connections, 4)

    def test_warns_once_per_source_until_it_holds_none(self) -> None:
        factory = self.capped(100, 1)
        with capturedLogs() as events:
            factory.admit(tcp("10.0.0.1"))
            for _ in range(5):
                factory.admit(tcp("10.0.0.1"))
            factory.admit(tcp("10.0.0.2"))
            factory.admit(tcp("10.0.0.2"))
            factory.connection_closed(tcp("10.0.0.1"))
            factory.admit(tcp("10.0.0.1"))
            factory.admit(tcp("10.0.0.1"))
        warnings = [e["source"] for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(warnings, ["10.0.0.1", "10.0.0.2", "10.0.0.1"])

    def test_without_max_per_source_sources_are_not_counted(self) -> None:
        factory = Capped(3)
        for port in range(3):
            self.assertTrue(factory.admit(tcp("10.0.0.1", port)))
        self.assertIsNone(factory._held)


class Known(TestCase):
    """A source that proved itself keeps one connection at the total cap."""

    def full(self, known: listening.KnownSources) -> Capped:
        factory = Capped(4)
        factory.max_per_source = 2
        factory.known = known
        for host in ("10.0.0.1", "10.0.0.2"):
            for port in (1, 2):
                self.assertTrue(factory.admit(tcp(host, port)))
        return factory

    def test_a_known_source_gets_one_slot_beyond_the_cap(self) -> None:
        known = listening.KnownSources()
        known.vouch(tcp("127.0.0.1", 5))
        factory = self.full(known)
        self.assertFalse(factory.admit(tcp("10.0.0.3")))  # unknown: refused
        self.assertTrue(factory.admit(tcp("127.0.0.1", 6)))  # known, holding none
        self.assertFalse(factory.admit(tcp("127.0.0.1", 7)))  # one only
        factory.connection_closed(tcp("127.0.0.1", 6))
        self.assertTrue(factory.admit(tcp("127.0.0.1", 8)))  # again after it closed

    def test_a_known_source_holding_a_slot_gets_no_more_at_the_cap(self) -> None:
        known = listening.KnownSources()
        known.vouch(tcp("10.0.0.1"))
        factory = self.full(known)
        self.assertFalse(factory.admit(tcp("10.0.0.1", 3)))

    def test_beyond_the_cap_at_most_the_set_size(self) -> None:
        known = listening.KnownSources(size=2)
        for host in ("127.0.0.1", "127.0.0.3", "127.0.0.4"):
            known.vouch(tcp(host))
        self.assertNotIn("127.0.0.1", known)  # the oldest is forgotten first
        factory = self.full(known)
        self.assertFalse(factory.admit(tcp("127.0.0.1")))
        self.assertTrue(factory.admit(tcp("127.0.0.3")))
        self.assertTrue(factory.admit(tcp("127.0.0.4")))
        known.vouch(tcp("127.0.0.5"))
        self.assertFalse(factory.admit(tcp("127.0.0.5")))  # 4 + 2 open: the bound
        self.assertEqual(factory.open_connections, 6)

    def test_vouching_again_keeps_a_source(self) -> None:
        known = listening.KnownSources(size=2)
        known.vouch(tcp("127.0.0.1"))
        known.vouch(tcp("127.0.0.2"))
        known.vouch(tcp("127.0.0.1", 2))
        known.vouch(tcp("127.0.0.3"))
        self.assertIn("127.0.0.1", known)
        self.assertNotIn("127.0.0.2", known)


class WrappingPerSource(TestCase):
    def test_wrapper_counts_each_source_and_gives_back_its_slot(self) -> None:
        factory = CappedWrappingFactory(protocol.Factory.forProtocol(protocol.Protocol), 10, 1)
        first = factory.buildProtocol(tcp("10.0.0.1"))
        first.makeConnection(StringTransport())
        self.assertIsNone(factory.buildProtocol(tcp("10.0.0.1", 2)))
        self.assertIsNotNone(factory.buildProtocol(tcp("10.0.0.2")))
        first.connectionLost(protocol.connectionDone)
        self.assertIsNotNone(factory.buildProtocol(tcp("10.0.0.1", 3)))
