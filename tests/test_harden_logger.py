"""Adversarial, deterministic property tests of the audit logger (fixed seeds, bounded).

A generator builds RPC messages, valid and broken in known ways, and a small
reference classifier says from the generation parameters (never by decoding
the bytes with the code under test) what the logger must answer. The messages
go through the real TCP protocol (random fragmenting, random read splits) and
the UDP protocol; trial fails the test on any error the logger logs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
from dataclasses import dataclass

import xdrlib3
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from p2p import wire
from p2p.logcontract import parse_relay_machinename
from p2p.logger.audit import AuditLog
from p2p.logger.program import LoggerProgram
from p2p.oncrpc import rpc
from p2p.oncrpc.record import RecordReader, encode_record
from p2p.oncrpc.server import Dispatcher, RpcDatagramProtocol, RpcStreamProtocol

PROG = wire.LOGGER_PROGRAM
VERS = wire.LOGGER_VERSION
NULL = wire.LOGGER_PROC_NULL
LOG = wire.LOGGER_PROC_LOG
MAX_MESSAGE = 200
MAX_RECORD = MAX_MESSAGE + rpc.MAX_CALL_HEADER + 8

#: Characters a valid record may hold (tab, ASCII, Latin-1, CJK, an emoji).
GOOD_CHARS = "abcXYZ019 \t-_./:é€漢字😀"


def _u32(p: xdrlib3.Packer, value: int) -> None:
    p.pack_uint(value & rpc.UINT32_MASK)


def _opaque(flavor: int, body: bytes) -> bytes:
    p = xdrlib3.Packer()
    _u32(p, flavor)
    _u32(p, len(body))
    return p.get_buffer() + body + b"\0" * ((-len(body)) % 4)


def _auth_sys(name: bytes, gids: int = 0) -> bytes:
    p = xdrlib3.Packer()
    _u32(p, 7)  # stamp
    _u32(p, len(name))
    body = p.get_buffer() + name + b"\0" * ((-len(name)) % 4)
    p = xdrlib3.Packer()
    for v in (1000, 1000, gids, *range(gids)):
        _u32(p, v)
    return body + p.get_buffer()


def _string(data: bytes, declared: int | None = None, pad: bytes | None = None) -> bytes:
    p = xdrlib3.Packer()
    _u32(p, len(data) if declared is None else declared)
    if pad is None:
        pad = b"\0" * ((-len(data)) % 4)
    return p.get_buffer() + data + pad


def log_call(xid: int, text: str) -> bytes:
    return rpc.encode_call(rpc.Call(xid, PROG, VERS, LOG), rpc.pack_string(text))


@dataclass
class Case:
    """One generated message and what the logger must do with it."""

    data: bytes
    xid: int
    #: None: no reply; ("rpc",); ("auth", stat); ("accept", stat); ("ok", int result or None)
    expect: tuple | None
    record: str | None = None  # the audit line a stored LOG adds


class Generator:
    """Random messages with their expected outcome (the reference classifier)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.senders = 0

    def text(self, n: int) -> str:
        return "".join(self.r.choice(GOOD_CHARS) for _ in range(n)).strip() or "x"

    def cred(self) -> tuple[bytes, int | None, str]:
        """Credential bytes, the auth_stat it must give (None: undecodable header), kind."""
        kind = self.r.choice(
            ["none", "none", "sys", "relay", "relay_odd", "gids", "longname", "flavor", "over"]
        )
        if kind == "none":
            return _opaque(rpc.AUTH_NONE, b""), rpc.AUTH_OK, kind
        if kind == "sys":
            return _opaque(rpc.AUTH_SYS, _auth_sys(b"host-a")), rpc.AUTH_OK, kind
        if kind == "relay":
            self.senders += 1
            name = f"p2p-outbox:s{self.senders}:{self.r.randrange(1 << 40)}".encode()
            return _opaque(rpc.AUTH_SYS, _auth_sys(name)), rpc.AUTH_OK, kind
        if kind == "relay_odd":  # not a relay identity: stored as a foreign client's record
            self.senders += 1
            seq = self.r.choice(["\u00b2", "\u0663", "9" * 200, "-1", "", " 1", "1x"])
            name = f"p2p-outbox:s{self.senders}:{seq}".encode()
            return _opaque(rpc.AUTH_SYS, _auth_sys(name)), rpc.AUTH_OK, kind
        if kind == "gids":
            return _opaque(rpc.AUTH_SYS, _auth_sys(b"h", 17)), rpc.AUTH_BADCRED, kind
        if kind == "longname":
            return _opaque(rpc.AUTH_SYS, _auth_sys(b"n" * 256)), rpc.AUTH_BADCRED, kind
        if kind == "flavor":
            return _opaque(self.r.choice([2, 3, 6, 0xFFFFFFFF]), b"x" * 8), 2, kind
        return _opaque(rpc.AUTH_NONE, b"\0" * 404), None, kind  # body over 400 bytes

    def log_args(self) -> tuple[bytes, tuple, str | None]:
        r = self.r
        kind = r.choice(
            [
                *("ok", "ok", "ok", "empty", "newline", "badutf8", "linesep", "control"),
                *("toolong", "hugelen", "badpad", "unpadded", "trailing", "missing"),
            ]
        )
        if kind == "ok":
            text = self.text(r.randrange(1, 60))
            return _string(text.encode()), ("ok", 0), text
        bad = {
            "empty": "",
            "newline": "a\nb",
            "linesep": "a\u2028b",
            "control": "a\x1b[31mb",
        }
        if kind in bad:
            return _string(bad[kind].encode()), ("ok", -1), None
        if kind == "badutf8":
            return _string(b"\xff\xfeab"), ("ok", -1), None
        garbage = ("accept", rpc.GARBAGE_ARGS)
        if kind == "toolong":
            return _string(b"y" * (MAX_MESSAGE + r.randrange(1, 2000))), garbage, None
        if kind == "hugelen":
            return _string(b"abcd", declared=r.choice([0x7FFFFFFF, 0xFFFFFFFF, 5])), garbage, None
        if kind == "badpad":
            return _string(b"a", pad=b"\0\1\0"), garbage, None
        if kind == "unpadded":
            return _string(b"abcde", pad=b""), garbage, None
        if kind == "trailing":
            return _string(b"abcd") + b"\0\0\0\0", garbage, None
        return b"", garbage, None  # "missing"

    def case(self, xid: int) -> Case:
        r = self.r
        mtype = rpc.CALL if r.random() < 0.93 else r.choice([rpc.REPLY, 2, 0xFFFFFFFF])
        rpcvers = 2 if r.random() < 0.93 else r.choice([0, 1, 3])
        prog = PROG if r.random() < 0.9 else r.choice([0, 100000, PROG + 1])
        vers = VERS if r.random() < 0.9 else r.choice([0, 2, 0xFFFFFFFF])
        proc = r.choice([LOG, LOG, LOG, NULL, 2, 0xFFFFFFFF])
        cred, auth, _kind = self.cred()
        p = xdrlib3.Packer()
        for v in (xid, mtype, rpcvers, prog, vers, proc):
            _u32(p, v)
        header = p.get_buffer() + cred + _opaque(rpc.AUTH_NONE, b"")
        record = None
        if proc == LOG:
            args, outcome, record = self.log_args()
        elif proc == NULL:
            args = b"" if r.random() < 0.7 else b"\0" * r.randrange(1, 12)
            outcome = ("ok", None) if not args else ("accept", rpc.GARBAGE_ARGS)
        else:
            args, outcome = b"", ("accept", rpc.PROC_UNAVAIL)
        data = header + args
        cut = None
        if r.random() < 0.1:
            cut = r.randrange(0, len(data))
            data = data[:cut]
        # The reference classifier, in the order RFC 5531 servers check.
        if mtype != rpc.CALL or len(data) < 12:
            expect = None
        elif rpcvers != 2:
            expect = ("rpc",)
        elif auth is None or (cut is not None and cut < len(header)):
            expect = None
        elif auth != rpc.AUTH_OK:
            expect = ("auth", auth)
        elif prog != PROG:
            expect = ("accept", rpc.PROG_UNAVAIL)
        elif vers != VERS:
            expect = ("accept", rpc.PROG_MISMATCH)
        elif cut is not None:  # cut inside the arguments of LOG or NULL
            args_left = data[len(header) :]
            expect = ("ok", None) if proc == NULL and not args_left else ("accept", 4)
        else:
            expect = outcome
        if expect is None or expect[0] != "ok" or expect[1] != 0:
            record = None
        return Case(data, xid & rpc.UINT32_MASK, expect, record)


