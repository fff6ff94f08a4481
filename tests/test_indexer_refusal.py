"""A refused request's code reaches a sender that keeps sending.

Closing a socket whose receive buffer still holds unread bytes makes the
kernel send a reset, and a reset can destroy the reply byte still in flight.
The indexer half-closes after its error code and drains what keeps coming for
a moment, so the code arrives; a sender that never stops is cut after that.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from p2p import wire
from tests.support import DEADLINE, deadline
from tests.test_indexer_e2e import DT, start_indexer

FLOOD = 10 * 1024 * 1024


def send_all_then_read(port: int, request: bytes) -> bytes:
    """As a simple blocking client does: send everything, then read the reply.

    Runs in a thread. Reading only after sending is what a reset punishes: the
    reset arrives while the client is still sending, and its error is reported
    before the code that came first.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        try:
            sock.sendall(request + b"x" * FLOOD)
        except OSError as exc:
            return f"send failed: {exc}".encode()
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError as exc:
            return reply + f" recv failed: {exc}".encode()
        return reply


class RefusedWhileSendingTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.ix = yield start_indexer(self)
        self.assertEqual((yield self.ix.codes(("REGISTER", "alice"))), [0])

    def send(self, request: bytes) -> defer.Deferred:
        return deadline(threads.deferToThread(send_all_then_read, self.ix.port, request))

    @defer.inlineCallbacks
    def test_oversized_field_then_more_bytes(self):
        for _ in range(3):
            reply = yield self.send(wire.encode_fields("PUBLISH", DT, "alice") + b"f" * 300)
            self.assertEqual(reply, bytes([wire.PUBLISH.error]))
        # The indexer is up, serves others, and stored nothing.
        content = yield self.ix.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(content, b"\x02")  # alice is not connected: nothing published

    @defer.inlineCallbacks
    def test_bad_utf8_then_more_bytes(self):
        for _ in range(3):
            reply = yield self.send(wire.encode_fields("REGISTER", DT) + b"\xff\xfe\0")
            self.assertEqual(reply, bytes([wire.REGISTER.error]))
        self.assertEqual((yield self.ix.codes(("REGISTER", "alice"))), [1])


def send_until_cut(port: int, request: bytes) -> tuple[bytes, str]:
    """Send the request, then send without end; (what came back, how sending ended)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(request)
        chunk = b"x" * 65536
        sock.setblocking(False)
        reply = b""
        while True:
            try:
                sock.send(chunk)
            except BlockingIOError:
                pass
            except OSError as exc:
                ended = type(exc).__name__
                break
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                ended = type(exc).__name__
                break
            if not data:
                continue  # the server's FIN after its code: it still reads, for a while
            reply += data
        return reply, ended


class SenderThatNeverStopsTests(TestCase):
    @defer.inlineCallbacks
    def test_cut_after_the_drain_with_its_code(self):
        ix = yield start_indexer(self)
        request = wire.encode_fields("REGISTER", DT) + b"u" * 300
        reply, ended = yield deadline(threads.deferToThread(send_until_cut, ix.port, request))
        self.assertEqual(reply, bytes([wire.REGISTER.error]))
        self.assertIn(ended, ("ConnectionResetError", "BrokenPipeError"))
        self.assertEqual((yield ix.codes(("REGISTER", "alice"))), [0])
