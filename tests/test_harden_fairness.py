"""Issue 9, item 3: one source address cannot take every connection slot.

The attack: one address (here 127.0.0.2) opens more connections than a
server's total cap and keeps them open, trickling a byte or saying nothing.
Every server used to count only its total, so a good client on another
address (127.0.0.1) found every slot taken: 13 of 551 indexer requests
served, 0 of 446 time calls, 177 of 523 peer FETCHes failed, and the indexer's
relay kept out of its logger indefinitely. Each server now admits at most
``--max-per-source`` connections from one address (``ConnectionCap``); the
logger also closes connections idle for ``--idle-timeout`` and keeps a slot
for a source whose relay records it stored.

Against real processes: at least 99 of 100 good requests are answered right
during each flood, the service stays up with its state unchanged, and the
relay still delivers records to a flooded logger. The flood's connections are
made before the good client's first one, so the server has accepted them
first (its accept queue is first in, first out). Unit tests on a fake clock
cover the logger's idle timeout and the relay's vouching.
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from twisted.internet import defer, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.listening import DEFAULT_MAX_PER_SOURCE, KnownSources
from p2p.logcontract import relay_machinename
from p2p.logger.audit import AuditLog
from p2p.logger.program import LoggerProgram
from p2p.oncrpc import rpc
from p2p.oncrpc.record import encode_record
from p2p.oncrpc.server import Dispatcher, RpcStreamFactory
from tests.support import (
    DEADLINE,
    deadline,
    exchange,
    indexer_port,
    logger_ports,
    poll_until,
    spawn_twistd,
    time_url,
    url_port,
)
from tests.test_client_e2e import ShellProcess, Stack
from tests.test_harden_time import GET_TIME, TIME, http_request, split_responses
from tests.test_indexer_e2e import indexer_db

WHEN = "27/11/2026 12:00:00"
REPORT = b"the real report\n" * 1000
GOOD = "127.0.0.1"
ATTACKER = "127.0.0.2"
#: More than the default total cap: without a per-source cap, every slot.
FLOOD = wire.DEFAULT_MAX_CONNECTIONS + 100
#: Connections the attacker opens at once (the servers' accept queue holds 50).
FLOOD_WINDOW = 16
#: Seconds the attacker may take to make its connections: a server busy on a
#: loaded machine lets its accept queue overflow, and the kernel retries later.
FLOOD_DEADLINE = 3 * DEADLINE
REQUESTS = 100
#: Served of REQUESTS that the fix must keep (99%).
MUST_SERVE = 99
#: Seconds the good client waits for one answer.
ANSWER_WITHIN = 5.0


class Flood:
    """The attacker: keeps ``count`` connections from ``source`` open to a server.

    Run by :meth:`run` in a thread. Each connection sends ``first`` (maybe
    nothing) once connected and then stays silent; one the server closes
    (refused at once, or cut by a timeout) is opened again at once, until
    :meth:`stop`. At most ``FLOOD_WINDOW`` are being opened at a time, as more
    would only overflow the server's accept queue. ``built`` is set once
    ``count`` connections have been made.
    """

    def __init__(self, port: int, count: int, first: bytes = b"", source: str = ATTACKER):
        self.port, self.count, self.first, self.source = port, count, first, source
        self.built = threading.Event()
        self._stopping = threading.Event()
        self.connected = 0  # connections made, since the start
        self.closed = 0  # connections the server closed

    def run(self) -> None:
        live: set[socket.socket] = set()
        connecting = 0
        with selectors.DefaultSelector() as waiting:
            while not self._stopping.is_set():
                while len(live) < self.count and connecting < FLOOD_WINDOW:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.bind((self.source, 0))
                    s.setblocking(False)
                    s.connect_ex((GOOD, self.port))
                    waiting.register(s, selectors.EVENT_WRITE)
                    live.add(s)
                    connecting += 1
                for key, events in waiting.select(timeout=0.1):  # 0.1: see stop() soon
                    s = key.fileobj
                    if events & selectors.EVENT_WRITE:  # connected (or failed): send, then wait
                        connecting -= 1
                        self.connected += 1
                        if self.connected >= self.count:
                            self.built.set()
                        with contextlib.suppress(OSError):  # refused and closed already
                            s.send(self.first)
                        waiting.modify(s, selectors.EVENT_READ)
                    else:  # EOF or reset: the server closed it; open another
                        waiting.unregister(s)
                        s.close()
                        live.discard(s)
                        self.closed += 1
        for s in live:
            s.close()

    def stop(self) -> None:
        self._stopping.set()


def ask(port: int, request: bytes, complete: Callable[[bytes], bool]) -> bytes | None:
    """One request from 127.0.0.1 on a new connection; the answer, or None (refused, silent)."""
    try:
        with socket.create_connection(
            (GOOD, port), timeout=ANSWER_WITHIN, source_address=(GOOD, 0)
        ) as s:
            s.sendall(request)
            answer = b""
            while not complete(answer):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer
    except OSError:  # reset, refused, or no answer in time
        return None


def closed(answer: bytes) -> bool:
    """Read until the server closes."""
    return False


def one_record(answer: bytes) -> bool:
    """A whole ONC-RPC reply record (one fragment, as the logger writes them)."""
    return len(answer) >= 4 and len(answer) >= 4 + (struct.unpack(">I", answer[:4])[0] & 0x7FFFFFFF)


def count_served(
    port: int,
    requests: Callable[[int], bytes],
    good: Callable[[int, bytes], bool],
    complete: Callable[[bytes], bool] = closed,
) -> int:
    """How many of REQUESTS good requests got the right answer (blocking, for a thread)."""
    served = 0
    for i in range(REQUESTS):
        answer = ask(port, requests(i), complete)
        if answer:  # b"": closed unanswered (refused at the cap)
            served += good(i, answer)
    return served


def in_thread(function, *args) -> defer.Deferred:
    """Run blocking socket work off the reactor, within a deadline."""
    return deadline(threads.deferToThread(function, *args), 120.0)


class FloodTestCase(TestCase):
    timeout = 240
    #: More options for the flooded server (a measurement may lift the per-source cap).
    extra: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def flood(self, port: int, count: int = FLOOD, first: bytes = b"", source: str = ATTACKER):
        """Start an attacker (:class:`Flood`); fires once it has made its connections."""
        attacker = Flood(port, count, first, source)
        thread = threading.Thread(target=attacker.run, name=f"flood from {source}", daemon=True)
        thread.start()

        def stop():
            attacker.stop()
            return threads.deferToThread(thread.join)

        self.addCleanup(stop)
        built = yield in_thread(attacker.built.wait, FLOOD_DEADLINE)
        self.assertTrue(built, f"{attacker.connected} connections in {FLOOD_DEADLINE}s")
        return attacker

    @defer.inlineCallbacks
    def start_indexer(self, *options: str):
        """A real indexer on 127.0.0.1; fires with (process, port)."""
        proc = spawn_twistd(self, "p2p-indexer", "--listen", "tcp:0:interface=127.0.0.1", *options)
        port = yield indexer_port(proc)
        return proc, port

    def assert_served(self, served: int, what: str) -> None:
        self.assertGreaterEqual(served, MUST_SERVE, f"{served} of {REQUESTS} {what} served")

    def assert_clean(self, proc) -> None:
        self.assertFalse(proc.exited, proc.output())
        self.assertNotRegex(proc.output(), "Traceback|Unhandled")


class IndexerFlood(FloodTestCase):
    @defer.inlineCallbacks
    def test_trickling_flood_from_one_address(self):
        """1,500 trickling connections: 13 of 551 good requests were served."""
        # --timeout 60: the flood outlasts the good client whatever the machine's pace
        proc, port = yield self.start_indexer(
            "--db", indexer_db(self, ":memory:"), "--timeout", "60", *self.extra
        )
        for user in ("alice", "bob"):
            for request in (("REGISTER", WHEN, user), ("CONNECT", WHEN, user, 4000)):
                reply = yield exchange(port, wire.encode_request(*request))
                self.assertEqual(reply, b"\0")
        list_users = wire.encode_request("LIST_USERS", WHEN, "alice")
        listing = yield exchange(port, list_users)
        self.assertEqual(listing[:1], b"\0")
        # The first byte of a request, then nothing: each holds a slot until --timeout.
        yield self.flood(port, first=list_users[:1])
        served = yield in_thread(
            count_served, port, lambda i: list_users, lambda i, answer: answer == listing
        )
        self.assert_served(served, "LIST_USERS")
        after = yield exchange(port, list_users)
        self.assertEqual(after, listing)  # state unchanged
        self.assertIn("refusing more from it", proc.output())
        self.assertIn(ATTACKER, proc.output())
        self.assert_clean(proc)


class TimeFlood(FloodTestCase):
    @defer.inlineCallbacks
    def test_trickling_flood_from_one_address(self):
        """1,100 trickling connections: 0 of 446 good calls were served for 45 s."""
        proc = spawn_twistd(self, "p2p-time", "--listen", "tcp:0:interface=127.0.0.1", *self.extra)
        port = url_port((yield time_url(proc)))
        call = http_request(
            body=GET_TIME,
            headers=[(b"Host", b"t"), (b"Content-Type", b"text/xml"), (b"Connection", b"close")],
        )

        def good(i: int, answer: bytes) -> bool:
            [(status, _, body)] = split_responses(answer)
            return status == 200 and TIME.search(body) is not None

        yield self.flood(port, first=b"POST / HTTP/1.1\r\nHost: t\r\n")
        served = yield in_thread(count_served, port, lambda i: call, good)
        self.assert_served(served, "get_time calls")
        self.assertIn("refusing more from it", proc.output())
        self.assert_clean(proc)


class PeerFlood(FloodTestCase):
    @defer.inlineCallbacks
    def test_silent_flood_from_one_address(self):
        """1,100 silent connections to a peer: 177 of 523 FETCHes failed."""
        stack = Stack(self)
        yield stack.start_indexer()
        alice = ShellProcess(self, "alice", stack.port, stack.wsdl, extra=self.extra)
        (alice.share / "report.txt").write_bytes(REPORT)
        yield alice.check("REGISTER alice", "c> REGISTER OK")
        yield alice.check("CONNECT alice", "c> CONNECT OK")
        yield alice.check("PUBLISH report.txt figures", "c> PUBLISH OK")
        listing = yield alice.run("LIST_USERS", 2)
        [row] = [line.split() for line in listing[1:] if line.split()[0] == "alice"]
        port = int(row[2])
        fetch = wire.encode_fields(wire.FETCH, "report.txt", 3)
        answer = b"\0" + str(len(REPORT)).encode() + b"\0" + REPORT[3:]
        yield self.flood(port)  # each holds a slot until the first-byte timeout
        served = yield in_thread(count_served, port, lambda i: fetch, lambda i, got: got == answer)
        self.assert_served(served, "FETCHes")
        yield alice.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", f'\treport.txt {len(REPORT)} "figures"'
        )
        self.assertFalse(alice.proc.exited)


def log_call(xid: int, text: str, cred: rpc.OpaqueAuth = rpc.NULL_AUTH) -> bytes:
    """A LOG call as one record (a relay's when ``cred`` names one)."""
    call = rpc.Call(xid, wire.LOGGER_PROGRAM, wire.LOGGER_VERSION, wire.LOGGER_PROC_LOG, cred)
    return encode_record(rpc.encode_call(call, rpc.pack_string(text)))


def log_ok(xid: int, answer: bytes) -> bool:
    reply = rpc.decode_reply(answer[4:])
    return reply.xid == xid and reply.accept_stat == rpc.SUCCESS and rpc.unpack_int(reply.body) == 0


class LoggerFlood(FloodTestCase):
    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)

    @defer.inlineCallbacks
    def start_logger(self, *options: str):
        proc = spawn_twistd(
            self,
            "p2p-logger",
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--no-rpcbind",
            *options,
            *self.extra,
            cwd=self.dir,
        )
        ports = yield logger_ports(proc)
        return proc, ports["tcp"]

    def audit(self) -> list[str]:
        path = self.dir / "p2p-audit.log"
        return path.read_text().splitlines() if path.exists() else []

    def start_audited_indexer(self, logger_port: int, logger: str | None = None):
        logger = logger or f"tcp:host={GOOD}:port={logger_port}"
        db = indexer_db(self, str(self.dir / "indexer.db"))
        return self.start_indexer("--db", db, "--logger", logger)

    @defer.inlineCallbacks
    def register(self, port: int, user: str):
        reply = yield exchange(port, wire.encode_request("REGISTER", WHEN, user))
        self.assertEqual(reply, b"\0")

    def wait_audit(self, user: str):
        return poll_until(
            lambda: any(line.startswith(user + " ") for line in self.audit()),
            what=f"{user}'s record in the audit file",
        )

    @defer.inlineCallbacks
    def test_silent_flood_from_one_address(self):
        """1,024 idle connections: the good client's LOG calls still get answered."""
        proc, port = yield self.start_logger()
        yield self.flood(port)
        served = yield in_thread(
            count_served, port, lambda i: log_call(i, f"good {i}"), log_ok, one_record
        )
        self.assert_served(served, "LOG calls")
        self.assertEqual(self.audit(), [f"good {i}" for i in range(REQUESTS) if i < served])
        self.assertIn("refusing more from it", proc.output())
        self.assert_clean(proc)

    @defer.inlineCallbacks
    def test_relay_delivers_to_a_logger_flooded_from_another_address(self):
        """The flood kept the relay out indefinitely (records waited, none lost)."""
        logger, logger_port = yield self.start_logger()
        yield self.flood(logger_port)  # before the relay ever connects
        indexer, port = yield self.start_audited_indexer(logger_port)
        for user in ("alice", "bob", "carol"):
            yield self.register(port, user)
            yield self.wait_audit(user)
        self.assert_clean(logger)
        self.assert_clean(indexer)

    @defer.inlineCallbacks
    def test_relay_on_its_own_listener_when_its_address_floods(self):
        """An attacker on the indexer's own address shares its per-source slots: a UNIX
        socket listener of the relay's own has caps of its own (docs/operations.md)."""
        where = Path(tempfile.mkdtemp(prefix="p2p-"))  # a socket path must be short
        self.addCleanup(shutil.rmtree, where)
        sock = where / "logger.sock"
        logger, logger_port = yield self.start_logger("--listen", f"unix:{sock}")
        yield self.flood(logger_port, source=GOOD)  # the relay's address, on TCP
        indexer, port = yield self.start_audited_indexer(logger_port, f"unix:path={sock}")
        for user in ("alice", "bob"):
            yield self.register(port, user)
            yield self.wait_audit(user)
        self.assert_clean(logger)
        self.assert_clean(indexer)

    @defer.inlineCallbacks
    def test_relay_keeps_a_slot_when_many_addresses_fill_the_cap(self):
        """Five addresses fill every slot with records they never finish; the relay,
        known to the logger by the records it stored, reconnects after its idle close
        and still gets in."""
        logger, logger_port = yield self.start_logger(
            "--max-connections", "20", "--max-per-source", "5", "--idle-timeout", "1"
        )
        indexer, port = yield self.start_audited_indexer(logger_port)
        yield self.register(port, "alice")
        yield self.wait_audit("alice")  # the relay's source is known now
        partial = log_call(1, "never finished")[:6]  # held for the partial-record timeout
        for n in range(2, 7):
            yield self.flood(logger_port, 5, partial, f"127.0.0.{n}")
        # The relay's connection goes idle, is closed, and the relay reconnects.
        connected = "audit relay connected"
        before = indexer.output().count(connected)
        yield poll_until(lambda: indexer.output().count(connected) > before, what="reconnection")
        yield self.register(port, "bob")
        yield self.wait_audit("bob")
        records = [wire.audit_record(user, "REGISTER", WHEN) for user in ("alice", "bob")]
        self.assertEqual(self.audit(), records)  # each once, none lost
        self.assertIn("connections open: refusing new ones", logger.output())
        self.assert_clean(logger)