def check_reply(test: unittest.TestCase, case: Case, raw: bytes) -> None:
    reply = rpc.decode_reply(raw)
    test.assertEqual(reply.xid, case.xid)
    kind = case.expect[0]
    if kind == "rpc":
        test.assertEqual((reply.stat, reply.reject_stat), (rpc.MSG_DENIED, rpc.RPC_MISMATCH))
        test.assertEqual((reply.low, reply.high), (2, 2))
    elif kind == "auth":
        test.assertEqual((reply.stat, reply.reject_stat), (rpc.MSG_DENIED, rpc.AUTH_ERROR))
        test.assertEqual(reply.auth_stat, case.expect[1])
    elif kind == "accept":
        test.assertEqual((reply.stat, reply.accept_stat), (rpc.MSG_ACCEPTED, case.expect[1]))
        if case.expect[1] == rpc.PROG_MISMATCH:
            test.assertEqual((reply.low, reply.high), (VERS, VERS))
    else:
        test.assertTrue(reply.ok, reply)
        if case.expect[1] is None:
            test.assertEqual(reply.body, b"")
        else:
            test.assertEqual(rpc.unpack_int(reply.body), case.expect[1], case)


class LoggerFixture:
    def make_logger(self, test: unittest.TestCase) -> None:
        self.audit = AuditLog(test.mktemp(), echo=False)
        self.audit.open()
        test.addCleanup(self.audit.close)
        self.program = LoggerProgram(self.audit, PROG, max_message=MAX_MESSAGE)
        self.dispatcher = Dispatcher([self.program.program()])

    def relay_call(self, xid: int, name: str, text: bytes) -> bytes:
        cred = rpc.AuthSys(name).encode()
        return rpc.encode_call(rpc.Call(xid, PROG, VERS, LOG, cred), rpc.pack_string(text))

    def answer(self, data: bytes) -> int:
        out: list = []
        self.dispatcher.handle(data).addCallback(out.append)
        reply = rpc.decode_reply(out[0])
        assert reply.ok, reply
        return rpc.unpack_int(reply.body)

    def audit_lines(self) -> list[str]:
        data = self.audit.path.read_bytes()
        return data.decode("utf-8").split("\n")[:-1] if data else []


