"""Unit tests of the ONC-RPC codec, record marking, dispatch and the LOG program."""

from __future__ import annotations

import json

import xdrlib3
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from p2p import wire
from p2p.logcontract import relay_machinename
from p2p.logger.audit import AuditLog
from p2p.logger.program import LoggerProgram
from p2p.oncrpc import rpc
from p2p.oncrpc.record import Oversized, RecordReader, encode_record
from p2p.oncrpc.server import (
    Dispatcher,
    RpcDatagramProtocol,
    RpcStreamFactory,
    RpcStreamProtocol,
)

PROG = wire.LOGGER_PROGRAM
VERS = wire.LOGGER_VERSION
LOG = wire.LOGGER_PROC_LOG


def log_call(xid: int, message: bytes | str, cred: rpc.OpaqueAuth = rpc.NULL_AUTH) -> bytes:
    return rpc.encode_call(rpc.Call(xid, PROG, VERS, LOG, cred), rpc.pack_string(message))


class CodecTests(unittest.TestCase):
    def test_call_round_trip(self):
        cred = rpc.AuthSys("host", 1000, 100, (4, 5), stamp=7).encode()
        call = rpc.Call(42, PROG, VERS, LOG, cred)
        data = rpc.encode_call(call, rpc.pack_string("hello"))
        decoded, args = rpc.decode_call(data)
        self.assertEqual(decoded, call)
        self.assertEqual(rpc.unpack_string(args, 100), b"hello")
        self.assertEqual(rpc.AuthSys.decode(decoded.cred.body).gids, (4, 5))

    def test_reply_round_trips(self):
        replies = [
            rpc.success(1, rpc.pack_int(-1)),
            rpc.accept_error(2, rpc.PROG_UNAVAIL),
            rpc.accept_error(3, rpc.PROG_MISMATCH, 1, 3),
            rpc.accept_error(4, rpc.PROC_UNAVAIL),
            rpc.accept_error(5, rpc.GARBAGE_ARGS),
            rpc.accept_error(6, rpc.SYSTEM_ERR),
            rpc.rpc_mismatch(7),
            rpc.auth_error(8, rpc.AUTH_BADCRED),
        ]
        for reply in replies:
            self.assertEqual(rpc.decode_reply(rpc.encode_reply(reply)), reply)
        self.assertEqual(rpc.unpack_int(replies[0].body), -1)

    def test_rpc_mismatch_bytes(self):
        data = rpc.encode_reply(rpc.rpc_mismatch(9))
        # xid, REPLY, MSG_DENIED, RPC_MISMATCH, low 2, high 2
        self.assertEqual(
            data, bytes.fromhex("00000009 00000001 00000001 00000000 00000002 00000002")
        )

    def test_truncated_messages(self):
        data = log_call(1, "hello")
        header_len = len(data) - len(rpc.pack_string("hello"))
        for cut in range(header_len):
            self.assertRaises(rpc.MessageError, rpc.decode_call, data[:cut])
        for cut in range(len(rpc.encode_reply(rpc.success(1, b"")))):
            self.assertRaises(
                rpc.MessageError, rpc.decode_reply, rpc.encode_reply(rpc.success(1, b""))[:cut]
            )

    def test_reply_is_not_a_call(self):
        self.assertRaises(rpc.MessageError, rpc.decode_call, rpc.encode_reply(rpc.success(1, b"")))

    def test_oversized_auth_rejected(self):
        data = bytearray(rpc.encode_call(rpc.Call(1, PROG, VERS, LOG)))
        data[28:32] = (401).to_bytes(4, "big")  # cred body length
        self.assertRaises(rpc.MessageError, rpc.decode_call, bytes(data) + b"\0" * 420)

    def test_unpack_string_checks(self):
        self.assertRaises(rpc.TooLong, rpc.unpack_string, rpc.pack_string("x" * 10), 9)
        self.assertRaises(rpc.MessageError, rpc.unpack_string, rpc.pack_string("abc")[:-2], 9)
        self.assertRaises(
            rpc.MessageError, rpc.unpack_string, rpc.pack_string("abc") + b"\0" * 4, 9
        )
        self.assertRaises(rpc.MessageError, rpc.unpack_string, b"\0\0\0\3abc\1", 9)
        self.assertEqual(rpc.unpack_string(rpc.pack_string(""), 9), b"")


