"""The indexer's audit relay against in-process loggers on 127.0.0.1.

Order, exactly-once, the logger down then up (the relay retrying with backoff),
and the logger "killed" after storing a record but before its reply (the
connection cut, the audit files reopened as a restarted logger would). The
records come from a real directory writing into a real in-memory store.
"""

from __future__ import annotations

from twisted.internet import defer, error, reactor, task
from twisted.trial import unittest

from p2p import wire
from p2p.indexer.directory import Directory
from p2p.indexer.relay import OutboxRelay, make_endpoint, make_relay
from p2p.indexer.store import Store
from p2p.logger.audit import AuditLog
from p2p.logger.program import LoggerProgram
from p2p.oncrpc.server import Dispatcher, RpcStreamFactory, RpcStreamProtocol
from tests.support import hold_port, poll_until

PROG = wire.LOGGER_PROGRAM
DATETIME = "01/01/2026 10:00:00"


class Outbox:
    """The relay's real source: a directory auditing into a ``Store(":memory:")`` outbox."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.store = Store(":memory:")
        self.store.open()
        testcase.addCleanup(self.store.close)
        self.directory = Directory(self.store, audit=True)
        self.directory.load()

    def add(self, start: int, stop: int) -> None:
        """PUBLISH requests of ``user<start>`` .. ``user<stop - 1>``, one group commit.

        None of these users is registered: each request is refused, and
        audited all the same (one outbox row each, ``records(start, stop)``).
        """
        for i in range(start, stop):
            self.directory.handle(wire.PUBLISH, DATETIME, f"user{i}", [f"file{i}", "a file"])
        self.store.commit()

    def wait_empty(self) -> defer.Deferred:
        return poll_until(lambda: self.store.outbox_count() == 0, what="an empty outbox")


class AttemptsEndpoint:
    """A client endpoint that notes when (on ``clock``) each connection attempt
    starts, and counts the attempts refused."""

    def __init__(self, wrapped, clock) -> None:
        self.wrapped = wrapped
        self.clock = clock
        self.attempts: list[float] = []
        self.refused = 0

    def connect(self, factory) -> defer.Deferred:
        self.attempts.append(self.clock.seconds())

        def refused(failure):
            failure.trap(error.ConnectionRefusedError)
            self.refused += 1
            return failure

        return self.wrapped.connect(factory).addErrback(refused)


class KillingProtocol(RpcStreamProtocol):
    """Stores the calls it receives, but dies (cuts the connection) before
    replying to the XIDs in ``factory.kill_after``, like a logger killed there."""

    def dataReceived(self, data: bytes) -> None:
        for record in self.reader.feed(data):
            xid = int.from_bytes(record[:4], "big")
            d = self.dispatcher.handle(record, None)
            if xid in self.factory.kill_after:
                self.factory.kill_after.discard(xid)
                self.factory.killed.append(xid)
                self.connected_ = False
                self.transport.abortConnection()
                return
            d.addCallback(self._reply)


class KillingFactory(RpcStreamFactory):
    def __init__(self, dispatcher, max_record, kill_after=()):
        super().__init__(dispatcher, max_record)
        self.kill_after = set(kill_after)
        self.killed: list[int] = []

    def buildProtocol(self, addr):
        proto = KillingProtocol(self.dispatcher, self.max_record)
        proto.factory = self
        return proto


class Logger:
    """An in-process logger whose files outlive its 'process' (start/stop)."""

    def __init__(self, testcase: unittest.TestCase, port: int) -> None:
        self.path = testcase.mktemp()
        self.port = port
        self.listening = None
        self.audit: AuditLog | None = None
        testcase.addCleanup(self.stop)

    def start(self, kill_after=()) -> KillingFactory:
        self.audit = AuditLog(self.path, echo=False)
        self.audit.open()
        dispatcher = Dispatcher([LoggerProgram(self.audit, PROG).program()])
        factory = KillingFactory(dispatcher, 8192, kill_after)
        self.listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        return factory

    @defer.inlineCallbacks
    def stop(self):
        if self.listening is not None:
            listening, self.listening = self.listening, None
            yield listening.stopListening()
        if self.audit is not None:
            self.audit.close()
            self.audit = None

    def lines(self) -> list[str]:
        with open(self.path) as f:
            return f.read().splitlines()


def relay_for(testcase, store, port: int, **kwargs) -> OutboxRelay:
    endpoint = make_endpoint(reactor, f"tcp:host=127.0.0.1:port={port}", None, PROG)
    relay = OutboxRelay(store, endpoint, PROG, reactor, **kwargs)
    relay.startService()
    testcase.addCleanup(relay.stopService)
    return relay


def records(start: int, stop: int) -> list[str]:
    """The audit lines of ``Outbox.add(start, stop)``."""
    return [
        wire.audit_record(f"user{i}", "PUBLISH", DATETIME, f"file{i}") for i in range(start, stop)
    ]


class RelayTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_in_order_exactly_once(self):
        logger = Logger(self, 0)
        logger.start()
        outbox = Outbox(self)
        outbox.add(0, 150)
        relay = relay_for(self, outbox.store, logger.port, window=8)
        outbox.add(150, 300)
        yield outbox.wait_empty()
        self.assertEqual(logger.lines(), records(0, 300))
        self.assertEqual(relay.delivered, 300)

    @defer.inlineCallbacks
    def test_logger_down_then_up(self):
        """Refused, the relay tries again and again, each time after a longer
        (jittered) delay on its clock, up to ``max_delay``; once the logger
        listens, everything arrives, in order."""
        clock = task.Clock()
        port = hold_port(self)  # refuses connections until the logger listens there
        outbox = Outbox(self)
        endpoint = AttemptsEndpoint(
            make_endpoint(reactor, f"tcp:host=127.0.0.1:port={port}", None, PROG), clock
        )
        relay = OutboxRelay(outbox.store, endpoint, PROG, clock, initial_delay=1.0, max_delay=4.0)
        relay.startService()
        self.addCleanup(relay.stopService)
        outbox.add(0, 50)
        for attempt in range(1, 7):
            yield poll_until(lambda n=attempt: endpoint.refused == n, what=f"refusal {attempt}")
            self.assertEqual(len(endpoint.attempts), attempt)
            (retry,) = clock.getDelayedCalls()  # the reconnection, nothing else
            delay = retry.getTime() - clock.seconds()
            floor = min(1.0 * 1.5**attempt, 4.0)  # backoffPolicy, plus a jitter below 1 s
            self.assertTrue(floor <= delay < floor + 1, (attempt, delay))
            if attempt < 6:
                clock.advance(delay)
        self.assertEqual(relay.delivered, 0)
        self.assertEqual(outbox.store.outbox_count(), 50)
        # The logger comes up on that address: the next attempt delivers everything.
        logger = Logger(self, port)
        logger.start()
        outbox.add(50, 100)
        clock.advance(delay)
        self.assertEqual(len(endpoint.attempts), 7)
        yield poll_until(lambda: relay.delivered == 100, what="100 records delivered")
        clock.advance(0)  # the relay deletes the acknowledged rows on its next turn
        self.assertEqual(outbox.store.outbox_count(), 0)
        self.assertEqual(endpoint.refused, 6)
        self.assertEqual(logger.lines(), records(0, 100))

    @defer.inlineCallbacks
    def test_logger_killed_between_storing_and_replying(self):
        logger = Logger(self, 0)
        outbox = Outbox(self)
        outbox.add(0, 40)
        factory = logger.start(kill_after={10, 25})
        relay_for(self, outbox.store, logger.port, window=4, initial_delay=0.05, max_delay=0.2)
        yield outbox.wait_empty()
        self.assertEqual(sorted(factory.killed), [10, 25])
        self.assertEqual(logger.lines(), records(0, 40))

    @defer.inlineCallbacks
    def test_logger_restarted_after_kill(self):
        """Killed after storing; restarted from its files; no duplicate, no loss."""
        logger = Logger(self, 0)
        outbox = Outbox(self)
        outbox.add(0, 20)
        factory = logger.start(kill_after={7})
        relay = relay_for(
            self, outbox.store, logger.port, window=4, initial_delay=0.05, max_delay=0.2
        )
        yield poll_until(lambda: factory.killed, what="the logger killed")
        yield logger.stop()  # the process is gone; its files stay
        self.assertEqual(logger.lines()[-1], records(6, 7)[0])  # stored, never acknowledged
        outbox.add(20, 30)
        logger.start()
        yield outbox.wait_empty()
        self.assertEqual(logger.lines(), records(0, 30))
        self.assertEqual(relay.acked_through, 30)

    @defer.inlineCallbacks
    def test_silent_logger_is_dropped_and_retried(self):
        """A logger that accepts but never answers only delays delivery."""
        logger = Logger(self, 0)
        outbox = Outbox(self)
        outbox.add(0, 5)
        factory = logger.start()
        silent = []

        def build(addr):  # first connection: swallow everything
            proto = RpcStreamProtocol(factory.dispatcher, 8192)
            if not silent:
                silent.append(proto)
                proto.dataReceived = lambda data: None
            return proto

        factory.buildProtocol = build
        relay_for(self, outbox.store, logger.port, reply_timeout=0.3, initial_delay=0.05)
        yield outbox.wait_empty()
        self.assertEqual(len(silent), 1)
        self.assertEqual(logger.lines(), records(0, 5))

    @defer.inlineCallbacks
    def test_logger_refusing_then_accepting(self):
        """-1 (the logger cannot write) only delays: the relay backs off and resends."""
        logger = Logger(self, 0)
        outbox = Outbox(self)
        outbox.add(0, 10)
        logger.start()
        real_store = logger.audit.store
        failures = []

        def flaky(record, sender=None, seq=None):
            if seq == 4 and len(failures) < 2:
                failures.append(seq)
                raise OSError(28, "No space left on device")
            return real_store(record, sender, seq)

        logger.audit.store = flaky
        relay = relay_for(self, outbox.store, logger.port, window=4, initial_delay=0.05)
        yield outbox.wait_empty()
        self.assertEqual(failures, [4, 4])
        self.assertEqual(logger.lines(), records(0, 10))
        self.assertEqual(relay._error_delay, 0.0)

    @defer.inlineCallbacks
    def test_store_on_disk_through_make_relay(self):
        """The relay as the indexer builds it, on a store kept in a file."""
        logger = Logger(self, 0)
        logger.start()
        path = self.mktemp()
        store = Store(path)
        store.open()
        self.addCleanup(store.close)
        for text in records(0, 30):
            store.add_outbox(text)
        store.commit()
        relay = make_relay(store, f"tcp:host=127.0.0.1:port={logger.port}", None, PROG, reactor)
        relay.startService()
        self.addCleanup(relay.stopService)
        for text in records(30, 60):
            store.add_outbox(text)
            store.commit()
        yield poll_until(lambda: store.outbox_count() == 0, what="an empty outbox")
        self.assertEqual(store.outbox_count(), 0)
        self.assertEqual(logger.lines(), records(0, 60))
