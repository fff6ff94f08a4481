"""End-to-end: each service's ``/metrics`` counts the requests just sent to it.

Real twistd processes on 127.0.0.1, every port the kernel's choice (read from
the ``s> ...`` lines they print); ``/metrics`` read over HTTP and parsed as
Prometheus text.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from p2p import wire
from p2p.oncrpc import rpc
from p2p.oncrpc.client import RpcClientProtocol
from tests.support import (
    DEADLINE,
    deadline,
    exchange,
    indexer_port,
    logger_ports,
    spawn_twistd,
    time_url,
)
from tests.test_indexer_e2e import indexer_db
from tests.test_metrics import samples
from tests.test_stack import logger_listen

LOOPBACK = "tcp:0:interface=127.0.0.1"


def metrics_url(proc) -> defer.Deferred:
    """Fire with the URL a service says it serves its metrics at (``s> metrics URL``)."""
    d = proc.wait_for_line(r"s> metrics (http://\S+/metrics)$")
    return d.addCallback(lambda match: match.group(1))


@defer.inlineCallbacks
def scrape(url: str):
    """``/metrics`` at ``url``, parsed: ``{(name, sorted labels): value}``."""
    response = yield deadline(Agent(reactor).request(b"GET", url.encode("ascii")))
    body = yield readBody(response)
    if response.code != 200:
        raise AssertionError(f"{url}: {response.code} {body!r}")
    return samples(body.decode("utf-8"))


def request(op: str, user: str, *args: str) -> bytes:
    """A classic indexer request: NUL-terminated fields."""
    return b"".join(f"{field}\0".encode() for field in (op, "27/11/2026 12:00:00", user, *args))


def listening_ports(pid: int) -> int:
    """How many TCP sockets process ``pid`` has listening (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                count += 1
    return count


class IndexerMetricsTests(TestCase):
    @defer.inlineCallbacks
    def test_counts_requests_by_op_and_code(self):
        db = indexer_db(self, ":memory:")
        proc = spawn_twistd(
            self, "p2p-indexer", f"--listen={LOOPBACK}", f"--db={db}", f"--metrics={LOOPBACK}"
        )
        port = yield indexer_port(proc)
        url = yield metrics_url(proc)
        replies = []
        for data in (
            request("REGISTER", "alice"),
            request("REGISTER", "alice"),
            *[request("LIST_USERS", "nobody")] * 3,
            b"NOT_AN_OP\0",
        ):
            replies.append((yield exchange(port, data)))
        self.assertEqual(replies, [b"\x00", b"\x01", b"\x01", b"\x01", b"\x01", b""])
        got = yield scrape(url)
        requests = "p2p_indexer_requests_total"
        self.assertEqual(got[(requests, (("code", "0"), ("op", "REGISTER")))], 1)
        self.assertEqual(got[(requests, (("code", "1"), ("op", "REGISTER")))], 1)
        self.assertEqual(got[(requests, (("code", "1"), ("op", "LIST_USERS")))], 3)
        self.assertEqual(got[(requests, (("code", "none"), ("op", "unknown")))], 1)
        latency = "p2p_indexer_request_duration_seconds_count"
        self.assertEqual(got[(latency, (("op", "REGISTER"),))], 2)
        self.assertEqual(got[(latency, (("op", "LIST_USERS"),))], 3)
        self.assertEqual(got[("p2p_indexer_connected_users", ())], 0)
        self.assertIn(("p2p_indexer_open_connections", ()), got)
        self.assertIn(("process_cpu_seconds_total", ()), got)

    @defer.inlineCallbacks
    def test_connected_users_gauge_follows_connect_and_disconnect(self):
        """The gauge counts CONNECT without DISCONNECT (on PostgreSQL, the cluster's
        users, counted at the node's next leadership tick: read until it says so)."""
        db = indexer_db(self, ":memory:")
        proc = spawn_twistd(
            self, "p2p-indexer", f"--listen={LOOPBACK}", f"--db={db}", f"--metrics={LOOPBACK}"
        )
        port = yield indexer_port(proc)
        url = yield metrics_url(proc)
        gauge = ("p2p_indexer_connected_users", ())
        for data in (
            request("REGISTER", "alice"),
            request("REGISTER", "bob"),
            request("CONNECT", "alice", "7000"),
            request("CONNECT", "bob", "7001"),
        ):
            self.assertEqual((yield exchange(port, data)), b"\x00")
        yield self.until_gauge(url, gauge, 2)
        self.assertEqual((yield exchange(port, request("DISCONNECT", "alice"))), b"\x00")
        yield self.until_gauge(url, gauge, 1)

    @defer.inlineCallbacks
    def until_gauge(self, url: str, gauge: tuple, value: float):
        """Scrape ``url`` until ``gauge`` reads ``value``."""
        start = reactor.seconds()
        while True:
            got = yield scrape(url)
            if got[gauge] == value:
                return
            if reactor.seconds() - start > DEADLINE:
                self.fail(f"{gauge[0]} is {got[gauge]}, not {value}, after {DEADLINE}s")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_off_by_default(self):
        db = indexer_db(self, ":memory:")
        proc = spawn_twistd(self, "p2p-indexer", f"--listen={LOOPBACK}", f"--db={db}")
        yield indexer_port(proc)
        self.assertEqual(listening_ports(proc.transport.pid), 1)
        self.assertFalse([line for line in proc.lines if "metrics" in line])


class TimeMetricsTests(TestCase):
    @defer.inlineCallbacks
    def test_counts_requests_by_method_and_status(self):
        proc = spawn_twistd(self, "p2p-time", f"--listen={LOOPBACK}", f"--metrics={LOOPBACK}")
        wsdl = yield time_url(proc)
        url = yield metrics_url(proc)
        agent = Agent(reactor)
        for _ in range(3):
            response = yield deadline(agent.request(b"GET", wsdl.encode("ascii")))
            yield readBody(response)
            self.assertEqual(response.code, 200)
        got = yield scrape(url)
        self.assertEqual(got[("p2p_time_requests_total", (("code", "200"), ("method", "GET")))], 3)
        self.assertEqual(got[("p2p_time_request_duration_seconds_count", (("method", "GET"),))], 3)
        self.assertIn(("p2p_time_open_connections", ()), got)

    @defer.inlineCallbacks
    def test_off_by_default(self):
        proc = spawn_twistd(self, "p2p-time", f"--listen={LOOPBACK}")
        yield time_url(proc)
        self.assertEqual(listening_ports(proc.transport.pid), 1)


class LoggerMetricsTests(TestCase):
    @defer.inlineCallbacks
    def test_counts_log_calls_and_records(self):
        audit = Path(self.mktemp()).resolve()
        proc = spawn_twistd(
            self,
            "p2p-logger",
            f"--listen={LOOPBACK}",
            "--no-rpcbind",
            f"--audit-file={audit}",
            f"--metrics={LOOPBACK}",
        )
        ports = yield logger_ports(proc)
        url = yield metrics_url(proc)
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", ports["tcp"]), RpcClientProtocol()
        )
        self.addCleanup(client.transport.loseConnection)
        for n in range(4):
            result = yield deadline(
                client.call(
                    wire.LOGGER_PROGRAM,
                    wire.LOGGER_VERSION,
                    wire.LOGGER_PROC_LOG,
                    rpc.pack_string(f"record {n}".encode()),
                )
            )
            self.assertEqual(rpc.unpack_int(result), 0)
        bad = rpc.pack_string(b"two\nlines")
        result = yield deadline(
            client.call(wire.LOGGER_PROGRAM, wire.LOGGER_VERSION, wire.LOGGER_PROC_LOG, bad)
        )
        self.assertEqual(rpc.unpack_int(result), -1)
        yield deadline(client.call(wire.LOGGER_PROGRAM, wire.LOGGER_VERSION, wire.LOGGER_PROC_NULL))
        got = yield scrape(url)
        calls = "p2p_logger_calls_total"
        log = (("procedure", "LOG"), ("result", "0"), ("transport", "tcp"))
        self.assertEqual(got[(calls, log)], 4)
        refused = (("procedure", "LOG"), ("result", "-1"), ("transport", "tcp"))
        self.assertEqual(got[(calls, refused)], 1)
        null = (("procedure", "NULL"), ("result", "ok"), ("transport", "tcp"))
        self.assertEqual(got[(calls, null)], 1)
        self.assertEqual(got[("p2p_logger_records_stored_total", ())], 4)
        self.assertEqual(
            got[("p2p_logger_call_duration_seconds_count", (("procedure", "LOG"),))], 5
        )
        self.assertEqual(got[("p2p_logger_open_connections", ())], 1)


