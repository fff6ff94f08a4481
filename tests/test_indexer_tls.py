"""The indexer over TLS: several requests per connection, identities, claims, ``--classic``.

First over in-memory transports (a StringTransport that says it is TLS), then
against a real ``twistd p2p-indexer`` with real TLS and raw classic sockets.
"""

from __future__ import annotations

import stat
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from p2p import tls, wire
from p2p.indexer import protocol as protocol_module
from p2p.indexer.directory import CLASSIC_POLICIES
from p2p.indexer.service import Options, makeService
from tests.support import deadline, poll_until, spawn_twistd
from tests.test_indexer_e2e import start_indexer
from tests.test_indexer_protocol import DT, Harness

ALICE = tls.Identity.generate()
MALLORY = tls.Identity.generate()


@implementer(ISSLTransport)
class FakeTLSTransport(StringTransport):
    """A memory transport that is TLS as far as the indexer can tell."""

    def __init__(self, cert=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cert = cert

    def getPeerCertificate(self):
        return self.cert


def request(op: str, user: str, *args) -> bytes:
    return wire.encode_request(op, DT, user, *args)


def kept_connection(factory, identity: tls.Identity | None):
    """A kept (TLS) connection to ``factory`` presenting ``identity``: protocol, transport."""
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = FakeTLSTransport(
        identity.cert if identity else None,
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    proto.makeConnection(transport)
    return proto, transport


class KeptConnection(TestCase):
    """One TLS connection, many requests."""

    def setUp(self) -> None:
        self.h = Harness(self)
        self.proto, self.transport = self.connect(ALICE)

    def connect(self, identity: tls.Identity | None):
        return kept_connection(self.h.factory, identity)

    def exchange(self, data: bytes, proto=None, transport=None) -> bytes:
        """Send ``data``, end the reactor turn, return (and forget) what came back."""
        proto, transport = proto or self.proto, transport or self.transport
        proto.dataReceived(data)
        self.h.clock.advance(0)
        reply = transport.value()
        transport.clear()
        return reply

    def test_requests_one_after_another(self) -> None:
        self.assertEqual(self.exchange(request("REGISTER", "alice")), b"\0")
        self.assertEqual(self.exchange(request("CONNECT", "alice", 5000)), b"\0")
        self.assertEqual(
            self.exchange(request("LIST_PEERS", "alice")),
            b"\0" + wire.encode_listing([("alice", "127.0.0.1", 5000, ALICE.fingerprint)]),
        )
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.h.factory.open_connections, 1)
        self.assertEqual(self.h.store.user("alice").identity, ALICE.fingerprint)

    def test_reading_paused_while_a_request_waits(self) -> None:
        self.proto.dataReceived(request("REGISTER", "alice"))
        self.assertEqual(self.transport.producerState, "paused")
        self.h.clock.advance(0)
        self.assertEqual(self.transport.value(), b"\0")
        self.assertEqual(self.transport.producerState, "producing")

    def test_pipelined_requests_answered_in_order(self) -> None:
        data = request("REGISTER", "alice") * 2 + request("LIST_USERS", "alice")
        self.proto.dataReceived(data[:-5])
        self.proto.dataReceived(data[-5:])  # arrives while the first waits for its reply
        for _ in range(3):
            self.h.clock.advance(0)
        self.assertEqual(self.transport.value(), b"\0\1\2")  # alice is not connected: 2
        self.assertFalse(self.transport.disconnecting)

    def assertCutAfter(self, seconds: float) -> None:
        """Silent for ``seconds`` from now, the connection is cut; not a moment before."""
        self.h.clock.advance(seconds - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.h.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_idle_timeout_between_requests(self) -> None:
        self.exchange(request("REGISTER", "alice"))
        self.assertCutAfter(wire.TLS_IDLE_TIMEOUT)
        self.assertIsNone(self.transport.producer)  # closed cleanly: TLS waits for no producer

    def test_usual_timeout_within_a_request(self) -> None:
        self.exchange(request("REGISTER", "alice"))
        self.h.clock.advance(wire.TLS_IDLE_TIMEOUT - 1)
        self.proto.dataReceived(b"REGISTER\0")  # then silence mid-request
        self.assertCutAfter(wire.DEFAULT_TIMEOUT)

    def test_first_request_has_the_usual_time(self) -> None:
        self.assertCutAfter(wire.DEFAULT_TIMEOUT)

    def test_bad_input_answers_and_closes(self) -> None:
        self.exchange(request("REGISTER", "alice"))
        self.assertEqual(self.exchange(request("CONNECT", "alice", "no port")), b"\3")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)  # TLS closes only without a producer

    def test_unknown_op_closes_without_reply(self) -> None:
        self.assertEqual(self.exchange(b"FROB\0"), b"")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)

    def test_large_reply_chunk_by_chunk_then_next_request(self) -> None:
        """A listing beyond one chunk goes out as the transport takes it; the connection
        then serves the next request."""
        for i in range(700):
            self.h.directory.handle(wire.REGISTER, DT, f"user{i:03}" + "u" * 200, [])
            self.h.directory.handle(
                wire.CONNECT, DT, f"user{i:03}" + "u" * 200, [1000], ("127.0.0.1", 1000)
            )
        listing = b"\0" + self.h.directory.handle(wire.LIST_USERS, DT, "user000" + "u" * 200, [])[1]
        self.assertGreater(len(listing), 2 * protocol_module.REPLY_CHUNK)
        sent = []

        def write(data: bytes) -> None:
            sent.append(data)
            self.proto.pauseProducing()  # the buffer is full after each chunk

        self.transport.write = write
        self.proto.dataReceived(request("LIST_USERS", "user000" + "u" * 200))
        self.h.clock.advance(0)
        self.assertEqual(len(sent), 1)
        self.assertEqual(len(sent[0]), protocol_module.REPLY_CHUNK)
        self.assertEqual(self.transport.producerState, "paused")  # no next request yet
        while self.proto._out is not None:
            self.proto.resumeProducing()
        self.assertEqual(b"".join(sent), listing)
        self.assertEqual(self.transport.producerState, "producing")
        self.proto.resumeProducing()  # nothing more to write
        self.assertEqual(b"".join(sent), listing)
        self.proto.dataReceived(request("REGISTER", "alice"))
        self.h.clock.advance(0)
        self.assertEqual(sent[-1], b"\0")

    def test_identity_claims_and_is_checked(self) -> None:
        self.exchange(request("REGISTER", "alice"))
        self.exchange(request("CONNECT", "alice", 5000))
        other, other_transport = self.connect(MALLORY)
        anonymous, anonymous_transport = self.connect(None)
        plain, plain_transport = self.h.connect()
        for op, args in [("DISCONNECT", ()), ("PUBLISH", ("x", "y")), ("LIST_USERS", ())]:
            code = bytes([wire.OPS[op].error])
            self.assertEqual(
                self.exchange(request(op, "alice", *args), other, other_transport), code
            )
            self.assertEqual(
                self.exchange(request(op, "alice", *args), anonymous, anonymous_transport), code
            )
        self.assertEqual(
            self.exchange(request("DISCONNECT", "alice"), plain, plain_transport), b"\3"
        )
        self.assertEqual(self.h.directory.connected, {"alice": ("127.0.0.1", 5000)})
        self.assertEqual(self.exchange(request("DISCONNECT", "alice")), b"\0")

    def test_stopped_factory_answers_error_and_keeps_serving(self) -> None:
        self.h.factory.stop()
        self.assertEqual(self.exchange(request("REGISTER", "alice")), b"\2")
        self.assertEqual(self.exchange(request("LIST_USERS", "alice")), b"\3")

    def test_connection_counted_once(self) -> None:
        self.exchange(request("REGISTER", "alice"))
        self.exchange(request("REGISTER", "bob"))
        self.assertEqual(self.h.factory.open_connections, 1)
        self.proto.connectionLost(None)
        self.assertEqual(self.h.factory.open_connections, 0)