class StreamFuzzTests(unittest.TestCase, LoggerFixture):
    """Random calls, cut into random fragments and random reads, over TCP."""

    def stream_protocol(self, transport: StringTransport) -> RpcStreamProtocol:
        proto = RpcStreamProtocol(self.dispatcher, MAX_RECORD)
        proto.callLater = task.Clock().callLater  # the partial-record timeout, never run
        proto.makeConnection(transport)
        return proto

    def run_stream(self, seed: int, count: int) -> None:
        r = random.Random(seed)
        gen = Generator(seed)
        self.make_logger(self)
        transport = StringTransport()
        proto = self.stream_protocol(transport)
        cases = [gen.case(r.randrange(1 << 32)) for _ in range(count)]
        stream = b"".join(encode_record(c.data, r.randrange(1, 300)) for c in cases)
        pos = 0
        while pos < len(stream):
            step = r.choice([1, 3, 4, 7, 100, 1000, 5000])
            proto.dataReceived(stream[pos : pos + step])
            pos += step
            self.assertLessEqual(proto.reader.buffered, MAX_RECORD + 4)
        replies = RecordReader(1 << 20).feed(transport.value())
        answered = [c for c in cases if c.expect is not None]
        self.assertEqual(len(replies), len(answered))
        for case, raw in zip(answered, replies, strict=True):
            check_reply(self, case, raw)
        expected = [c.record for c in cases if c.record is not None]
        self.assertEqual(self.audit_lines(), expected)
        self.assertEqual(self.audit.path.read_text("utf-8").splitlines(), expected)
        self.assertFalse(transport.disconnecting)

    def test_random_calls_seed_1(self):
        self.run_stream(1, 1500)

    def test_random_calls_seed_2(self):
        self.run_stream(2, 1500)

    def test_random_calls_seed_3(self):
        self.run_stream(3, 1500)

    def test_random_bytes_never_raise(self):
        """Pure noise and endless fragments: no exception, bounded buffer, no record."""
        r = random.Random(4)
        self.make_logger(self)
        proto = self.stream_protocol(StringTransport())
        for _ in range(300):
            proto.dataReceived(r.randbytes(r.randrange(0, 3000)))
            self.assertLessEqual(proto.reader.buffered, MAX_RECORD + 4)
        # A fragment of 0x7FFFFFFF bytes never ending, and headers without the last bit.
        proto = self.stream_protocol(StringTransport())
        proto.dataReceived(b"\x7f\xff\xff\xff")
        for _ in range(200):
            proto.dataReceived(b"\0" * 4096)
        self.assertLessEqual(proto.reader.buffered, MAX_RECORD + 4)
        self.assertTrue(proto.reader.partial)
        proto.connectionLost()
        self.assertEqual(self.audit_lines(), [])

    def test_pipelined_calls_without_reading_pause_the_reader(self):
        """A client that never reads replies: once the transport pushes back, we stop reading."""
        self.make_logger(self)
        transport = StringTransport()
        proto = self.stream_protocol(transport)
        self.assertIs(transport.producer, proto)
        null = rpc.encode_call(rpc.Call(1, PROG, VERS, NULL))
        proto.dataReceived(encode_record(null) * 3000)
        self.assertEqual(len(RecordReader(1 << 20).feed(transport.value())), 3000)
        proto.pauseProducing()
        self.assertEqual(transport.producerState, "paused")


