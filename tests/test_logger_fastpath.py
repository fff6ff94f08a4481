"""What the logger's per-call fast path must keep.

A call with null credentials to a known procedure is recognised by its header
bytes in one lookup (``Dispatcher``), answered in the turn it arrives, and its
reply sent straight on the socket when nothing waits (``twisted_internals.
send_now``). These tests pin, against a real ``twistd p2p-logger`` over TCP and
UDP and in memory: each record is in the audit file when its reply arrives;
malformed calls get the same error replies as through the field-by-field
path; pipelined calls, good and bad mixed, are all answered in order; a reply
never overtakes bytes the transport still holds; with ``--fsync`` a reply still
waits for the sync.
"""

from __future__ import annotations

import xdrlib3
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from p2p import twisted_internals, wire
from p2p.logger.audit import AuditLog
from p2p.logger.program import LoggerProgram
from p2p.oncrpc import rpc
from p2p.oncrpc.record import RecordReader, encode_record
from p2p.oncrpc.server import Dispatcher, RpcDatagramProtocol, RpcStreamProtocol
from tests.support import deadline
from tests.test_logger_foreign import UdpClient, start_logger

VERS = wire.LOGGER_VERSION
LOG = wire.LOGGER_PROC_LOG
NULL = wire.LOGGER_PROC_NULL
#: A relay-less AUTH_SYS credential: the same call, but through the field-by-field path.
SYS_CRED = rpc.AuthSys("some-host", 1000, 100).encode()


def log_args(text: bytes | str) -> bytes:
    return rpc.pack_string(text)


def padded_badly(text: bytes) -> bytes:
    """A string whose padding bytes are not zero."""
    return rpc.pack_string(text)[:-1] + b"\x01"


#: (name, procedure, argument bytes, expected accept_stat, expected LOG result or None)
CASES = [
    ("good record", LOG, log_args("alice PUBLISH a.txt 25/11/2026 10:00:00"), rpc.SUCCESS, 0),
    ("tab in record", LOG, log_args("alice\tPUBLISH 25/11/2026 10:00:00"), rpc.SUCCESS, 0),
    ("non-ASCII record", LOG, log_args("zoé PUBLISH été.txt 25/11/2026 10:00:00"), rpc.SUCCESS, 0),
    ("empty record", LOG, log_args(b""), rpc.SUCCESS, -1),
    ("two lines", LOG, log_args("two\nlines"), rpc.SUCCESS, -1),
    ("control character", LOG, log_args("bell\x07"), rpc.SUCCESS, -1),
    ("C1 control", LOG, log_args("c1\u0085here"), rpc.SUCCESS, -1),
    ("line separator", LOG, log_args("a\u2028b"), rpc.SUCCESS, -1),
    ("invalid UTF-8", LOG, log_args(b"\xff\xfe bad"), rpc.SUCCESS, -1),
    ("no arguments", LOG, b"", rpc.GARBAGE_ARGS, None),
    ("truncated length", LOG, b"\0\0", rpc.GARBAGE_ARGS, None),
    ("truncated string", LOG, log_args(b"abcdefgh")[:-3], rpc.GARBAGE_ARGS, None),
    ("non-zero padding", LOG, padded_badly(b"abcde"), rpc.GARBAGE_ARGS, None),
    ("bytes after it", LOG, log_args(b"abcd") + b"\0\0\0\0", rpc.GARBAGE_ARGS, None),
    ("over max-message", LOG, log_args(b"x" * 300), rpc.GARBAGE_ARGS, None),
    ("NULL", NULL, b"", rpc.SUCCESS, None),
    ("NULL with arguments", NULL, b"\0\0\0\0", rpc.GARBAGE_ARGS, None),
    ("unknown procedure", 7, log_args(b"x"), rpc.PROC_UNAVAIL, None),
]
MAX_MESSAGE = 256


def call_bytes(xid: int, prog: int, proc: int, args: bytes, vers: int = VERS, cred=rpc.NULL_AUTH):
    return rpc.encode_call(rpc.Call(xid, prog, vers, proc, cred), args)


