"""TLS for every link of p2p: identities, fingerprints, and TLS beside the classic protocol.

An *identity* is an ECDSA P-256 key with a self-signed certificate. Nobody
vouches for it: parties know each other by the *fingerprint* of the key (the
SHA-256 of the certificate's SubjectPublicKeyInfo, 64 lowercase hex digits),
as SSH knows hosts. The indexer pins a user's fingerprint when the user
registers (a claimed name); the client pins the indexer's on first use; a
downloader checks the owner's against the one the indexer lists.

TLS shares each port with the classic plaintext protocol: a connection whose
first byte is a TLS handshake record (``wire.TLS_HANDSHAKE``) speaks TLS, any
other first byte is a classic request (:class:`SniffingFactory`). Only TLS 1.3
is spoken: certificates travel encrypted, so a listener on the path learns no
identity.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import alsoProvides, implementer

from p2p import twisted_internals, wire

_PEM_KEY = b"-----BEGIN PRIVATE KEY-----"
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class FingerprintMismatch(Exception):
    """The other side's key is not the one expected: it is not who it claims to be."""

    def __init__(self, expected: str, got: str | None) -> None:
        super().__init__(f"its key fingerprint is {got or 'missing'}, expected {expected}")
        self.expected = expected
        self.got = got


def fingerprint_of(cert: x509.Certificate | crypto.X509) -> str:
    """The fingerprint of a certificate's key: SHA-256 of its SubjectPublicKeyInfo, in hex."""
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    return _key_fingerprint(cert)


