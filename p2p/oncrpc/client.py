"""ONC-RPC client over one TCP connection: pipelined calls matched by XID.

``RpcClientProtocol.call`` sends a call at once and returns a Deferred for its
result bytes; any number of calls may be outstanding, replies may come in any
order. A reply other than SUCCESS fails the Deferred with ``RpcReplyError``;
a lost connection fails every outstanding call with ``ConnectionLost``.
"""

from __future__ import annotations

import itertools
import random

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p.oncrpc import rpc
from p2p.oncrpc.record import RecordReader, encode_record

log = Logger()

#: Longest reply the client reads (replies of LOG, NULL and the portmapper are tiny).
MAX_REPLY = 1 << 16


class RpcReplyError(Exception):
    """The server answered something other than SUCCESS."""

    def __init__(self, reply: rpc.Reply) -> None:
        super().__init__(reply)
        self.reply = reply


class _Calls:
    """The outstanding calls of one client, by XID (the stream and datagram clients)."""

    def __init__(self) -> None:
        self.pending: dict[int, defer.Deferred] = {}
        self._xids = itertools.count(random.getrandbits(31))

    def _new_call(
        self, prog: int, vers: int, proc: int, args: bytes, cred: rpc.OpaqueAuth, xid: int | None
    ) -> tuple[defer.Deferred, bytes]:
        """Register a call under a free (or the given) XID; its Deferred and its message."""
        if xid is None:
            xid = next(self._xids) & rpc.UINT32_MASK
            while xid in self.pending:
                xid = next(self._xids) & rpc.UINT32_MASK
        if xid in self.pending:
            raise ValueError(f"XID {xid} already outstanding")
        d: defer.Deferred = defer.Deferred()
        self.pending[xid] = d
        return d, rpc.encode_call(rpc.Call(xid, prog, vers, proc, cred), args)


class RpcClientProtocol(protocol.Protocol, _Calls):
    """Pipelined RPC calls on one stream connection."""

    def __init__(self, max_reply: int = MAX_REPLY) -> None:
        _Calls.__init__(self)
        self.reader = RecordReader(max_reply, keep=64)
        self.lost: defer.Deferred = defer.Deferred()

    def call(
        self,
        prog: int,
        vers: int,
        proc: int,
        args: bytes = b"",
        cred: rpc.OpaqueAuth = rpc.NULL_AUTH,
        xid: int | None = None,
    ) -> defer.Deferred:
        """Send one call; fires with the result bytes of a SUCCESS reply."""
        try:
            d, message = self._new_call(prog, vers, proc, args, cred, xid)
        except ValueError as exc:
            return defer.fail(exc)
        self.transport.write(encode_record(message))
        return d

    def dataReceived(self, data: bytes) -> None:
        for record in self.reader.feed(data):
            if not isinstance(record, bytes):
                log.warn("oversized reply dropped")
                continue
            try:
                reply = rpc.decode_reply(record)
            except rpc.MessageError as exc:
                log.warn("undecodable reply: {exc}", exc=exc)
                continue
            d = self.pending.pop(reply.xid, None)
            if d is None:
                continue  # a reply to nothing outstanding: ignore
            if reply.ok:
                d.callback(reply.body)
            else:
                d.errback(RpcReplyError(reply))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(error.ConnectionLost(str(reason.value)))
        self.lost.callback(None)


class RpcClientFactory(protocol.Factory):
    protocol = RpcClientProtocol
    noisy = False


def connect(reactor, endpoint: str) -> defer.Deferred:
    """Connect to a Twisted client endpoint string; fires with an ``RpcClientProtocol``."""
    return clientFromString(reactor, endpoint).connect(RpcClientFactory())


class RpcDatagramClient(protocol.DatagramProtocol, _Calls):
    """Calls over UDP to one server (tests and benchmarks): no retransmission here."""

    def __init__(self, host: str, port: int) -> None:
        _Calls.__init__(self)
        self.address = (host, port)

    def send(self, message: bytes) -> None:
        self.transport.write(message, self.address)

    def call(
        self,
        prog: int,
        vers: int,
        proc: int,
        args: bytes = b"",
        cred: rpc.OpaqueAuth = rpc.NULL_AUTH,
        xid: int | None = None,
    ) -> defer.Deferred:
        """Send one call datagram; fires with the decoded ``rpc.Reply``.

        Unlike the stream client, an XID may be reused on purpose: tests send
        the same call twice to check the server's retransmission cache.
        """
        if xid is not None:
            self.pending.pop(xid, None)
        d, message = self._new_call(prog, vers, proc, args, cred, xid)
        self.send(message)
        return d

    def datagramReceived(self, data: bytes, addr) -> None:
        try:
            reply = rpc.decode_reply(data)
        except rpc.MessageError:
            return
        d = self.pending.pop(reply.xid, None)
        if d is not None:
            d.callback(reply)