def outcome(reply_bytes: bytes | None) -> tuple[int, int | None]:
    """(accept_stat, LOG result or None) of an encoded reply."""
    assert reply_bytes is not None
    reply = rpc.decode_reply(reply_bytes)
    assert reply.stat == rpc.MSG_ACCEPTED, reply
    value = rpc.unpack_int(reply.body) if reply.ok and reply.body else None
    return reply.accept_stat, value


class PlainCallsLikeOthers(unittest.TestCase):
    """In memory: a call the header lookup finds is answered as any other call."""

    def setUp(self):
        self.prog = wire.LOGGER_PROGRAM
        self.audit = AuditLog(self.mktemp(), echo=False)
        self.audit.open()
        self.addCleanup(self.audit.close)
        program = LoggerProgram(self.audit, self.prog, max_message=MAX_MESSAGE)
        self.dispatcher = Dispatcher([program.program()])

    def test_same_reply_with_and_without_credentials(self):
        for xid, (name, proc, args, stat, value) in enumerate(CASES, 1):
            plain = self.dispatcher.answer(call_bytes(xid, self.prog, proc, args), None)
            self.assertIsInstance(plain, bytes, name)  # answered in the same turn
            sys_auth = self.dispatcher.answer(
                call_bytes(xid, self.prog, proc, args, cred=SYS_CRED), None
            )
            self.assertEqual(plain, sys_auth, name)
            self.assertEqual(outcome(plain), (stat, value), name)
            self.assertEqual(rpc.decode_reply(plain).xid, xid, name)

    def test_only_good_records_stored(self):
        for xid, (_name, proc, args, _stat, _value) in enumerate(CASES, 1):
            self.dispatcher.answer(call_bytes(xid, self.prog, proc, args), None)
        good = [c for c in CASES if c[4] == 0]
        self.assertEqual(
            self.audit.path.read_text("utf-8").splitlines(),
            [xdrlib3.Unpacker(c[2]).unpack_string().decode() for c in good],
        )

    def test_header_errors_still_found(self):
        """Calls whose header is not a plain one to a known procedure: the checks decide."""
        good = log_args("x")
        cases = [
            (call_bytes(1, self.prog, LOG, good, vers=VERS + 1), rpc.PROG_MISMATCH),
            (call_bytes(2, self.prog + 1, LOG, good), rpc.PROG_UNAVAIL),
            (call_bytes(3, self.prog, LOG, good, cred=rpc.OpaqueAuth(99, b"")), None),
        ]
        stats = []
        for data, _expected in cases:
            reply = rpc.decode_reply(self.dispatcher.answer(data, None))
            stats.append(reply.accept_stat if reply.stat == rpc.MSG_ACCEPTED else None)
        self.assertEqual(stats, [expected for _data, expected in cases])
        # an unknown credential flavor is denied (AUTH_ERROR), not accepted
        denied = rpc.decode_reply(self.dispatcher.answer(cases[2][0], None))
        self.assertEqual((denied.stat, denied.auth_stat), (rpc.MSG_DENIED, rpc.AUTH_REJECTEDCRED))
        # a header cut inside the plain part has no reply at all
        self.assertIsNone(self.dispatcher.answer(call_bytes(4, self.prog, LOG, good)[:30], None))
        self.assertEqual(self.audit.path.read_text(), "")


class RawStreamClient(protocol.Protocol):
    """Sends raw bytes; collects reply records; fires ``waiter`` once it has ``expected``."""

    def __init__(self) -> None:
        self.reader = RecordReader(1 << 16)
        self.replies: list[bytes] = []
        self.expected = 0
        self.waiter: defer.Deferred | None = None

    def dataReceived(self, data: bytes) -> None:
        self.replies.extend(self.reader.feed(data))
        if self.waiter is not None and len(self.replies) >= self.expected:
            waiter, self.waiter = self.waiter, None
            waiter.callback(self.replies)

    def send(self, chunks: list[bytes], replies: int) -> defer.Deferred:
        """Write ``chunks`` one by one; fires with all replies once ``replies`` more arrived."""
        self.expected = len(self.replies) + replies
        self.waiter = defer.Deferred()
        for chunk in chunks:
            self.transport.write(chunk)
        return deadline(self.waiter, 20)