class SlowClientTests(unittest.TestCase, LoggerFixture):
    """A record must end within partial_timeout of its first byte, however it is sent."""

    def setUp(self):
        self.make_logger(self)
        self.clock = task.Clock()
        self.transport = StringTransport()
        self.proto = RpcStreamProtocol(self.dispatcher, MAX_RECORD)
        self.proto.callLater = self.clock.callLater
        self.proto.makeConnection(self.transport)
        self.addCleanup(self.proto.connectionLost)

    def feed_every(self, chunks, seconds: float) -> float:
        """Send chunks ``seconds`` apart until the server hangs up; the time it took."""
        start = self.clock.seconds()
        for chunk in chunks:
            if self.transport.disconnecting:
                break
            self.proto.dataReceived(chunk)
            self.clock.advance(seconds)
        self.assertTrue(self.transport.disconnecting)
        return self.clock.seconds() - start

    def test_trickled_record(self):
        """One byte every 5 s kept a record open forever (each byte reset the timeout)."""
        data = encode_record(log_call(1, "x" * 100))
        took = self.feed_every((data[i : i + 1] for i in range(len(data))), 5)
        self.assertLessEqual(took, self.proto.partial_timeout + 5)

    def test_fragments_without_last_bit_forever(self):
        fragment = (100).to_bytes(4, "big") + b"\0" * 100
        took = self.feed_every((fragment for _ in range(10000)), 1)
        self.assertLessEqual(took, self.proto.partial_timeout + 1)

    def test_empty_fragments_without_last_bit_forever(self):
        took = self.feed_every((b"\0\0\0\0" for _ in range(10000)), 1)
        self.assertLessEqual(took, self.proto.partial_timeout + 1)

    def test_steady_client_is_not_cut(self):
        """Whole records, each sent in pieces within the deadline, for ten times the deadline."""
        for i in range(200):
            data = encode_record(log_call(i, f"r{i}"))
            half = len(data) // 2
            self.proto.dataReceived(data[:half])
            self.clock.advance(self.proto.partial_timeout / 2)
            self.proto.dataReceived(data[half:])
            self.clock.advance(self.proto.partial_timeout * 3)  # idle between records
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.audit_lines()), 200)


class DatagramFuzzTests(unittest.TestCase, LoggerFixture):
    """Random datagrams, 0 bytes and up."""

    def test_random_datagrams(self):
        r = random.Random(5)
        gen = Generator(5)
        self.make_logger(self)
        proto = RpcDatagramProtocol(self.dispatcher, cache_size=64)
        sent: list = []
        proto.transport = type("T", (), {"write": lambda _s, d, a: sent.append((d, a))})()
        xids = r.sample(range(1 << 32), 2000)
        expected = []
        for i, xid in enumerate(xids):
            addr = ("127.0.0.1", 1000 + i % 7)
            for size in range(4):
                proto.datagramReceived(r.randbytes(size), addr)
            case = gen.case(xid)
            before = len(sent)
            proto.datagramReceived(case.data, addr)
            if case.expect is None:
                self.assertEqual(len(sent), before, case)
            else:
                self.assertEqual(len(sent), before + 1)
                self.assertEqual(sent[-1][1], addr)
                check_reply(self, case, sent[-1][0])
            if case.record is not None:
                expected.append(case.record)
        self.assertEqual(self.audit_lines(), expected)
        self.assertLessEqual(len(proto.cache._entries), 64)
        self.assertEqual(proto._in_progress, set())

    def test_reply_cache_exhaustion(self):
        """Many distinct XIDs: the cache stays at its size, a retransmission is not stored twice."""
        self.make_logger(self)
        proto = RpcDatagramProtocol(self.dispatcher, cache_size=100)
        sent: list = []
        proto.transport = type("T", (), {"write": lambda _s, d, a: sent.append(d)})()
        addr = ("127.0.0.1", 9)
        call = rpc.encode_call(rpc.Call(1, PROG, VERS, LOG), rpc.pack_string("first"))
        proto.datagramReceived(call, addr)
        proto.datagramReceived(call, addr)
        self.assertEqual(sent[0], sent[1])
        for xid in range(2, 5000):
            proto.datagramReceived(rpc.encode_call(rpc.Call(xid, PROG, VERS, NULL)), addr)
        self.assertEqual(len(proto.cache._entries), 100)
        self.assertEqual(self.audit_lines(), ["first"])