# --- End to end: a real indexer, real TLS, raw classic sockets -------------------------

#: Strings per listed row after code 0 (the other operations answer one byte).
ROW_WIDTH = {"LIST_USERS": 3, "LIST_PEERS": 4, "LIST_CONTENT": 2}
FINGERPRINT = r"^p2p-indexer: TLS key fingerprint ([0-9a-f]{64})$"


def reply_length(data: bytes, op: str) -> int | None:
    """How long the reply at the start of ``data`` is, or None while it is incomplete."""
    if not data:
        return None
    if data[0] != wire.OK or op not in ROW_WIDTH:
        return 1
    end = data.find(b"\0", 1)
    if end < 0:
        return None
    wanted = int(data[1:end]) * ROW_WIDTH[op]
    while wanted:
        end = data.find(b"\0", end + 1)
        if end < 0:
            return None
        wanted -= 1
    return end + 1


class TLSClient(Protocol):
    """One TLS connection to the indexer: requests one after another, each reply whole."""

    def __init__(self) -> None:
        self.buffer = b""
        self.op = ""
        self.waiting: defer.Deferred | None = None
        self.closed: defer.Deferred = defer.Deferred()

    def request(self, op: str, user: str, *args) -> defer.Deferred:
        self.op, self.waiting = op, defer.Deferred()
        self.transport.write(wire.encode_request(op, DT, user, *args))
        return deadline(self.waiting)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        length = reply_length(self.buffer, self.op)
        if length is not None and self.waiting is not None:
            reply, self.buffer = self.buffer[:length], self.buffer[length:]
            waiting, self.waiting = self.waiting, None
            waiting.callback(reply)

    def connectionLost(self, reason=None) -> None:
        if self.waiting is not None:
            self.waiting.errback(reason)
        self.closed.callback(None)