class RealLoggerTests(unittest.TestCase):
    """``twistd p2p-logger`` over real sockets."""

    @defer.inlineCallbacks
    def setUp(self):
        options = ("--no-rpcbind", "--max-message", str(MAX_MESSAGE))
        self.proc, self.prog, self.ports, self.audit = yield start_logger(self, *options)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports["tcp"])
        self.tcp = yield endpoint.connect(protocol.Factory.forProtocol(RawStreamClient))
        self.addCleanup(self.tcp.transport.loseConnection)
        self.udp = UdpClient()
        port = reactor.listenUDP(0, self.udp, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.udp_port = port

    def lines(self) -> list[str]:
        return self.audit.read_text("utf-8").splitlines()

    def tcp_call(self, data: bytes) -> defer.Deferred:
        d = self.tcp.send([encode_record(data)], 1)
        return d.addCallback(lambda replies: replies[-1])

    def udp_call(self, data: bytes) -> defer.Deferred:
        d = self.udp.next_reply()
        self.udp_port.write(data, ("127.0.0.1", self.ports["udp"]))
        return d

    @defer.inlineCallbacks
    def check_stored_before_reply(self, send) -> defer.Deferred:
        before = len(self.lines())
        for i in range(60):
            record = f"user{i} PUBLISH file{i}.txt 25/11/2026 10:00:{i % 60:02}"
            cred = SYS_CRED if i % 3 == 2 else rpc.NULL_AUTH  # both dispatch paths
            reply = yield send(call_bytes(1000 + i, self.prog, LOG, log_args(record), cred=cred))
            self.assertEqual(outcome(reply), (rpc.SUCCESS, 0))
            # read right after the reply: the record is already the file's last line
            lines = self.lines()
            self.assertEqual((len(lines), lines[-1]), (before + i + 1, record))

    def test_record_in_file_when_tcp_reply_arrives(self):
        return self.check_stored_before_reply(self.tcp_call)

    def test_record_in_file_when_udp_reply_arrives(self):
        return self.check_stored_before_reply(self.udp_call)

    @defer.inlineCallbacks
    def test_malformed_calls_answered_over_tcp_and_udp(self):
        for kind, send in (("tcp", self.tcp_call), ("udp", self.udp_call)):
            for xid, (name, proc, args, stat, value) in enumerate(CASES, 1):
                reply = yield send(call_bytes(xid, self.prog, proc, args))
                self.assertEqual(rpc.decode_reply(reply).xid, xid, (kind, name))
                self.assertEqual(outcome(reply), (stat, value), (kind, name))
        stored = [xdrlib3.Unpacker(c[2]).unpack_string().decode() for c in CASES if c[4] == 0]
        self.assertEqual(self.lines(), stored + stored)

    @defer.inlineCallbacks
    def test_pipelined_calls_answered_in_order(self):
        """300 calls in one write, malformed ones among them: every reply, in call order."""
        calls, expected, stored = [], [], []
        for i in range(300):
            _name, proc, args, stat, value = CASES[i % len(CASES)]
            if i % 4 == 0:  # mostly good records, each different
                proc, args, stat, value = LOG, log_args(f"pipelined {i}"), rpc.SUCCESS, 0
            cred = SYS_CRED if i % 5 == 0 else rpc.NULL_AUTH
            calls.append(encode_record(call_bytes(5000 + i, self.prog, proc, args, cred=cred)))
            expected.append((5000 + i, stat, value))
            if value == 0:
                stored.append(xdrlib3.Unpacker(args).unpack_string().decode())
        stream = b"".join(calls)
        replies = yield self.tcp.send([stream], len(calls))
        got = [(rpc.decode_reply(r).xid, *outcome(r)) for r in replies]
        self.assertEqual(got, expected)
        self.assertEqual(self.lines(), stored)
        # and cut at odd places, the same again
        self.tcp.replies.clear()
        pieces = [stream[start : start + 997] for start in range(0, len(stream), 997)]
        replies = yield self.tcp.send(pieces, len(calls))
        self.assertEqual([(rpc.decode_reply(r).xid, *outcome(r)) for r in replies], expected)
        self.assertEqual(self.lines(), stored + stored)


class Buffered(protocol.Protocol):
    """Server side: on connection, ``head`` written the plain way (held by the transport
    until the socket is writable), then ``big`` and ``tail`` with ``send_now``, then a
    clean close. The socket is empty: only the transport's buffer says they must wait."""

    head = b"--head--"
    big = bytes(range(256)) * (32 << 10)  # 8 MiB: more than the socket takes at once
    tail = b"--the end--"

    def connectionMade(self) -> None:
        self.transport.write(self.head)
        twisted_internals.send_now(self.transport, self.big)
        twisted_internals.send_now(self.transport, self.tail)
        self.transport.loseConnection()


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self.chunks))