# --- Unit tests on a fake clock -----------------------------------------------------


class LoggerConnections(TestCase):
    """The logger's TCP connections: idle timeout, per-source cap, known relays."""

    def setUp(self):
        self.audit = AuditLog(self.mktemp(), echo=False)
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.program = LoggerProgram(self.audit)
        self.known = KnownSources()
        self.program.relay_seen = self.known.vouch
        self.factory = RpcStreamFactory(
            Dispatcher([self.program.program()]),
            8192,
            4,
            max_per_source=2,
            idle_timeout=10.0,
            known=self.known,
        )
        self.clock = task.Clock()

    def connect(self, host: str, port: int = 40000):
        addr = IPv4Address("TCP", host, port)
        proto = self.factory.buildProtocol(addr)
        if proto is None:
            return None, None
        proto.callLater = self.clock.callLater
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        self.addCleanup(lambda: proto.connected_ and proto.connectionLost())
        return proto, transport

    def test_defaults_well_under_the_total_cap(self):
        self.assertLessEqual(DEFAULT_MAX_PER_SOURCE * 16, wire.DEFAULT_MAX_CONNECTIONS)

    def test_idle_connection_is_closed_cleanly(self):
        _, transport = self.connect("10.0.0.1")
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)  # loseConnection: idle is no fault
        self.assertFalse(transport.disconnected)

    def test_each_complete_record_restarts_the_idle_time(self):
        proto, transport = self.connect("10.0.0.1")
        for i in range(30):
            self.clock.advance(9)
            proto.dataReceived(log_call(i, f"r{i}"))
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(self.audit.path.read_text().splitlines()), 30)
        self.clock.advance(10.1)
        self.assertTrue(transport.disconnecting)

    def test_unfinished_record_is_cut_at_its_deadline(self):
        proto, transport = self.connect("10.0.0.1")
        proto.dataReceived(log_call(1, "x")[:6])
        self.clock.advance(proto.partial_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnected)  # aborted: a stuck record is a fault

    def test_closing_gives_the_slot_back_to_its_source(self):
        self.connect("10.0.0.1", 1)
        proto, _ = self.connect("10.0.0.1", 2)
        self.assertEqual(self.connect("10.0.0.1", 3), (None, None))
        self.clock.advance(11)  # both idle out
        proto.connectionLost()
        self.assertIsNotNone(self.connect("10.0.0.1", 4)[0])

    def test_a_relay_that_stored_a_record_keeps_a_slot_at_the_cap(self):
        relay, _ = self.connect("127.0.0.1")
        cred = rpc.AuthSys(relay_machinename("s1", 1)).encode()
        relay.dataReceived(log_call(1, "alice REGISTER", cred))
        self.assertIn("127.0.0.1", self.known)
        relay.connectionLost()
        for host in ("10.0.0.1", "10.0.0.2"):
            for port in (1, 2):
                self.assertIsNotNone(self.connect(host, port)[0])
        self.assertEqual(self.connect("10.0.0.3"), (None, None))
        self.assertIsNotNone(self.connect("127.0.0.1", 2)[0])

    def test_a_plain_log_call_does_not_vouch(self):
        proto, _ = self.connect("127.0.0.1")
        proto.dataReceived(log_call(1, "plain"))
        self.assertNotIn("127.0.0.1", self.known)