class RecordTests(unittest.TestCase):
    def test_multi_fragment(self):
        data = bytes(range(256)) * 4
        wire_bytes = encode_record(data, fragment_size=100)
        self.assertEqual(len(wire_bytes), len(data) + 11 * 4)  # 11 fragments
        reader = RecordReader(4096)
        got = []
        for i in range(len(wire_bytes)):  # one byte per read
            got += reader.feed(wire_bytes[i : i + 1])
        self.assertEqual(got, [data])

    def test_several_records_in_one_read(self):
        records = [b"a" * 5, b"", b"bcdefgh", b"x" * 1000]
        stream = b"".join(encode_record(r, 3) for r in records)
        self.assertEqual(RecordReader(4096).feed(stream), records)

    def test_zero_length_fragments(self):
        stream = (
            (0).to_bytes(4, "big")
            + (3).to_bytes(4, "big")
            + b"abc"
            + (0).to_bytes(4, "big")
            + (0x80000000).to_bytes(4, "big")
        )
        self.assertEqual(RecordReader(100).feed(stream), [b"abc"])

    def test_oversized_is_skipped_with_bounded_memory(self):
        reader = RecordReader(1000, keep=16)
        big = b"H" * 16 + b"z" * 100_000
        stream = encode_record(big, 7000) + encode_record(b"next")
        out = []
        for i in range(0, len(stream), 4096):
            out += reader.feed(stream[i : i + 4096])
            self.assertLess(reader.buffered, 1000 + 4096 + 8)
        self.assertEqual(out, [Oversized(b"H" * 16, len(big)), b"next"])


class DispatchTests(unittest.TestCase):
    def setUp(self):
        self.audit = AuditLog(self.mktemp(), echo=False)
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.program = LoggerProgram(self.audit, PROG, max_message=64)
        self.dispatcher = Dispatcher([self.program.program()])

    def answer(self, data) -> rpc.Reply:
        out = []
        self.dispatcher.handle(data).addCallback(out.append)
        return rpc.decode_reply(out[0])

    def lines(self) -> list[str]:
        return self.audit.path.read_text().splitlines()

    def test_log_stores_before_reply(self):
        reply = self.answer(log_call(5, "alice REGISTER 01/01/2026 10:00:00"))
        self.assertTrue(reply.ok)
        self.assertEqual(reply.xid, 5)
        self.assertEqual(rpc.unpack_int(reply.body), 0)
        self.assertEqual(self.lines(), ["alice REGISTER 01/01/2026 10:00:00"])

    def test_null(self):
        reply = self.answer(rpc.encode_call(rpc.Call(1, PROG, VERS, 0)))
        self.assertTrue(reply.ok)
        self.assertEqual(reply.body, b"")

    def test_statuses(self):
        cases = [
            (rpc.Call(1, PROG + 1, VERS, LOG), rpc.PROG_UNAVAIL),
            (rpc.Call(2, PROG, 7, LOG), rpc.PROG_MISMATCH),
            (rpc.Call(3, PROG, VERS, 9), rpc.PROC_UNAVAIL),
        ]
        for call, stat in cases:
            reply = self.answer(rpc.encode_call(call, rpc.pack_string("x")))
            self.assertEqual((reply.xid, reply.stat, reply.accept_stat), (call.xid, 0, stat))
        reply = self.answer(rpc.encode_call(rpc.Call(2, PROG, 7, LOG)))
        self.assertEqual((reply.low, reply.high), (1, 1))
        self.assertEqual(self.lines(), [])

    def test_wrong_rpcvers(self):
        reply = self.answer(rpc.encode_call(rpc.Call(4, PROG, VERS, LOG, rpcvers=3)))
        self.assertEqual(
            (reply.xid, reply.stat, reply.reject_stat, reply.low, reply.high),
            (4, rpc.MSG_DENIED, rpc.RPC_MISMATCH, 2, 2),
        )

    def test_auth(self):
        bad_sys = rpc.OpaqueAuth(rpc.AUTH_SYS, b"\0\0\0\1")
        reply = self.answer(log_call(1, "x", bad_sys))
        self.assertEqual((reply.stat, reply.auth_stat), (rpc.MSG_DENIED, rpc.AUTH_BADCRED))
        reply = self.answer(log_call(2, "x", rpc.OpaqueAuth(6, b"gss")))
        self.assertEqual((reply.stat, reply.auth_stat), (rpc.MSG_DENIED, rpc.AUTH_REJECTEDCRED))
        reply = self.answer(log_call(3, "ok", rpc.AuthSys("c-client").encode()))
        self.assertTrue(reply.ok)
        self.assertEqual(self.lines(), ["ok"])

    def test_garbage_args(self):
        base = rpc.encode_call(rpc.Call(1, PROG, VERS, LOG))
        for args in (b"", b"\0\0", b"\0\0\0\5ab", rpc.pack_string("a") + b"junk"):
            reply = self.answer(base + args)
            self.assertEqual(reply.accept_stat, rpc.GARBAGE_ARGS, args)
        reply = self.answer(rpc.encode_call(rpc.Call(1, PROG, VERS, 0)) + b"\0\0\0\0")
        self.assertEqual(reply.accept_stat, rpc.GARBAGE_ARGS)
        self.assertEqual(self.lines(), [])

    def test_over_long_message_not_stored(self):
        reply = self.answer(log_call(1, "y" * 65))
        self.assertEqual(reply.accept_stat, rpc.GARBAGE_ARGS)
        self.assertTrue(self.answer(log_call(2, "y" * 64)).ok)
        self.assertEqual(self.lines(), ["y" * 64])

    def test_bad_text_is_error(self):
        for message in (b"two\nlines", b"", b"\xff\xfe"):
            reply = self.answer(log_call(1, message))
            self.assertEqual(rpc.unpack_int(reply.body), -1)
        self.assertEqual(self.lines(), [])

    def test_system_err(self):
        def broken(call, args, peer):
            raise RuntimeError("boom")

        self.program.log = broken
        self.dispatcher = Dispatcher([self.program.program()])
        reply = self.answer(log_call(1, "x"))
        self.assertEqual(reply.accept_stat, rpc.SYSTEM_ERR)
        self.flushLoggedErrors(RuntimeError)

    def test_relay_dedup(self):
        def relay(seq, text):
            cred = rpc.AuthSys(relay_machinename("s1", seq)).encode()
            return rpc.unpack_int(self.answer(log_call(seq, text, cred)).body)

        self.assertEqual([relay(1, "a"), relay(2, "b"), relay(2, "b"), relay(1, "a")], [0] * 4)
        self.assertEqual(relay(5, "c"), 0)
        self.assertEqual(self.lines(), ["a", "b", "c"])

    def test_relay_failure_blocks_later_seqs(self):
        """A record that could not be stored is not overtaken by the sender's next ones."""

        def relay(seq, text):
            cred = rpc.AuthSys(relay_machinename("s1", seq)).encode()
            return rpc.unpack_int(self.answer(log_call(seq, text, cred)).body)

        real = self.audit.store
        self.audit.store = lambda *a: (_ for _ in ()).throw(OSError(28, "disk full"))
        self.assertEqual(relay(1, "a"), -1)
        self.audit.store = real
        self.assertEqual(relay(2, "b"), -1)  # refused: 1 comes first
        self.assertEqual(rpc.unpack_int(self.answer(log_call(9, "other client")).body), 0)
        self.assertEqual([relay(1, "a"), relay(2, "b")], [0, 0])
        self.assertEqual(self.lines(), ["other client", "a", "b"])
        self.flushLoggedErrors()


