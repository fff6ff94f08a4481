"""Our client's TLS to the indexer: kept connections, pinned keys, classic fallback.

In process, against a small scripted indexer served through ``p2p.tls.SniffingFactory``
on 127.0.0.1 (TLS and plaintext on one port, as the real indexer); then real
processes: a recording relay between our client and the real indexer sees no
name, and a changed indexer key is refused with the fix.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from p2p import tls, wire
from p2p.client.home import Home
from p2p.client.indexer_client import (
    IndexerClient,
    IndexerError,
    IndexerKeyChanged,
    ReplyCut,
    UnknownOperation,
)
from tests.recording_relay import RecordingRelay
from tests.support import deadline, poll_until
from tests.test_client_e2e import ShellProcess, Stack, new_key_file
from tests.test_client_interop import ClassicIndexer

DT = "01/02/2026 03:04:05"


def stamp():
    return defer.succeed(DT)


class _Scripted(protocol.Protocol):
    """Reads requests one after another on one connection; answers each with
    ``factory.answer(fields, peer fingerprint)`` (None: close without a reply)."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.factory.connections.append(self)
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            fields = self.buffer.split(b"\0")
            spec = wire.OPS_BY_BYTES.get(fields[0])
            if spec is None and len(fields) > 1:
                self.transport.loseConnection()  # unknown op: no reply byte
                return
            wanted = 1 + len(spec.fields) if spec else None
            if wanted is None or len(fields) - 1 < wanted:
                return
            request, self.buffer = fields[:wanted], b"\0".join(fields[wanted:])
            fingerprint = tls.peer_fingerprint(self.transport)
            self.factory.requests.append((request, fingerprint, self))
            reply = self.factory.answer(request, fingerprint)
            if reply is None:
                self.transport.loseConnection()
                return
            self.transport.write(reply)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


class ScriptedIndexer(protocol.ServerFactory):
    protocol = _Scripted

    def __init__(self) -> None:
        self.connections: list[_Scripted] = []
        self.requests: list[tuple[list[bytes], str | None, _Scripted]] = []
        self.answer = lambda fields, fingerprint: (
            b"\x00" + (wire.encode_listing([]) if fields[0].startswith(b"LIST") else b"")
        )


