"""Small in-test peers speaking FETCH, RANGE and PIECES (protocol.md 2.2, 2.4, 2.5)
from bytes in memory, each with one way to misbehave: a copy with altered bytes,
dying after some bytes, no range support, or silence.

They are written from the protocol text, apart from ``p2p.peer.server``, so the
downloader is tested against the wire as documented.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred


def piece_size(size: int) -> int:
    """protocol.md 2.5: 1 MiB, doubled while the file would have more than 16384 pieces."""
    piece = 1 << 20
    while -(-size // piece) > 16384:
        piece *= 2
    return piece


def digests(body: bytes) -> bytes:
    piece = piece_size(len(body))
    return b"".join(
        hashlib.sha256(body[i : i + piece]).digest() for i in range(0, len(body), piece)
    )


@dataclass
class Behaviour:
    """How one fake peer serves ``body`` under ``name``."""

    name: str
    body: bytes
    #: Serve these bytes in RANGE/FETCH replies instead (a copy altered after publishing).
    served: bytes | None = None
    #: The piece list it sends (default: the true one of ``body``).
    pieces: bytes | None = None
    #: The piece size it announces (default: the one the size fixes).
    piece: int | None = None
    #: Drop every connection once this many file bytes were sent in all (then refuse all).
    die_after: int | None = None
    #: Answer RANGE and PIECES as an old peer does: close without a reply byte.
    classic: bool = False
    #: Stop sending (keep the connection open, silent) after this many file bytes per request.
    stall_after: int | None = None
    #: What it was asked (operation, fields), for the test to inspect.
    requests: list[tuple[str, ...]] = field(default_factory=list)
    #: Answer 4 (busy) to a request arriving while this many transfers run.
    max_uploads: int | None = None
    sent: int = 0
    dead: bool = False
    uploading: int = 0
    busy: int = 0


class _FakePeer(protocol.Protocol):
    def __init__(self, how: Behaviour) -> None:
        self.how = how
        self.buffer = b""
        self.counted = False

    def connectionLost(self, reason) -> None:
        if self.counted:
            self.how.uploading -= 1

    def connectionMade(self) -> None:
        if self.how.dead:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        fields = self.buffer.split(b"\0")
        if not fields:
            return
        op = fields[0].decode()
        need = {"FETCH": 3, "RANGE": 4, "PIECES": 2, "GET_FILE": 2}.get(op, 1)
        if len(fields) - 1 < need:
            return
        args = [f.decode() for f in fields[1:need]]
        self.how.requests.append((op, *args))
        self.serve(op, args)

    def serve(self, op: str, args: list[str]) -> None:
        how = self.how
        body = how.body if how.served is None else how.served
        if args[0] != how.name:
            self.transport.write(b"\x01")
            self.transport.loseConnection()
            return
        if op in ("RANGE", "PIECES") and how.classic:
            self.transport.loseConnection()
            return
        if op in ("RANGE", "FETCH") and how.max_uploads is not None:
            if how.uploading >= how.max_uploads:
                how.busy += 1
                self.transport.write(b"\x04")
                self.transport.loseConnection()
                return
            how.uploading += 1
            self.counted = True
        if op == "PIECES":
            listed = digests(how.body) if how.pieces is None else how.pieces
            size = len(how.body)
            piece = piece_size(size) if how.piece is None else how.piece
            self.transport.write(b"\x00%d\x00%d\x00" % (size, piece) + listed)
            self.transport.loseConnection()
            return
        if op == "FETCH":
            offset = int(args[1])
            if offset > len(body):
                self.transport.write(b"\x03")
                self.transport.loseConnection()
                return
            start, end = offset, len(body)
        elif op == "RANGE":
            start, length = int(args[1]), int(args[2])
            if length == 0 or start + length > len(body):
                self.transport.write(b"\x03")
                self.transport.loseConnection()
                return
            end = start + length
        else:
            self.transport.write(b"\x02")
            self.transport.loseConnection()
            return
        self.transport.write(b"\x00%d\x00" % len(body))
        chunk = body[start:end]
        if how.stall_after is not None:
            self.transport.write(chunk[: how.stall_after])  # then silence, connection open
            return
        if how.die_after is not None:
            allowed = max(how.die_after - how.sent, 0)
            if allowed < len(chunk):
                self.transport.write(chunk[:allowed])
                how.sent += allowed
                how.dead = True  # (as a killed process: the kernel closes after the bytes)
                self.transport.loseConnection()
                return
        how.sent += len(chunk)
        self.transport.write(chunk)
        self.transport.loseConnection()


class FakePeers:
    """Fake peers listening on 127.0.0.1, stopped by :meth:`stop`."""

    def __init__(self) -> None:
        self.ports: list = []

    def add(self, how: Behaviour) -> int:
        factory = protocol.Factory.forProtocol(lambda: _FakePeer(how))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        return port.getHost().port

    def stop(self) -> Deferred:
        from twisted.internet import defer

        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
