"""The indexer's audit relay against in-process loggers on 127.0.0.1.

Order, exactly-once, the logger down then up, and the logger "killed" after
storing a record but before its reply (the connection cut, the audit files
reopened as a restarted logger would).
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from p2p import wire
from p2p.indexer.relay import OutboxRelay, make_endpoint, make_relay
from p2p.logger.audit import AuditLog
from p2p.logger.program import LoggerProgram
from p2p.oncrpc.server import Dispatcher, RpcStreamFactory, RpcStreamProtocol
from tests.support import deadline, free_port

PROG = wire.LOGGER_PROGRAM


class FakeStore:
    """The outbox API of ``p2p.indexer.store.Store``, in memory."""

    sender_id = "fake-sender-1"

    def __init__(self) -> None:
        self.rows: dict[int, str] = {}
        self.seq = 0
        self.listeners = []
        self._empty_waiters: list[defer.Deferred] = []

    def add(self, *records: str) -> None:
        for record in records:
            self.seq += 1
            self.rows[self.seq] = record
        for listener in self.listeners:
            listener()

    def outbox_pending(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        return [(s, r) for s, r in sorted(self.rows.items()) if s > after_seq][:limit]

    def outbox_delete_through(self, seq: int) -> None:
        for s in [s for s in self.rows if s <= seq]:
            del self.rows[s]
        if not self.rows:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)

    def add_outbox_listener(self, callback) -> None:
        self.listeners.append(callback)

    def wait_empty(self) -> defer.Deferred:
        if not self.rows:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._empty_waiters.append(d)
        return deadline(d)


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
    return [f"user{i} PUBLISH file{i} 01/01/2026 10:00:00" for i in range(start, stop)]


class RelayTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_in_order_exactly_once(self):
        logger = Logger(self, 0)
        logger.start()
        store = FakeStore()
        store.add(*records(0, 150))
        relay = relay_for(self, store, logger.port, window=8)
        store.add(*records(150, 300))
        yield store.wait_empty()
        self.assertEqual(logger.lines(), records(0, 300))
        self.assertEqual(relay.delivered, 300)

    @defer.inlineCallbacks
    def test_logger_down_then_up(self):
        store = FakeStore()
        port = free_port()
        relay = relay_for(self, store, port, initial_delay=0.05, max_delay=0.2)
        store.add(*records(0, 50))
        # Nothing listens: the rows stay in the outbox, the relay keeps retrying.
        yield deadline(_turns(20))
        self.assertEqual(len(store.rows), 50)
        self.assertEqual(relay.delivered, 0)
        logger = Logger(self, port)
        logger.start()
        store.add(*records(50, 100))
        yield store.wait_empty()
        self.assertEqual(logger.lines(), records(0, 100))

    @defer.inlineCallbacks
    def test_logger_killed_between_storing_and_replying(self):
        logger = Logger(self, 0)
        store = FakeStore()
        store.add(*records(0, 40))
        factory = logger.start(kill_after={10, 25})
        relay_for(self, store, logger.port, window=4, initial_delay=0.05, max_delay=0.2)
        yield store.wait_empty()
        self.assertEqual(sorted(factory.killed), [10, 25])
        self.assertEqual(logger.lines(), records(0, 40))

    @defer.inlineCallbacks
    def test_logger_restarted_after_kill(self):
        """Killed after storing; restarted from its files; no duplicate, no loss."""
        logger = Logger(self, 0)
        store = FakeStore()
        store.add(*records(0, 20))
        factory = logger.start(kill_after={7})
        relay = relay_for(self, store, logger.port, window=4, initial_delay=0.05, max_delay=0.2)
        yield wait_until(lambda: factory.killed)
        yield logger.stop()  # the process is gone; its files stay
        self.assertEqual(logger.lines()[-1], records(6, 7)[0])  # stored, never acknowledged
        store.add(*records(20, 30))
        logger.start()
        yield store.wait_empty()
        self.assertEqual(logger.lines(), records(0, 30))
        self.assertEqual(relay.acked_through, 30)

    @defer.inlineCallbacks
    def test_silent_logger_is_dropped_and_retried(self):
        """A logger that accepts but never answers only delays delivery."""
        logger = Logger(self, 0)
        store = FakeStore()
        store.add(*records(0, 5))
        factory = logger.start()
        silent = []

        def build(addr):  # first connection: swallow everything
            proto = RpcStreamProtocol(factory.dispatcher, 8192)
            if not silent:
                silent.append(proto)
                proto.dataReceived = lambda data: None
            return proto

        factory.buildProtocol = build
        relay_for(self, store, logger.port, reply_timeout=0.3, initial_delay=0.05)
        yield store.wait_empty()
        self.assertEqual(len(silent), 1)
        self.assertEqual(logger.lines(), records(0, 5))

    @defer.inlineCallbacks
    def test_logger_refusing_then_accepting(self):
        """-1 (the logger cannot write) only delays: the relay backs off and resends."""
        logger = Logger(self, 0)
        store = FakeStore()
        store.add(*records(0, 10))
        logger.start()
        real_store = logger.audit.store
        failures = []

        def flaky(record, sender=None, seq=None):
            if seq == 4 and len(failures) < 2:
                failures.append(seq)
                raise OSError(28, "No space left on device")
            return real_store(record, sender, seq)

        logger.audit.store = flaky
        relay = relay_for(self, store, logger.port, window=4, initial_delay=0.05)
        yield store.wait_empty()
        self.assertEqual(failures, [4, 4])
        self.assertEqual(logger.lines(), records(0, 10))
        self.assertEqual(relay._error_delay, 0.0)

    @defer.inlineCallbacks
    def test_with_real_store(self):
        from p2p.indexer.store import Store

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
        yield wait_until(lambda: store.outbox_count() == 0)
        self.assertEqual(store.outbox_count(), 0)
        self.assertEqual(logger.lines(), records(0, 60))


@defer.inlineCallbacks
def wait_until(condition, timeout: float = 20.0):
    """Poll ``condition`` every 10 ms until true; fail after ``timeout`` seconds."""
    start = reactor.seconds()
    while not condition():
        if reactor.seconds() - start > timeout:
            raise defer.TimeoutError("condition not reached")
        yield _turns(1)


def _turns(n: int) -> defer.Deferred:
    """Let the reactor run ``n`` short rounds (a bounded wait for background work)."""
    from twisted.internet import task

    d = defer.succeed(None)
    for _ in range(n):
        d.addCallback(lambda _: task.deferLater(reactor, 0.01, lambda: None))
    return d