class CodecPropertyTests(unittest.TestCase):
    """encode/decode of random calls and replies round-trip exactly."""

    def test_call_round_trip(self):
        r = random.Random(6)
        for _ in range(2000):
            cred = rpc.OpaqueAuth(r.randrange(1 << 32), r.randbytes(r.randrange(0, 401)))
            verf = rpc.OpaqueAuth(r.randrange(1 << 32), r.randbytes(r.randrange(0, 401)))
            call = rpc.Call(*(r.randrange(1 << 32) for _ in range(4)), cred, verf)
            args = r.randbytes(r.randrange(0, 40))
            data = rpc.encode_call(call, args)
            self.assertEqual(len(data) % 4, len(args) % 4)
            self.assertEqual(rpc.decode_call(data), (call, args))

    def test_reply_round_trip(self):
        r = random.Random(7)
        for _ in range(2000):
            xid = r.randrange(1 << 32)
            kind = r.randrange(5)
            if kind == 0:
                reply = rpc.success(xid, r.randbytes(4 * r.randrange(5)))
            elif kind == 1:
                stat = r.choice([1, 3, 4, 5])
                reply = rpc.accept_error(xid, stat)
            elif kind == 2:
                reply = rpc.accept_error(
                    xid, rpc.PROG_MISMATCH, r.randrange(1 << 32), r.randrange(1 << 32)
                )
            elif kind == 3:
                reply = rpc.rpc_mismatch(xid)
            else:
                reply = rpc.auth_error(xid, r.randrange(1, 6))
            self.assertEqual(rpc.decode_reply(rpc.encode_reply(reply)), reply)

    def test_string_round_trip_and_strictness(self):
        r = random.Random(8)
        for _ in range(2000):
            value = r.randbytes(r.randrange(0, 50))
            data = rpc.pack_string(value)
            self.assertEqual(len(data) % 4, 0)
            self.assertEqual(rpc.unpack_string(data, 50), value)
            for cut in {0, len(data) - 1, r.randrange(len(data))}:
                self.assertRaises(rpc.MessageError, rpc.unpack_string, data[:cut], 50)
            self.assertRaises(rpc.MessageError, rpc.unpack_string, data + b"\0" * 4, 50)
            if len(value) % 4:
                broken = data[:-1] + b"\1"
                self.assertRaises(rpc.MessageError, rpc.unpack_string, broken, 50)

    def test_auth_sys_round_trip(self):
        r = random.Random(9)
        for _ in range(500):
            name = "".join(r.choice("ab-1.") for _ in range(r.randrange(0, 256)))
            gids = tuple(r.randrange(1 << 32) for _ in range(r.randrange(0, 17)))
            cred = rpc.AuthSys(name, r.randrange(1 << 32), r.randrange(1 << 32), gids, 5)
            self.assertEqual(rpc.AuthSys.decode(cred.encode().body), cred)


