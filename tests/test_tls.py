"""p2p.tls: identities, private files, and TLS beside plaintext on one port, over real sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from p2p import tls
from tests.support import poll_until


class IdentityTests(TestCase):
    def test_pem_round_trip_keeps_the_fingerprint(self):
        identity = tls.Identity.generate()
        again = tls.Identity.from_pem(b"user: alice\n" + identity.to_pem())
        self.assertEqual(again.fingerprint, identity.fingerprint)
        self.assertTrue(tls.is_fingerprint(identity.fingerprint))
        self.assertNotEqual(tls.Identity.generate().fingerprint, identity.fingerprint)

    def test_a_key_with_another_keys_certificate_is_refused(self):
        one, two = tls.Identity.generate(), tls.Identity.generate()
        mixed = (
            one.to_pem().split(b"-----BEGIN CERTIFICATE-----")[0]
            + two.to_pem().split(b"-----END PRIVATE KEY-----\n")[1]
        )
        self.assertRaises(ValueError, tls.Identity.from_pem, mixed)
        self.assertRaises(ValueError, tls.Identity.from_pem, b"no pem here")
        self.assertRaises(ValueError, tls.Identity.from_pem, one.to_pem().replace(b"M", b"!"))

    def test_write_private_is_owner_only_and_atomic(self):
        base = Path(self.mktemp())
        path = base / "deep" / "id.pem"
        tls.write_private(path, b"one")
        tls.write_private(path, b"two")
        self.assertEqual(path.read_bytes(), b"two")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        self.assertEqual(os.listdir(path.parent), ["id.pem"])


@implementer(IHalfCloseableProtocol)
class _Echo(protocol.Protocol):
    """Answers each chunk with what it learned of the connection, then the chunk."""

    def dataReceived(self, data):
        if tls.is_tls(self.transport):
            label = f"tls:{tls.peer_fingerprint(self.transport) or 'anonymous'}"
        else:
            label = "plain:"
        self.transport.write(f"[{label}]".encode())
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class _Collect(protocol.Protocol):
    def __init__(self, send: bytes):
        self.send = send
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.send)

    def dataReceived(self, data):
        self.data += data
        if self.send in self.data:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback((self.data, reason))


class SniffingTests(TestCase):
    def setUp(self):
        self.server_id = tls.Identity.generate()
        self.counts = {"built": 0, "lost": 0}
        counts = self.counts

        class Counting(_Echo):
            def connectionLost(self, reason):
                counts["lost"] += 1

        inner = protocol.Factory.forProtocol(Counting)
        original = inner.buildProtocol

        def build(addr):
            counts["built"] += 1
            return original(addr)

        inner.buildProtocol = build
        self.factory = tls.SniffingFactory(inner, tls.server_options(self.server_id), timeout=5)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def _endpoint(self, options=None):
        plain = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        return plain if options is None else endpoints.wrapClientTLS(options, plain)

    @defer.inlineCallbacks
    def _talk(self, send: bytes, options=None):
        proto = _Collect(send)
        yield endpoints.connectProtocol(self._endpoint(options), proto)
        result = yield proto.done
        return result

    @defer.inlineCallbacks
    def test_plaintext_is_served_as_it_is(self):
        data, _ = yield self._talk(b"LIST_USERS\0")
        self.assertEqual(data, b"[plain:]LIST_USERS\0")

    @defer.inlineCallbacks
    def test_tls_with_a_client_identity_and_the_servers_key_checked(self):
        client_id = tls.Identity.generate()
        seen = []
        options = tls.client_options(self.server_id.fingerprint, client_id, seen.append)
        data, _ = yield self._talk(b"hello\0", options)
        self.assertEqual(data, f"[tls:{client_id.fingerprint}]hello\0".encode())
        self.assertEqual(seen, [self.server_id.fingerprint])
        self.assertIsNone(options.mismatch)

    @defer.inlineCallbacks
    def test_tls_without_a_client_identity(self):
        data, _ = yield self._talk(b"anon\0", tls.client_options())
        self.assertEqual(data, b"[tls:anonymous]anon\0")

    @defer.inlineCallbacks
    def test_a_server_with_another_key_is_refused_before_any_byte_is_sent(self):
        options = tls.client_options(tls.Identity.generate().fingerprint)
        data, reason = yield self._talk(b"secret\0", options)
        self.assertEqual(data, b"")
        self.assertIsInstance(options.explain(reason.value), tls.FingerprintMismatch)
        self.assertEqual(options.mismatch.got, self.server_id.fingerprint)

    @defer.inlineCallbacks
    def test_every_connection_is_counted_once_even_if_it_sends_nothing(self):
        yield self._talk(b"x\0")
        yield self._talk(b"y\0", tls.client_options())
        silent = yield endpoints.connectProtocol(self._endpoint(), protocol.Protocol())
        silent.transport.loseConnection()
        yield poll_until(lambda: self.counts["lost"] >= 3, what="three connections lost")
        self.assertEqual(self.counts, {"built": 3, "lost": 3})