@defer.inlineCallbacks
def tls_client(testcase: TestCase, port: int, expected: str, identity: tls.Identity | None):
    """A TLS connection that checks the indexer's key and presents ``identity``."""
    endpoint = wrapClientTLS(
        tls.client_options(expected, identity), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    client = yield connectProtocol(endpoint, TLSClient())

    def close() -> defer.Deferred:
        if not client.closed.called:
            client.transport.abortConnection()
        return client.closed

    testcase.addCleanup(close)
    return client


@defer.inlineCallbacks
def codes_over(client: TLSClient, *requests):
    """The first reply byte of each request, sent one after another on ``client``."""
    out = []
    for op, user, *args in requests:
        reply = yield client.request(op, user, *args)
        out.append(reply[0])
    return out


def folder(testcase: TestCase) -> Path:
    """A fresh working folder for an indexer."""
    cwd = Path(testcase.mktemp())
    cwd.mkdir()
    return cwd


@defer.inlineCallbacks
def failed_start(testcase: TestCase, cwd: Path, *options: str):
    """Start an indexer that must exit non-zero; fire with what it printed."""
    process = spawn_twistd(testcase, "p2p-indexer", *options, cwd=cwd)
    code = yield deadline(process.ended)
    testcase.assertNotEqual(code, 0, options)
    return process.output()


@defer.inlineCallbacks
def start(testcase: TestCase, *options: str, cwd: Path | None = None, db: str = "ix.db"):
    """An indexer and its fingerprint."""
    ix = yield start_indexer(testcase, *options, cwd=cwd, db=db)
    match = yield ix.process.wait_for_line(FINGERPRINT)
    return ix, match.group(1)


@defer.inlineCallbacks
def codes_as(testcase: TestCase, port: int, expected: str, identity, *requests):
    """:func:`codes_over` a new TLS connection presenting ``identity``."""
    client = yield tls_client(testcase, port, expected, identity)
    codes = yield codes_over(client, *requests)
    return codes


#: Every operation as alice, with arguments that would otherwise succeed or not matter.
EVERY_OP = [
    ("REGISTER", "alice"),
    ("UNREGISTER", "alice"),
    ("CONNECT", "alice", 6000),
    ("DISCONNECT", "alice"),
    ("PUBLISH", "alice", "evil.txt", "from mallory"),
    ("DELETE", "alice", "a.txt"),
    ("LIST_USERS", "alice"),
    ("LIST_CONTENT", "alice", "alice"),
    ("LIST_PEERS", "alice"),
]
ERRORS = [wire.OPS[op].error for op, *_ in EVERY_OP]


class EndToEnd(TestCase):
    @defer.inlineCallbacks
    def test_claimed_name_answers_only_its_identity(self):
        ix, fp = yield start(self)
        alice = yield tls_client(self, ix.port, fp, ALICE)
        got = yield codes_over(
            alice,
            ("REGISTER", "alice"),
            ("CONNECT", "alice", 5000),
            ("PUBLISH", "alice", "a.txt", "alice's file"),
        )
        self.assertEqual(got, [0, 0, 0])
        # A raw classic socket, one request per connection.
        got = yield ix.codes(*EVERY_OP)
        self.assertEqual(got, ERRORS)
        # TLS with another identity, and TLS without one: every request on one connection.
        got = yield codes_as(self, ix.port, fp, MALLORY, *EVERY_OP)
        self.assertEqual(got, ERRORS)
        got = yield codes_as(self, ix.port, fp, None, *EVERY_OP)
        self.assertEqual(got, ERRORS)
        # Nothing changed: alice listed at her own port, her file as she published it.
        peers = yield alice.request("LIST_PEERS", "alice")
        self.assertEqual(
            peers, b"\0" + wire.encode_listing([("alice", "127.0.0.1", 5000, ALICE.fingerprint)])
        )
        files = yield alice.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(files, b"\0" + wire.encode_listing([("a.txt", "alice's file")]))

    @defer.inlineCallbacks
    def test_unclaimed_names_as_today(self):
        ix, fp = yield start(self)
        got = yield ix.codes(("REGISTER", "bob"), ("CONNECT", "bob", 7000))
        self.assertEqual(got, [0, 0])
        reply = yield ix.request("LIST_USERS", "bob")
        self.assertEqual(reply, b"\0" + wire.encode_listing([("bob", "127.0.0.1", 7000)]))
        anyone = yield tls_client(self, ix.port, fp, MALLORY)
        reply = yield anyone.request("LIST_PEERS", "bob")
        self.assertEqual(
            reply, b"\0" + wire.encode_listing([("bob", "127.0.0.1", 7000, wire.UNCLAIMED)])
        )
        got = yield codes_over(anyone, ("DISCONNECT", "bob"), ("UNREGISTER", "bob"))
        self.assertEqual(got, [0, 0])

    @defer.inlineCallbacks
    def test_pipelined_requests_and_a_large_listing(self):
        """Requests sent all at once are answered in order; a listing of several chunks
        goes out whole and the connection then serves the next request."""
        ix, fp = yield start(self)
        client = yield tls_client(self, ix.port, fp, None)
        names = [f"{i:04}" + "n" * 240 for i in range(600)]
        register = (request("REGISTER", name) + request("CONNECT", name, 9) for name in names)
        client.transport.write(b"".join(register))
        yield poll_until(lambda: len(client.buffer) >= 2 * len(names), what="every reply")
        self.assertEqual(client.buffer, b"\0" * 2 * len(names))
        client.buffer = b""
        reply = yield client.request("LIST_USERS", names[0])
        self.assertEqual(
            reply, b"\0" + wire.encode_listing((name, "127.0.0.1", 9) for name in names)
        )
        self.assertGreater(len(reply), 2 * protocol_module.REPLY_CHUNK)
        got = yield codes_over(client, ("DISCONNECT", names[0]))
        self.assertEqual(got, [0])

    @defer.inlineCallbacks
    def test_fingerprint_kept_beside_the_database(self):
        cwd = folder(self)
        ix, fp = yield start(self, cwd=cwd)
        pem = cwd / "ix.db.tls.pem"
        self.assertEqual(stat.S_IMODE(pem.stat().st_mode), 0o600)
        self.assertEqual(tls.Identity.from_pem(pem.read_bytes()).fingerprint, fp)
        yield ix.process.stop()
        again, fp_again = yield start(self, cwd=cwd)
        self.assertEqual(fp_again, fp)
        client = yield tls_client(self, again.port, fp, None)  # refused unless the key is fp
        got = yield codes_over(client, ("REGISTER", "carol"))
        self.assertEqual(got, [0])

    @defer.inlineCallbacks
    def test_memory_database_new_key_each_start(self):
        _, fp1 = yield start(self, db=":memory:")
        _, fp2 = yield start(self, db=":memory:")
        self.assertNotEqual(fp1, fp2)

    @defer.inlineCallbacks
    def test_tls_key_and_cert_options(self):
        cwd = folder(self)
        key_and_cert = ALICE.to_pem()
        split = key_and_cert.index(b"-----BEGIN CERTIFICATE-----")
        (cwd / "key.pem").write_bytes(key_and_cert[:split])
        (cwd / "cert.pem").write_bytes(key_and_cert[split:])
        ix, fp = yield start(self, "--tls-key", "key.pem", "--tls-cert", "cert.pem", cwd=cwd)
        self.assertEqual(fp, ALICE.fingerprint)
        self.assertFalse((cwd / "ix.db.tls.pem").exists())
        got = yield codes_as(self, ix.port, fp, None, ("REGISTER", "carol"))
        self.assertEqual(got, [0])

    @defer.inlineCallbacks
    def test_wrong_tls_options_stop_the_start(self):
        cwd = folder(self)
        (cwd / "key.pem").write_bytes(b"not a key")
        for options, said in [
            (["--tls-key", "key.pem"], "give both or neither"),
            (["--tls-key", "key.pem", "--tls-cert", "key.pem"], "not an identity"),
            (["--tls-key", "key.pem", "--tls-cert", "missing.pem"], "missing.pem"),
        ]:
            output = yield failed_start(self, cwd, "--db", ":memory:", *options)
            self.assertIn(said, output, options)

    @defer.inlineCallbacks
    def test_unusable_identity_file_stops_the_start(self):
        cwd = folder(self)
        (cwd / "ix.db.tls.pem").write_bytes(b"junk")
        output = yield failed_start(self, cwd, "--db", "ix.db", "--listen", "tcp:0")
        self.assertIn("s> indexer cannot start: ix.db.tls.pem: not an identity", output)
        self.assertEqual((cwd / "ix.db.tls.pem").read_bytes(), b"junk")  # never overwritten

    @defer.inlineCallbacks
    def test_second_indexer_on_one_database_refused(self):
        cwd = folder(self)
        ix, _ = yield start(self, cwd=cwd)
        output = yield failed_start(self, cwd, "--db", "ix.db", "--listen", "tcp:0")
        self.assertIn("s> indexer cannot start: ix.db is in use", output)
        got = yield ix.codes(("REGISTER", "bob"))  # the first one still serves
        self.assertEqual(got, [0])

    @defer.inlineCallbacks
    def test_classic_read_only(self):
        cwd = folder(self)
        ix, fp = yield start(self, cwd=cwd)
        yield ix.codes(("REGISTER", "bob"), ("CONNECT", "bob", 7000), ("PUBLISH", "bob", "b", "d"))
        yield ix.process.stop()
        ix, fp = yield start(self, "--classic", "read-only", cwd=cwd)
        reply = yield ix.request("LIST_USERS", "bob")
        self.assertEqual(reply, b"\0" + wire.encode_listing([("bob", "127.0.0.1", 7000)]))
        got = yield ix.codes(
            ("LIST_CONTENT", "bob", "bob"),
            ("LIST_PEERS", "bob"),
            ("PUBLISH", "bob", "c", "d"),
            ("DELETE", "bob", "b"),
            ("DISCONNECT", "bob"),
            ("REGISTER", "carol"),
        )
        self.assertEqual(got, [0, 0, 4, 4, 3, 2])
        got = yield codes_as(self, ix.port, fp, None, ("DISCONNECT", "bob"), ("LIST_USERS", "bob"))
        self.assertEqual(got, [3, 0])
        got = yield codes_as(
            self, ix.port, fp, MALLORY, ("REGISTER", "carol"), ("DISCONNECT", "bob")
        )
        self.assertEqual(got, [0, 0])

    @defer.inlineCallbacks
    def test_classic_deny(self):
        ix, fp = yield start(self, "--classic", "deny")
        got = yield ix.codes(("REGISTER", "bob"), ("LIST_USERS", "nobody"))
        self.assertEqual(got, [2, 3])  # not even "no such user" (1)
        got = yield codes_as(self, ix.port, fp, None, ("REGISTER", "bob"), ("LIST_USERS", "nobody"))
        self.assertEqual(got, [2, 3])
        got = yield codes_as(
            self, ix.port, fp, MALLORY, ("REGISTER", "carol"), ("LIST_USERS", "nobody")
        )
        self.assertEqual(got, [0, 1])


class OptionTests(TestCase):
    def test_classic_policy_reaches_the_directory(self) -> None:
        for policy in ("allow", "read-only", "deny"):
            options = Options()
            options.parseOptions(["--db", ":memory:", "--classic", policy])
            [indexer] = list(makeService(options))
            self.assertEqual(indexer.directory.classic_ops, CLASSIC_POLICIES[policy])
        self.assertEqual(Options()["classic"], "allow")

    def test_unknown_classic_policy(self) -> None:
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--classic", "sometimes"])


class Deadline(TestCase):
    def test_counted_from_the_accept(self) -> None:
        """The sniffer starts the protocol at the first byte: the time before counts too."""
        h = Harness(self)
        for transport in (StringTransport(), FakeTLSTransport()):
            proto = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            h.clock.advance(4)  # silent until its first byte
            proto.makeConnection(transport)
            h.clock.advance(wire.DEFAULT_TIMEOUT - 4 - 0.1)
            self.assertFalse(transport.disconnecting)
            h.clock.advance(0.2)
            self.assertTrue(transport.disconnecting)

    def test_no_delay_on_tls(self) -> None:
        """The first reply must not wait behind the session tickets for a delayed ACK."""
        calls = []
        transport = FakeTLSTransport()
        transport.setTcpNoDelay = calls.append
        Harness(self).factory.buildProtocol(None).makeConnection(transport)
        self.assertEqual(calls, [True])