class RelayIdentityTests(unittest.TestCase, LoggerFixture):
    """What a foreign client can and cannot do to the relay's deduplication."""

    def test_only_ascii_decimal_sequence_numbers(self):
        """A non-ASCII digit (``²`` made int() raise: SYSTEM_ERR and a logged traceback)."""
        for seq in ("\u00b2", "\u0663", "\uff11", "9" * 40, "+1", "-1", "1_0"):
            self.assertIsNone(parse_relay_machinename(f"p2p-outbox:s:{seq}"), seq)
        self.assertEqual(parse_relay_machinename("p2p-outbox:a:b:12"), ("a:b", 12))
        self.make_logger(self)
        self.assertEqual(self.answer(self.relay_call(1, "p2p-outbox:s:\u00b2", b"rec")), 0)
        self.assertEqual(self.audit_lines(), ["rec"])

    def test_failures_of_invented_senders_use_bounded_memory(self):
        """Failed records under ever new sender ids must not grow the logger's memory forever."""
        self.make_logger(self)
        for i in range(20000):
            data = self.relay_call(i, f"p2p-outbox:fake{i}:1", b"\xff")
            self.assertEqual(self.answer(data), -1)
        self.assertLessEqual(len(self.program.failed), 1024)
        self.assertEqual(self.audit_lines(), [])

    def test_foreign_sender_cannot_touch_another_sender(self):
        """Records under other sender ids (not the indexer's random one) never suppress it."""
        self.make_logger(self)
        real = "0123456789abcdef0123456789abcdef"
        self.assertEqual(self.answer(self.relay_call(1, f"p2p-outbox:{real}:1", b"r1")), 0)
        for i, name in enumerate(
            [
                "p2p-outbox:x:999999",
                f"p2p-outbox:{real[:-1]}:999",
                f"p2p-outbox:{real}x:999",
                f"p2p-outbox:{real.upper()}:999",
            ]
        ):
            self.assertEqual(self.answer(self.relay_call(10 + i, name, b"\xff")), -1)
            self.assertEqual(self.answer(self.relay_call(20 + i, name, b"forged")), 0)
        self.assertEqual(self.answer(self.relay_call(2, f"p2p-outbox:{real}:2", b"r2")), 0)
        self.assertEqual(self.audit_lines()[-1], "r2")
        self.assertEqual(self.audit_lines().count("r2"), 1)


class StaleFailureTests(unittest.TestCase, LoggerFixture):
    def test_failed_resend_of_a_stored_seq_does_not_block_the_sender(self):
        """A bad record under an already stored seq wedged the sender: every later seq got -1."""
        self.make_logger(self)
        real = "p2p-outbox:0123456789abcdef0123456789abcdef:"
        self.assertEqual(self.answer(self.relay_call(1, real + "1", b"r1")), 0)
        self.assertEqual(self.answer(self.relay_call(2, real + "2", b"r2")), 0)
        self.assertEqual(self.answer(self.relay_call(9, real + "1", b"\xff")), -1)
        self.assertEqual(self.answer(self.relay_call(3, real + "3", b"r3")), 0)
        self.assertEqual(self.audit_lines(), ["r1", "r2", "r3"])


class AuditFileTests(unittest.TestCase):
    def test_many_senders_do_not_compact_on_every_record(self):
        """A journal bigger than compact_at after compaction must not be rewritten per record."""
        audit = AuditLog(self.mktemp(), echo=False, compact_at=300)
        audit.open()
        self.addCleanup(audit.close)
        compactions = []
        real = audit._compact
        audit._compact = lambda: (compactions.append(1), real())
        for i in range(400):
            audit.store(f"r{i}", f"sender-{i}", 1)
        self.assertLess(len(compactions), 40)
        audit.close()
        again = AuditLog(audit.path, echo=False)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(len(again.last_seq), 400)

    def test_line_separators_are_not_records(self):
        """U+2028/U+2029 split a line for Python, JSON/JS readers and editors."""
        audit = AuditLog(self.mktemp(), echo=False)
        audit.open()
        self.addCleanup(audit.close)
        program = LoggerProgram(audit, PROG)
        for text in ("a\u2028b", "a\u2029b", "a\x85b", "a\rb"):
            result = program.log(rpc.Call(1, PROG, VERS, LOG), rpc.pack_string(text), None)
            self.assertEqual(rpc.unpack_int(result), -1, repr(text))
        self.assertEqual(audit.path.read_bytes(), b"")