def is_fingerprint(text: str) -> bool:
    """Whether ``text`` is spelled as a fingerprint (64 lowercase hex digits)."""
    return len(text) == wire.FINGERPRINT_LENGTH and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class Identity:
    """A private key and its self-signed certificate."""

    key: PrivateKeyTypes
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.cert)

    @classmethod
    def generate(cls, common_name: str = "p2p") -> Identity:
        """A new key and a certificate for it, valid from now on without end (RFC 5280's
        no-expiry date): trust comes from the pinned fingerprint, never from dates."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(secrets.randbits(63) + 1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def to_pem(self) -> bytes:
        """The key (PKCS#8, unencrypted: keep the file private) then the certificate."""
        key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key + self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def from_pem(cls, data: bytes) -> Identity:
        """Read what :meth:`to_pem` wrote (text before, between or after the blocks is
        ignored); ValueError if there is no key, no certificate, or they do not match."""
        start_key, start_cert = data.find(_PEM_KEY), data.find(_PEM_CERT)
        if start_key < 0 or start_cert < 0:
            raise ValueError("not an identity: a private key and a certificate in PEM are needed")
        try:
            key = serialization.load_pem_private_key(data[start_key:], password=None)
            cert = x509.load_pem_x509_certificate(data[start_cert:])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an identity: {exc}") from exc
        if fingerprint_of(cert) != _key_fingerprint(key):
            raise ValueError("not an identity: the certificate is not for this key")
        return cls(key, cert)

    @classmethod
    def from_files(cls, key_path: Path, cert_path: Path) -> Identity:
        """An identity kept as two PEM files (``--tls-key`` / ``--tls-cert``)."""
        return cls.from_pem(Path(key_path).read_bytes() + b"\n" + Path(cert_path).read_bytes())


def _key_fingerprint(holder) -> str:
    """The fingerprint of the public key of ``holder`` (a certificate or a private key)."""
    spki = holder.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically.

    Missing parent directories are made 0700. The data goes to a temporary
    file in the same directory, is synced, and replaces ``path`` by rename, so
    a crash leaves the old file or the new one, never half of either.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- Contexts ------------------------------------------------------------------


def _context(identity: Identity | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    if identity is not None:
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(identity.key))
        ctx.use_certificate(crypto.X509.from_cryptography(identity.cert))
        ctx.check_privatekey()
    return ctx


def _accept_any(conn, cert, errno, depth, ok) -> bool:
    """Accept a self-signed certificate: trust is the fingerprint, checked by the caller."""
    return True


@implementer(IOpenSSLServerConnectionCreator)
class ServerOptions:
    """The server side: presents ``identity``, asks for (never requires) a client certificate."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        ctx = _context(identity)
        ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
        # One id for every process of this service, so tickets and sessions keep working.
        ctx.set_session_id(b"p2p")
        # An idle connection gives its record buffers back (about 20 KiB each): the
        # indexer keeps one connection per online user of ours (protocol.md 7.3).
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        self._ctx = ctx

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


def server_options(identity: Identity) -> ServerOptions:
    """How a p2p service (indexer, peer server) speaks TLS as ``identity``."""
    return ServerOptions(identity)


@implementer(IOpenSSLClientConnectionCreator)
class ClientOptions:
    """The client side of one connection: checks the server's key during the handshake.

    ``expected`` is the fingerprint the server must have (None: any, for a
    first use that pins it); ``identity`` is presented when the server asks.
    After the handshake (or its failure) :attr:`seen` holds the server's
    fingerprint, and :attr:`mismatch` is set when it was refused.
    """

    def __init__(
        self,
        expected: str | None = None,
        identity: Identity | None = None,
        seen: Callable[[str], None] | None = None,
    ) -> None:
        self.expected = expected
        self.identity = identity
        self.on_seen = seen
        self.seen: str | None = None
        self.mismatch: FingerprintMismatch | None = None
        self._ctx = _context(identity)
        self._ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)

    def _verify(self, conn, cert, errno, depth, ok) -> bool:
        if depth != 0:
            return True  # only the server's own certificate counts
        got = fingerprint_of(cert)
        first, self.seen = self.seen is None, got
        if first and self.on_seen is not None:  # OpenSSL may ask more than once
            self.on_seen(got)
        if self.expected is not None and got != self.expected:
            self.mismatch = FingerprintMismatch(self.expected, got)
            return False
        return True

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        # No SNI: the name would travel in clear, and the key is what is checked.
        return SSL.Connection(self._ctx, None)

    def explain(self, error: BaseException) -> BaseException:
        """The mismatch behind a failed handshake, if that is what it was, else ``error``."""
        return self.mismatch if self.mismatch is not None else error


def client_options(
    expected: str | None = None,
    identity: Identity | None = None,
    seen: Callable[[str], None] | None = None,
) -> ClientOptions:
    """A client connection creator for one connection (see :class:`ClientOptions`)."""
    return ClientOptions(expected, identity, seen)


# --- Transports ----------------------------------------------------------------


def is_tls(transport) -> bool:
    """Whether ``transport`` is a TLS connection."""
    return ISSLTransport.providedBy(transport)


def peer_fingerprint(transport) -> str | None:
    """The fingerprint of the certificate the other side presented; None for plaintext or none."""
    if not is_tls(transport):
        return None
    cert = transport.getPeerCertificate()
    return None if cert is None else fingerprint_of(cert)


class _Sniffer(Protocol, TimeoutMixin):
    """Waits for a connection's first byte, then hands the connection to its protocol:
    through TLS when that byte starts a TLS handshake, as it is otherwise.

    The protocol the factory built is started only then (its ``connectionMade``
    sees the right transport); until then a timeout guards silence. It is told
    of the connection's end either way, so whatever counts connections in it
    counts every one. Half-close events reach it when it accepts them.
    """

    def __init__(self, factory: SniffingFactory, inner: Protocol) -> None:
        self.factory = factory
        self.inner = inner
        self.target: Protocol | None = None
        self._early: list[bytes] | None = None  # bytes that arrived while the target started
        self.callLater = factory.reactor.callLater  # TimeoutMixin's clock

    def connectionMade(self) -> None:
        # The first byte is usually there already: then no timer is needed at all.
        twisted_internals.read_now(self.transport)
        if self.target is None and self.transport.connected:
            self.setTimeout(self.factory.timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
            return
        target = self.target
        if target is None:
            self.setTimeout(None)
            if data[0] == wire.TLS_HANDSHAKE:
                tls = self.factory.tls
                target = tls.protocol(tls, self.inner)
            else:
                target = self.inner
            self.target = target
            if IHalfCloseableProtocol.providedBy(target):
                alsoProvides(self, IHalfCloseableProtocol)
            # Starting it may read more at once (a fast path): keep that for after this chunk.
            self._early = []
            target.makeConnection(self.transport)
            early, self._early = self._early, None
            target.dataReceived(data)
            for chunk in early:
                target.dataReceived(chunk)
            return
        target.dataReceived(data)

    def readConnectionLost(self) -> None:
        self.target.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.target.writeConnectionLost()

    def timeoutConnection(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        self.setTimeout(None)
        (self.target or self.inner).connectionLost(reason)


class SniffingFactory(ServerFactory):
    """Serves TLS and the classic plaintext protocol on one listening port.

    ``wrapped`` builds the application protocol of every connection (None
    refuses it, as usual); ``options`` is the TLS side (:func:`server_options`).
    A connection silent for ``timeout`` seconds before its first byte is cut.
    """

    noisy = False

    def __init__(
        self,
        wrapped: Factory,
        options: ServerOptions,
        reactor=None,
        timeout: float = wire.DEFAULT_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.wrapped = wrapped
        self.options = options
        self.reactor = reactor
        self.timeout = timeout
        self.tls = TLSMemoryBIOFactory(options, False, wrapped, clock=reactor)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr) -> Protocol | None:
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        return _Sniffer(self, inner)