class InProcessTestCase(TestCase):
    def setUp(self) -> None:
        self.indexer_identity = tls.Identity.generate()
        self.scripted = ScriptedIndexer()
        self.port = self.listen(self.indexer_identity)
        self.home = Home(self.mktemp())
        self.notes: list[str] = []

    def listen(self, identity: tls.Identity, factory=None) -> int:
        sniffing = tls.SniffingFactory(factory or self.scripted, tls.server_options(identity))
        listening = reactor.listenTCP(0, sniffing, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return listening.getHost().port

    def client(self, port: int | None = None, **kw) -> IndexerClient:
        kw.setdefault("home", self.home)
        client = IndexerClient(
            "127.0.0.1", port or self.port, stamp, timeout=5, note=self.notes.append, **kw
        )
        self.addCleanup(client.close)
        return client


class KeptConnectionTests(InProcessTestCase):
    @defer.inlineCallbacks
    def test_one_connection_per_identity_presented(self) -> None:
        alice = self.home.create_identity("alice")
        client = self.client()
        for user in ("alice", "bob", "alice", "bob", "alice"):
            result = yield deadline(client.request("LIST_USERS", user))
            self.assertEqual(result, (0, []))
        self.assertFalse(client.classic)
        # Two connections: alice's (her certificate), and an anonymous one for bob.
        self.assertEqual(len(self.scripted.connections), 2)
        seen = [(fields[2], fp) for fields, fp, _ in self.scripted.requests]
        self.assertEqual(
            seen,
            [
                (b"alice", alice.fingerprint),
                (b"bob", None),
                (b"alice", alice.fingerprint),
                (b"bob", None),
                (b"alice", alice.fingerprint),
            ],
        )
        # An identity given explicitly (REGISTER's new one) gets its own connection.
        new = tls.Identity.generate()
        yield deadline(client.request("REGISTER", "carol", identity=new))
        self.assertEqual(self.scripted.requests[-1][1], new.fingerprint)
        self.assertEqual(len(self.scripted.connections), 3)

    @defer.inlineCallbacks
    def test_requests_wait_their_turn_on_one_connection(self) -> None:
        self.scripted.answer = lambda fields, fingerprint: b""  # replies come from the test
        client = self.client()
        first = client.request("PUBLISH", "bob", "a.txt", "one")
        second = client.request("LIST_CONTENT", "bob", "bob")
        yield deadline(_until(lambda: len(self.scripted.requests) == 1))
        conn = self.scripted.requests[0][2]
        self.assertEqual(len(self.scripted.requests), 1)  # the second waits for the first reply
        conn.transport.write(b"\x03")
        self.assertEqual((yield deadline(first)), (3, None))
        yield deadline(_until(lambda: len(self.scripted.requests) == 2))
        self.assertIs(self.scripted.requests[1][2], conn)
        conn.transport.write(b"\x00" + wire.encode_listing([("a.txt", "one"), ("b", "two")]))
        self.assertEqual((yield deadline(second)), (0, [("a.txt", "one"), ("b", "two")]))

    @defer.inlineCallbacks
    def test_idle_connection_closed_then_a_new_one(self) -> None:
        client = self.client(idle=0.05)
        yield deadline(client.request("REGISTER", "bob"))
        first = self.scripted.connections[0]
        yield deadline(first.closed)  # closed by the client after `idle` seconds unused
        yield deadline(client.request("REGISTER", "bob"))
        self.assertEqual(len(self.scripted.connections), 2)

    @defer.inlineCallbacks
    def test_connection_closed_by_the_indexer_while_idle(self) -> None:
        client = self.client()
        yield deadline(client.request("REGISTER", "bob"))
        first = self.scripted.connections[0]
        first.transport.loseConnection()
        yield deadline(first.closed)
        result = yield deadline(client.request("REGISTER", "bob"))
        self.assertEqual(result, (0, None))
        self.assertEqual(len(self.scripted.connections), 2)

    @defer.inlineCallbacks
    def test_listing_peers_and_cut_or_unknown(self) -> None:
        fp = "ab" * 32
        self.scripted.answer = lambda fields, _fp: (
            b"\x00"
            + wire.encode_listing(
                [("alice", "127.0.0.1", 4242, fp), ("old", "10.0.0.1", 7, wire.UNCLAIMED)]
            )
        )
        client = self.client()
        result = yield deadline(client.request("LIST_PEERS", "bob"))
        self.assertEqual(
            result, (0, [("alice", "127.0.0.1", "4242", fp), ("old", "10.0.0.1", "7", "-")])
        )
        # Closed without a reply byte, on a fresh connection: an extension op is unknown,
        # a classic op's reply was cut.
        self.scripted.answer = lambda fields, _fp: None
        yield client.close()
        with self.assertRaises(UnknownOperation):
            yield deadline(client.request("LIST_PEERS", "bob"))
        with self.assertRaises(ReplyCut):
            yield deadline(client.request("LIST_USERS", "bob"))

    @defer.inlineCallbacks
    def test_bytes_after_a_reply_drop_the_connection(self) -> None:
        self.scripted.answer = lambda fields, _fp: b"\x00\x00"
        client = self.client()
        result = yield deadline(client.request("REGISTER", "bob"))
        self.assertEqual(result, (0, None))
        yield deadline(self.scripted.connections[0].closed)

    @defer.inlineCallbacks
    def test_silent_indexer_times_out(self) -> None:
        self.scripted.answer = lambda fields, _fp: b""
        client = self.client()
        client.timeout = 0.2
        with self.assertRaises(IndexerError):
            yield deadline(client.request("REGISTER", "bob"))
        yield deadline(self.scripted.connections[0].closed)


class PinningTests(InProcessTestCase):
    @defer.inlineCallbacks
    def test_pinned_on_first_use_and_refused_when_changed(self) -> None:
        client = self.client()
        yield deadline(client.request("REGISTER", "bob"))
        fingerprint = self.indexer_identity.fingerprint
        self.assertEqual(self.home.pinned_indexer("127.0.0.1", self.port), fingerprint)
        self.assertEqual(
            self.home.known_indexers_file.read_text(), f"127.0.0.1:{self.port} {fingerprint}\n"
        )
        self.assertEqual(len(self.notes), 1)
        self.assertIn(fingerprint, self.notes[0])
        self.assertIn(str(self.home.known_indexers_file), self.notes[0])
        yield deadline(client.request("REGISTER", "alice"))  # another connection: no new note
        self.assertEqual(len(self.notes), 1)
        yield client.close()

        # Another indexer on the same host:port entry: refused, nothing sent.
        impostor = tls.Identity.generate()
        port = self.listen(impostor)
        self.home.pin_indexer("127.0.0.1", port, fingerprint)
        sent = len(self.scripted.requests)
        client = self.client(port)
        with self.assertRaises(IndexerKeyChanged) as caught:
            yield deadline(client.request("REGISTER", "mallory"))
        text = str(caught.exception)
        for part in (impostor.fingerprint, fingerprint, str(self.home.known_indexers_file)):
            self.assertIn(part, text)
        self.assertIn(f"remove the line '127.0.0.1:{port} {fingerprint}'", text)
        self.assertIn(f"--indexer-fingerprint {impostor.fingerprint}", text)
        self.assertEqual(len(self.scripted.requests), sent)
        self.assertFalse(client.classic)
        self.assertEqual(self.notes[-1], text)
        # Given explicitly, the new key is accepted and pinned in place of the old one.
        client = self.client(port, fingerprint=impostor.fingerprint)
        yield deadline(client.request("REGISTER", "mallory"))
        self.assertEqual(self.home.pinned_indexer("127.0.0.1", port), impostor.fingerprint)
        self.assertIn("pinned key", self.notes[-1])

    @defer.inlineCallbacks
    def test_explicit_fingerprint_refuses_another_key(self) -> None:
        client = self.client(fingerprint="0" * 64)
        with self.assertRaises(IndexerKeyChanged) as caught:
            yield deadline(client.request("REGISTER", "bob"))
        self.assertIn("--indexer-fingerprint", str(caught.exception))
        self.assertEqual(self.scripted.requests, [])
        self.assertIsNone(self.home.pinned_indexer("127.0.0.1", self.port))


class ClassicFallbackTests(InProcessTestCase):
    def classic_port(self) -> tuple[ClassicIndexer, int]:
        classic = ClassicIndexer()
        listening = reactor.listenTCP(0, classic, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return classic, listening.getHost().port

    @defer.inlineCallbacks
    def test_plaintext_with_one_note(self) -> None:
        classic, port = self.classic_port()
        client = self.client(port)
        self.assertFalse(client.classic)
        result = yield deadline(client.request("REGISTER", "bob"))
        self.assertEqual(result, (0, None))
        self.assertTrue(client.classic)
        result = yield deadline(client.request("LIST_CONTENT", "bob", "bob"))
        self.assertEqual(result, (2, None))
        self.assertEqual(len(classic.requests), 2)
        self.assertEqual(len(self.notes), 1)
        self.assertIn("not protected", self.notes[0])
        self.assertIsNone(self.home.pinned_indexer("127.0.0.1", port))
        # LIST_PEERS is not known there: closed unanswered, a distinct failure.
        with self.assertRaises(UnknownOperation):
            yield deadline(client.request("LIST_PEERS", "bob"))

    @defer.inlineCallbacks
    def test_a_handshake_left_unanswered_times_out_into_plaintext(self) -> None:
        classic, port = self.classic_port()
        real = classic.buildProtocol

        def build(addr):
            proto = real(addr)
            serve = proto.dataReceived
            proto.dataReceived = lambda data: None if data[:1] == b"\x16" else serve(data)
            return proto

        classic.buildProtocol = build
        client = self.client(port)
        client.timeout = 0.3
        result = yield deadline(client.request("REGISTER", "bob"))
        self.assertEqual(result, (0, None))
        self.assertTrue(client.classic)
        self.assertEqual(len(self.notes), 1)

    @defer.inlineCallbacks
    def test_no_fallback_once_the_key_is_pinned(self) -> None:
        classic, port = self.classic_port()
        self.home.pin_indexer("127.0.0.1", port, "c" * 64)
        client = self.client(port)
        with self.assertRaises(IndexerError) as caught:
            yield deadline(client.request("REGISTER", "bob"))
        self.assertIn("pinned", str(caught.exception))
        self.assertFalse(client.classic)
        self.assertEqual(classic.requests, [])


def _until(condition) -> defer.Deferred:
    return poll_until(condition, what="the request to arrive")


# --- real processes --------------------------------------------------------------------


class RecordedTrafficTests(TestCase):
    @defer.inlineCallbacks
    def test_a_listener_on_the_path_learns_no_name(self) -> None:
        stack = Stack(self)
        yield stack.start_indexer()
        relay = RecordingRelay(self, "127.0.0.1", stack.port)
        share = Path(self.mktemp())
        share.mkdir()
        (share / "quarterly-report.txt").write_bytes(b"numbers")
        alice = ShellProcess(self, "alice", relay.listening_port, stack.wsdl, share=share)
        user, name, text = "alice-wonderland", "quarterly-report.txt", "confidential figures"
        yield alice.check(f"REGISTER {user}", "c> REGISTER OK")
        yield alice.check(f"CONNECT {user}", "c> CONNECT OK")
        yield alice.check(f"PUBLISH {name} {text}", "c> PUBLISH OK")
        yield alice.check(f"LIST_CONTENT {user}", "c> LIST_CONTENT OK", f'\t{name} 7 "{text}"')
        listing = yield alice.run("LIST_USERS", 2)
        self.assertEqual(listing[0], "c> LIST_USERS OK")
        self.assertTrue(listing[1].startswith(f"\t{user} 127.0.0.1 "), listing)
        yield alice.check(f"DELETE {name}", "c> DELETE OK")
        yield alice.check(f"DISCONNECT {user}", "c> DISCONNECT OK")
        captured = bytes(relay.captured)
        self.assertGreater(len(captured), 1000)  # it did go through the relay
        self.assertEqual(captured[0], wire.TLS_HANDSHAKE)
        for secret in (user, name, text, "PUBLISH", "LIST_CONTENT", "REGISTER"):
            self.assertNotIn(secret.encode(), captured, secret)
        self.assertFalse(any("does not speak TLS" in line for line in alice.proc.errlines))


class ChangedKeyTests(TestCase):
    @defer.inlineCallbacks
    def test_restarted_with_another_key_refused_then_pinned_explicitly(self) -> None:
        stack = Stack(self)
        yield stack.start_indexer()
        first = stack.fingerprint
        a = stack.shell("alice")
        yield a.check("REGISTER alice", "c> REGISTER OK")
        pinned = [line for line in a.proc.errlines if "first contact" in line]
        self.assertEqual(len(pinned), 1, a.proc.output())
        self.assertIn(first, pinned[0])
        known = a.home / "known_indexers"
        self.assertEqual(known.read_text(), f"127.0.0.1:{stack.port} {first}\n")
        # The same address, another key (a new machine, or an impostor).
        yield stack.indexer.stop()
        yield stack.start_indexer(tls_key=new_key_file(self))
        second = stack.fingerprint
        self.assertNotEqual(first, second)
        yield a.check("REGISTER alice", "c> REGISTER FAIL")
        warning = [line for line in a.proc.errlines if line.startswith("WARNING")]
        self.assertEqual(len(warning), 1, a.proc.output())
        self.assertIn(f"remove the line '127.0.0.1:{stack.port} {first}' from {known}", warning[0])
        self.assertIn(f"--indexer-fingerprint {second}", warning[0])
        yield a.check("UNREGISTER alice", "c> UNREGISTER FAIL")  # each refusal says it again
        self.assertEqual(sum(line.startswith("WARNING") for line in a.proc.errlines), 2)
        self.assertIsNotNone(Home(a.home).identity("alice"))  # UNREGISTER did not happen
        self.assertEqual(known.read_text(), f"127.0.0.1:{stack.port} {first}\n")
        # The fix: the new key given explicitly (same home), then remembered.
        b = stack.shell("alice", home=a.home, extra=["--indexer-fingerprint", second.upper()])
        yield b.check("REGISTER alice", "c> REGISTER OK")
        yield b.quit()
        self.assertEqual(known.read_text(), f"127.0.0.1:{stack.port} {second}\n")
        c = stack.shell("alice", home=a.home)
        yield c.check("REGISTER alice", "c> USERNAME IN USE")
        self.assertFalse(any("CHANGED" in line for line in c.proc.errlines), c.proc.output())
