"""End-to-end: ``twistd p2p-indexer --logger ...`` under load while the logger is
killed (SIGKILL), stopped and restarted. Afterwards the audit file holds exactly
one line per request, each user's records in request order."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from p2p import wire
from tests.support import deadline, hold_port, indexer_port, logger_ports, poll_until, spawn_twistd
from tests.test_indexer_e2e import indexer_db

PROGRAM = 0x2ABC0001
DATETIME = "25/11/2026 12:00:00"


class _OneRequest(protocol.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.transport.loseConnection()  # the reply code is all we need

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data[:1])


@defer.inlineCallbacks
def indexer_request(port: int, op: str, user: str, *args: str | int):
    """One classic request; fires with its reply code."""
    creator = protocol.ClientCreator(
        reactor, _OneRequest, wire.encode_request(op, DATETIME, user, *args)
    )
    proto = yield creator.connectTCP("127.0.0.1", port, timeout=5)
    code = yield proto.done.addTimeout(10, reactor)
    return code[0] if code else None


@defer.inlineCallbacks
def user_session(port: int, user: str):
    """REGISTER, CONNECT, PUBLISH: three requests, three audit records; each must answer 0."""
    codes = []
    codes.append((yield indexer_request(port, "REGISTER", user)))
    codes.append((yield indexer_request(port, "CONNECT", user, 5000)))
    codes.append((yield indexer_request(port, "PUBLISH", user, f"{user}.txt", "some file")))
    return codes


def expected_records(user: str) -> list[str]:
    return [
        wire.audit_record(user, "REGISTER", DATETIME),
        wire.audit_record(user, "CONNECT", DATETIME),
        wire.audit_record(user, "PUBLISH", DATETIME, f"{user}.txt"),
    ]


def load(port: int, users: list[str], parallel: int = 4) -> defer.Deferred:
    """Sessions of ``users``, ``parallel`` at a time; fires with every reply code."""
    work = iter(users)
    codes: list[int] = []

    @defer.inlineCallbacks
    def worker():
        for user in work:
            codes.extend((yield user_session(port, user)))

    return defer.gatherResults([worker() for _ in range(parallel)]).addCallback(lambda _: codes)


class IndexerToLoggerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start_logger(self):
        """Start the logger: on ``tcp:0`` the first time, then on the port it printed."""
        proc = spawn_twistd(
            self,
            "p2p-logger",
            "--listen",
            f"tcp:{self.logger_port}:interface=127.0.0.1",
            "--program",
            hex(PROGRAM),
            "--no-rpcbind",
            cwd=self.logger_dir,
        )
        ports = yield logger_ports(proc)
        self.assertIn(self.logger_port, (0, ports["tcp"]))
        self.logger_port = ports["tcp"]
        return proc

    @defer.inlineCallbacks
    def kill_logger(self, logger):
        """SIGKILL the logger; its port stays the test's (refusing) until it restarts."""
        yield logger.kill()
        hold_port(self, self.logger_port)

    def audit(self) -> list[str]:
        path = self.logger_dir / "p2p-audit.log"
        return path.read_text().splitlines() if path.exists() else []

    def outbox_count(self) -> int:
        """Rows waiting in the running indexer's outbox (read beside it: SQLite WAL)."""
        with contextlib.closing(sqlite3.connect(self.indexer_dir / "indexer.db")) as db:
            return db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def wait_audit(self, count: int, timeout: float = 60.0) -> defer.Deferred:
        return poll_until(lambda: len(self.audit()) >= count, timeout, 0.05, f"{count} audit lines")

    def setUp(self):
        self.logger_dir = Path(self.mktemp())
        self.logger_dir.mkdir(parents=True)
        self.logger_port = 0
        self.indexer_dir = Path(self.mktemp())
        self.indexer_dir.mkdir(parents=True)
        self.indexer_port = 0

    @defer.inlineCallbacks
    def start_indexer(self):
        indexer = spawn_twistd(
            self,
            "p2p-indexer",
            "--listen",
            f"tcp:{self.indexer_port}:interface=127.0.0.1",
            "--db",
            indexer_db(self, "indexer.db"),
            "--logger",
            f"tcp:host=127.0.0.1:port={self.logger_port}",
            "--logger-program",
            hex(PROGRAM),
            cwd=self.indexer_dir,
        )
        port = yield indexer_port(indexer)
        self.assertIn(self.indexer_port, (0, port))  # restarted: on the port it had
        self.indexer_port = port
        return indexer

    def assert_exactly_once(self, users: list[str]) -> None:
        expected = [r for user in users for r in expected_records(user)]
        lines = self.audit()
        self.assertEqual(Counter(lines), Counter(expected), "each request exactly once")
        self.assertEqual(len(lines), len(expected))
        for user in users:  # each user's records in request (= outbox) order
            mine = [line for line in lines if line.startswith(user + " ")]
            self.assertEqual(mine, expected_records(user))

    @defer.inlineCallbacks
    def test_logger_killed_and_restarted_under_load(self):
        logger = yield self.start_logger()
        yield self.start_indexer()
        indexer_port = self.indexer_port
        users = [f"user{i:03d}" for i in range(90)]
        codes = []
        # Phase 1: logger up, under load; killed (SIGKILL) in the middle of it.
        running = load(indexer_port, users[:30])
        yield self.wait_audit(10)
        yield self.kill_logger(logger)
        after_kill = self.audit()
        codes += yield running
        # Phase 2: logger down. Replies must not wait for it, and no record
        # reaches the audit file: they wait in the outbox.
        codes += yield deadline(load(indexer_port, users[30:60]))
        self.assertEqual(self.audit(), after_kill)
        self.assertGreaterEqual(self.outbox_count(), 3 * 30)
        # Phase 3: logger back; stopped cleanly and started again under load.
        logger = yield self.start_logger()
        running = load(indexer_port, users[60:])
        yield self.wait_audit(len(self.audit()) + 5)
        yield logger.stop()
        logger = yield self.start_logger()
        codes += yield running

        self.assertEqual(codes, [0] * (3 * len(users)))
        yield self.wait_audit(3 * len(users))
        self.assert_exactly_once(users)

    @defer.inlineCallbacks
    def test_indexer_killed_while_delivering(self):
        """The indexer SIGKILLed while its relay delivers a backlog: rows the logger
        acknowledged but the indexer had not yet deleted are sent again after the
        restart, and the logger does not store them twice."""
        self.logger_port = hold_port(self)  # the logger's address; down for now
        indexer = yield self.start_indexer()
        users = [f"late{i:03d}" for i in range(100)]
        codes = yield load(self.indexer_port, users)  # logger down: all in the outbox
        self.assertEqual(codes, [0] * (3 * len(users)))
        yield self.start_logger()
        yield self.wait_audit(1)
        yield indexer.kill()
        delivered_before_kill = len(self.audit())
        yield self.start_indexer()
        yield self.wait_audit(3 * len(users))
        self.assert_exactly_once(users)
        self.assertGreater(delivered_before_kill, 0)