class SendNowTests(unittest.TestCase):
    """``send_now`` never sends ahead of what the transport still holds."""

    def test_plain_transport_written_through(self):
        transport = StringTransport()
        transport.write(b"first ")
        twisted_internals.send_now(transport, b"second")
        self.assertEqual(transport.value(), b"first second")

    @defer.inlineCallbacks
    def test_after_buffered_bytes(self):
        for enabled in (twisted_internals.FAST_PATHS, frozenset()):
            self.patch(twisted_internals, "ENABLED", enabled)
            server = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
            port = yield server.listen(protocol.Factory.forProtocol(Buffered))
            self.addCleanup(port.stopListening)
            client = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            collector = yield client.connect(protocol.Factory.forProtocol(Collect))
            received = yield deadline(collector.done, 30)
            self.assertEqual(received, Buffered.head + Buffered.big + Buffered.tail)


class DurableTests(unittest.TestCase):
    """With ``--fsync`` (``LoggerProgram.durable``) a LOG reply waits for the sync: the one
    case where the dispatcher hands the transports a Deferred instead of the reply."""

    def setUp(self):
        self.audit = AuditLog(self.mktemp(), echo=False)
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.syncs: list[defer.Deferred] = []
        program = LoggerProgram(self.audit, wire.LOGGER_PROGRAM, max_message=MAX_MESSAGE)
        program.durable = self.sync
        self.dispatcher = Dispatcher([program.program()])

    def sync(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.syncs.append(d)
        return d

    def call(self, xid: int, args: bytes, proc: int = LOG) -> bytes:
        return call_bytes(xid, wire.LOGGER_PROGRAM, proc, args)

    def test_tcp_replies_after_the_sync_in_order(self):
        transport = StringTransport()
        proto = RpcStreamProtocol(self.dispatcher, 4096)
        proto.makeConnection(transport)
        self.addCleanup(proto.connectionLost)
        records = [encode_record(self.call(i, log_args(f"durable {i}"))) for i in (1, 2)]
        proto.dataReceived(b"".join(records))
        self.assertEqual(transport.value(), b"")  # stored, not yet synced: no reply
        self.assertEqual(self.audit.path.read_text().splitlines(), ["durable 1", "durable 2"])
        for d in self.syncs:
            d.callback(None)
        reader = RecordReader(4096)
        replies = [rpc.decode_reply(r) for r in reader.feed(transport.value())]
        self.assertEqual([(r.xid, rpc.unpack_int(r.body)) for r in replies], [(1, 0), (2, 0)])

    def test_udp_retransmission_while_syncing_answered_once(self):
        sent: list[tuple[bytes, object]] = []

        class Transport:
            def write(self, data, addr):
                sent.append((data, addr))

        proto = RpcDatagramProtocol(self.dispatcher)
        proto.transport = Transport()
        data = self.call(7, log_args("synced once"))
        proto.datagramReceived(data, ("127.0.0.1", 5000))
        proto.datagramReceived(data, ("127.0.0.1", 5000))  # while the first is syncing
        self.assertEqual((sent, len(self.syncs)), ([], 1))
        self.syncs[0].callback(None)
        self.assertEqual([outcome(reply) for reply, _addr in sent], [(rpc.SUCCESS, 0)])
        self.assertEqual(self.audit.path.read_text(), "synced once\n")