class AuditTests(unittest.TestCase):
    def test_state_survives_reopen(self):
        path = self.mktemp()
        audit = AuditLog(path, echo=False)
        audit.open()
        self.assertTrue(audit.store("r1", "s", 1))
        self.assertTrue(audit.store("r2", "s", 2))
        audit.close()
        again = AuditLog(path, echo=False)
        again.open()
        self.addCleanup(again.close)
        self.assertFalse(again.store("r2", "s", 2))
        self.assertTrue(again.store("r3", "s", 3))
        self.assertEqual(again.path.read_text(), "r1\nr2\nr3\n")

    def test_redo_after_kill_between_journal_and_audit(self):
        """The journal line was written, the audit line was not: the record is completed."""
        path = self.mktemp()
        audit = AuditLog(path, echo=False)
        audit.open()
        audit.store("r1", "s", 1)
        audit.close()
        size = audit.path.stat().st_size
        with open(audit.state_path, "a") as f:
            f.write(json.dumps({"s": "s", "q": 2, "o": size, "r": "r2"}) + "\n")
            f.write('{"s": "s", "q": 3, "o"')  # torn line: never stored
        again = AuditLog(path, echo=False)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual(again.path.read_text(), "r1\nr2\n")
        self.assertFalse(again.store("r2", "s", 2))
        self.assertTrue(again.store("r3", "s", 3))
        self.assertEqual(again.path.read_text(), "r1\nr2\nr3\n")

    def test_compaction(self):
        audit = AuditLog(self.mktemp(), echo=False, compact_at=200)
        audit.open()
        self.addCleanup(audit.close)
        for seq in range(1, 50):
            audit.store(f"record {seq}", "sender", seq)
        self.assertLess(audit.state_path.stat().st_size, 400)
        self.assertEqual(len(audit.path.read_text().splitlines()), 49)