class StackMetricsTests(TestCase):
    @defer.inlineCallbacks
    def test_one_endpoint_serves_every_part(self):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        _, listen_logger = logger_listen(self)
        proc = spawn_twistd(
            self,
            "p2p-stack",
            f"--indexer-listen={LOOPBACK}",
            *listen_logger,
            f"--time-listen={LOOPBACK}",
            "--no-rpcbind",
            f"--audit-file={folder / 'audit.log'}",
            f"--db={folder / 'indexer.db'}",
            f"--metrics={LOOPBACK}",
            cwd=folder,
        )
        port = yield indexer_port(proc)
        wsdl = yield time_url(proc)
        url = yield metrics_url(proc)
        yield proc.wait_for_line(r"s> ready")
        for name in ("alice", "bob"):
            self.assertEqual((yield exchange(port, request("REGISTER", name))), b"\x00")
        response = yield deadline(Agent(reactor).request(b"GET", wsdl.encode("ascii")))
        yield readBody(response)
        got = yield scrape(url)
        self.assertEqual(
            got[("p2p_indexer_requests_total", (("code", "0"), ("op", "REGISTER")))], 2
        )
        self.assertEqual(got[("p2p_time_requests_total", (("code", "200"), ("method", "GET")))], 1)
        # The two audit records reach the logger through the relay, which then catches up.
        stored = ("p2p_logger_records_stored_total", ())

        @defer.inlineCallbacks
        def relayed():
            now = yield scrape(url)
            return now if now.get(stored) == 2 else None

        got = yield poll_until_deferred(relayed)
        self.assertEqual(got[("p2p_indexer_relay_delivered_records_total", ())], 2)
        self.assertEqual(got[("p2p_indexer_outbox_backlog", ())], 0)
        self.assertEqual(got[("p2p_indexer_relay_lag_seconds", ())], 0)

    @defer.inlineCallbacks
    def test_off_by_default(self):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        proc = spawn_twistd(
            self,
            "p2p-stack",
            f"--indexer-listen={LOOPBACK}",
            f"--logger-listen={LOOPBACK}",
            "--logger=tcp:host=127.0.0.1:port=1",
            f"--time-listen={LOOPBACK}",
            "--no-rpcbind",
            f"--audit-file={folder / 'audit.log'}",
            f"--db={folder / 'indexer.db'}",
            cwd=folder,
        )
        yield proc.wait_for_line(r"s> ready")
        self.assertEqual(listening_ports(proc.transport.pid), 3)  # indexer, logger, time
        self.assertFalse([line for line in proc.lines if line.startswith("s> metrics")])


@defer.inlineCallbacks
def poll_until_deferred(check, timeout: float = DEADLINE, interval: float = 0.05):
    """Fire with the first true result of ``check()`` (a Deferred), asked every ``interval``."""
    start = reactor.seconds()
    while True:
        result = yield check()
        if result:
            return result
        if reactor.seconds() - start > timeout:
            raise defer.TimeoutError(f"not reached in {timeout}s")
        yield task.deferLater(reactor, interval, lambda: None)