class DecoderFuzzTests(unittest.TestCase):
    """Decoders given noise or mutated messages raise MessageError and nothing else."""

    def mutants(self, seed: int, seeds: list[bytes], count: int):
        r = random.Random(seed)
        for _ in range(count):
            data = bytearray(r.choice(seeds))
            for _ in range(r.randrange(0, 4)):
                if data and r.random() < 0.5:
                    data[r.randrange(len(data))] = r.randrange(256)
                else:
                    data[r.randrange(len(data) + 1) :] = r.randbytes(r.randrange(0, 12))
            yield bytes(data)
        for _ in range(count // 4):
            yield r.randbytes(r.randrange(0, 64))

    def test_decode_call_and_auth(self):
        cred = rpc.AuthSys("host", 1, 2, (3, 4)).encode()
        seeds = [log_call(1, "abc"), rpc.encode_call(rpc.Call(2, PROG, VERS, NULL, cred))]
        for data in self.mutants(20, seeds, 5000):
            try:
                call, _ = rpc.decode_call(data)
            except rpc.MessageError:
                continue
            if call.cred.flavor == rpc.AUTH_SYS:
                self.assertIn(rpc.check_auth(call), (rpc.AUTH_OK, rpc.AUTH_BADCRED))
        for body in self.mutants(21, [cred.body], 5000):
            with contextlib.suppress(rpc.MessageError):
                rpc.AuthSys.decode(body)

    def test_decode_reply_and_client(self):
        from p2p.oncrpc.client import RpcClientProtocol, RpcReplyError

        seeds = [
            rpc.encode_reply(rpc.success(5, rpc.pack_int(0))),
            rpc.encode_reply(rpc.accept_error(5, rpc.PROG_MISMATCH, 1, 1)),
            rpc.encode_reply(rpc.rpc_mismatch(5)),
            rpc.encode_reply(rpc.auth_error(5, rpc.AUTH_BADCRED)),
        ]
        replies = list(self.mutants(22, seeds, 5000))
        for data in replies:
            with contextlib.suppress(rpc.MessageError):
                rpc.decode_reply(data)
        client = RpcClientProtocol()
        client.makeConnection(StringTransport())
        outcomes: list = []
        for xid in range(64):
            d = client.call(PROG, VERS, NULL, xid=xid)
            d.addCallbacks(outcomes.append, lambda f: outcomes.append(f.trap(RpcReplyError)))
        r = random.Random(23)
        stream = b"".join(encode_record(d, r.randrange(1, 40)) for d in replies)
        stream += b"".join(encode_record(rpc.encode_reply(rpc.success(x, b""))) for x in range(64))
        for i in range(0, len(stream), 997):
            client.dataReceived(stream[i : i + 997])
        self.assertEqual(len(outcomes), 64)
        self.assertEqual(client.pending, {})
        client.connectionLost()


class DiskFullTests(unittest.TestCase):
    """A write that fails half way (ENOSPC) leaves no torn line and loses no record.

    The disk fills as the kernel shows it: on ``fail_fd``, write(2) first writes
    half of what it is given and says so (a short write), then fails with ENOSPC
    and writes nothing."""

    def setUp(self):
        self.audit = AuditLog(self.mktemp(), echo=False)
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.fail_fd: int | None = None
        self.short_written = False
        real = os.write

        def flaky(fd: int, data) -> int:
            if fd != self.fail_fd:
                return real(fd, data)
            if not self.short_written:
                self.short_written = True
                return real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", flaky)

    def reopen(self) -> AuditLog:
        self.audit.close()
        again = AuditLog(self.audit.path, echo=False)
        again.open()
        self.addCleanup(again.close)
        return again

    def test_failed_audit_write_leaves_no_torn_line(self):
        self.audit.store("first")
        self.fail_fd = self.audit._audit_fd
        self.assertRaises(OSError, self.audit.store, "lost-record")
        self.fail_fd = None
        self.audit.store("next")
        self.assertEqual(self.audit.path.read_text().split("\n"), ["first", "next", ""])

    def test_failed_audit_write_is_stored_on_resend(self):
        """The journal said seq 2 was stored, so its resend was skipped as a duplicate: lost."""
        self.audit.store("r1", "s", 1)
        self.fail_fd = self.audit._audit_fd
        self.assertRaises(OSError, self.audit.store, "r2", "s", 2)
        self.fail_fd = None
        self.assertTrue(self.audit.store("r2", "s", 2))
        self.assertEqual(self.audit.path.read_text().splitlines(), ["r1", "r2"])
        again = self.reopen()
        self.assertEqual(again.last_seq, {"s": 2})
        self.assertEqual(again.path.read_text().splitlines(), ["r1", "r2"])

    def test_failed_journal_write_leaves_no_torn_entry(self):
        self.audit.store("r1", "s", 1)
        self.fail_fd = self.audit._state_fd
        self.assertRaises(OSError, self.audit.store, "r2", "t", 5)
        self.fail_fd = None
        self.assertTrue(self.audit.store("r3", "u", 7))
        again = self.reopen()
        self.assertEqual(again.last_seq, {"s": 1, "u": 7})
        self.assertEqual(again.path.read_text().splitlines(), ["r1", "r3"])


class PortmapperAnswerTests(unittest.TestCase):
    """A portmapper's GETPORT answer over 65535 is refused, not cut to 16 bits."""

    def answer_with(self, value: int):
        from p2p.oncrpc import portmap

        self.patch(portmap, "pmap_call", lambda *a, **k: defer.succeed(rpc.pack_int(value)))
        self.connected: list = []
        self.patch(
            portmap,
            "TCP4ClientEndpoint",
            lambda reactor, host, port, timeout: self.connected.append(port) or _NoConnect(),
        )
        return portmap

    def test_bogus_ports_refused(self):
        for value in (0x10050, -1, 0x7FFFFFFF):
            portmap = self.answer_with(value)
            endpoint = portmap.PortmapperEndpoint(None, "127.0.0.1", PROG, VERS)
            self.failureResultOf(endpoint.connect(None), portmap.NotRegistered)
            self.assertEqual(self.connected, [], value)

    def test_real_port_used(self):
        portmap = self.answer_with(9091)
        endpoint = portmap.PortmapperEndpoint(None, "127.0.0.1", PROG, VERS)
        self.assertEqual(self.successResultOf(endpoint.connect(None)), "connected")
        self.assertEqual(self.connected, [9091])


class _NoConnect:
    def connect(self, factory):
        return defer.succeed("connected")


GARBAGE = rpc.pack_int(-2)


class ConcurrentWritersTests(unittest.TestCase):
    """TCP clients and UDP datagrams at once into one real logger on loopback."""

    @defer.inlineCallbacks
    def test_tcp_and_udp_writers_one_line_each(self):
        from pathlib import Path

        from twisted.internet import reactor

        from p2p.logger.service import Options, makeService
        from p2p.oncrpc import client

        audit = Path(self.mktemp()).resolve()
        options = Options()
        options.parseOptions(
            [
                *("--listen", "tcp:0:interface=127.0.0.1", "--listen", "udp:0:interface=127.0.0.1"),
                *("--no-rpcbind", "--audit-file", str(audit), "--max-message", "300"),
            ]
        )
        service = makeService(options)
        service.audit.echo = False
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        yield service.ready
        ports = {kind: port.getHost().port for kind, port in service.ports}
        udp = client.RpcDatagramClient("127.0.0.1", ports["udp"])
        udp_port = reactor.listenUDP(0, udp, interface="127.0.0.1")
        self.addCleanup(udp_port.stopListening)
        protos = []
        for _ in range(4):
            proto = yield client.connect(reactor, f"tcp:host=127.0.0.1:port={ports['tcp']}")
            protos.append(proto)
        calls, expected = [], set()
        for i in range(150):
            for c, proto in enumerate(protos):
                text = f"tcp{c} rec {i} " + "é" * (i % 120)
                expected.add(text)
                calls.append(proto.call(PROG, VERS, LOG, rpc.pack_string(text)))
            bad = "two\nlines" if i % 2 else "x" * 301  # -1, or GARBAGE_ARGS (-2 here)
            bad_call = protos[i % 4].call(PROG, VERS, LOG, rpc.pack_string(bad))
            calls.append(bad_call.addErrback(lambda f: f.trap(client.RpcReplyError) and GARBAGE))
            if i < 40:  # UDP without retransmission: few enough not to overflow the socket
                text = f"udp rec {i}"
                expected.add(text)
                calls.append(
                    udp.call(PROG, VERS, LOG, rpc.pack_string(text)).addCallback(
                        lambda reply: reply.body
                    )
                )
        results = yield defer.gatherResults(calls)
        outcomes = [rpc.unpack_int(r) for r in results]
        self.assertEqual((outcomes.count(-1), outcomes.count(-2)), (75, 75))
        lines = audit.read_bytes().decode("utf-8").split("\n")
        self.assertEqual(lines[-1], "")
        self.assertEqual(sorted(lines[:-1]), sorted(expected))
        for proto in protos:
            proto.transport.loseConnection()
            yield proto.lost
        yield service.stopService()