class StreamTests(unittest.TestCase):
    def setUp(self):
        self.audit = AuditLog(self.mktemp(), echo=False)
        self.audit.open()
        self.addCleanup(self.audit.close)
        dispatcher = Dispatcher([LoggerProgram(self.audit, PROG, max_message=100).program()])
        self.proto = RpcStreamProtocol(dispatcher, max_record=100 + rpc.MAX_CALL_HEADER)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def replies(self) -> list[rpc.Reply]:
        out = RecordReader(1 << 16).feed(self.transport.value())
        return [rpc.decode_reply(r) for r in out]

    def test_pipelined_multi_fragment_records(self):
        stream = b"".join(encode_record(log_call(i, f"line {i}"), 5) for i in range(10))
        self.proto.dataReceived(stream)
        replies = self.replies()
        self.assertEqual([r.xid for r in replies], list(range(10)))
        self.assertTrue(all(rpc.unpack_int(r.body) == 0 for r in replies))
        self.assertEqual(self.audit.path.read_text().splitlines(), [f"line {i}" for i in range(10)])

    def test_oversized_record_answered_garbage(self):
        big = log_call(77, "z" * 5000)
        self.proto.dataReceived(encode_record(big, 1000) + encode_record(log_call(78, "after")))
        replies = self.replies()
        self.assertEqual([(r.xid, r.accept_stat) for r in replies], [(77, 4), (78, 0)])
        self.assertEqual(self.audit.path.read_text(), "after\n")

    def test_partial_record_times_out_idle_does_not(self):
        clock = task.Clock()
        self.proto.callLater = clock.callLater
        self.proto.dataReceived(encode_record(log_call(1, "whole")))
        clock.advance(3600)  # idle between records: kept open
        self.assertFalse(self.transport.disconnecting)
        self.proto.dataReceived(encode_record(log_call(2, "cut"))[:10])
        clock.advance(self.proto.partial_timeout - 1)
        self.assertFalse(self.transport.disconnecting)
        clock.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_connection_cap(self):
        factory = RpcStreamFactory(Dispatcher([]), 1000, max_connections=2)
        first, second = factory.buildProtocol(None), factory.buildProtocol(None)
        self.assertIsNone(factory.buildProtocol(None))
        first.makeConnection(StringTransport())
        second.makeConnection(StringTransport())
        first.connectionLost()
        self.assertIsNotNone(factory.buildProtocol(None))

    def test_truncated_header_dropped(self):
        self.proto.dataReceived(encode_record(b"\0\0\0\1\0\0"))
        self.proto.dataReceived(encode_record(log_call(3, "ok")))
        self.assertEqual([r.xid for r in self.replies()], [3])


class FakeUDPTransport:
    def __init__(self):
        self.sent = []

    def write(self, data, addr):
        self.sent.append((data, addr))


class DatagramTests(unittest.TestCase):
    def test_retransmission_answered_from_cache(self):
        audit = AuditLog(self.mktemp(), echo=False)
        audit.open()
        self.addCleanup(audit.close)
        proto = RpcDatagramProtocol(Dispatcher([LoggerProgram(audit, PROG).program()]))
        proto.transport = FakeUDPTransport()
        call = log_call(11, "once")
        client = ("127.0.0.1", 5555)
        proto.datagramReceived(call, client)
        proto.datagramReceived(call, client)  # retransmission
        proto.datagramReceived(call, ("127.0.0.1", 5556))  # another client, same XID
        proto.datagramReceived(log_call(11, "other call"), client)  # XID reused for a new call
        self.assertEqual(audit.path.read_text(), "once\nonce\nother call\n")
        sent = proto.transport.sent
        self.assertEqual(len(sent), 4)
        self.assertEqual(sent[0], sent[1])
        self.assertTrue(all(rpc.decode_reply(d).ok for d, _ in sent))

    def test_garbage_datagram_ignored(self):
        proto = RpcDatagramProtocol(Dispatcher([]))
        proto.transport = FakeUDPTransport()
        proto.datagramReceived(b"\1\2", ("127.0.0.1", 1))
        proto.datagramReceived(xdrlib3.Packer().get_buffer(), ("127.0.0.1", 1))
        self.assertEqual(proto.transport.sent, [])
