"""ONC-RPC server on Twisted: dispatch, TCP with record marking, UDP with a reply cache.

``Dispatcher`` turns one call message into one reply message (or None when the
message cannot be answered at all), checking in the order of RFC 5531 and the
classic svc code: RPC version, credentials, program, version, procedure; the
procedure itself answers GARBAGE_ARGS for arguments it cannot decode and any
unexpected exception becomes SYSTEM_ERR. The transports only move bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from p2p import twisted_internals
from p2p.listening import ConnectionCap, KnownSources
from p2p.oncrpc import rpc
from p2p.oncrpc.record import Oversized, RecordReader, encode_record

log = Logger()


class GarbageArgs(Exception):
    """Raised by a procedure whose arguments do not decode."""


#: A procedure: (call header, raw argument bytes, peer) -> result bytes or a Deferred of them.
Procedure = Callable[[rpc.Call, bytes, object], "bytes | defer.Deferred[bytes]"]


def null_procedure(call: rpc.Call, args: bytes, peer: object) -> bytes:
    """Procedure 0: no arguments, no results."""
    if args:
        raise GarbageArgs("NULL takes no arguments")
    return b""


@dataclass
class Program:
    """One RPC program: its number and, per version, its procedures."""

    number: int
    versions: dict[int, dict[int, Procedure]] = field(default_factory=dict)

    @property
    def low(self) -> int:
        return min(self.versions)

    @property
    def high(self) -> int:
        return max(self.versions)


class Dispatcher:
    """Answers call messages for a set of programs.

    A call with null credentials and verifier to a known procedure (what a C
    client sends, one call at a time) is recognised by the 36 bytes after its
    XID in one dict lookup (``rpc.plain_call_key``), which says everything the
    field-by-field checks below would find; any other call takes them.
    """

    def __init__(self, programs: list[Program]) -> None:
        self.programs = {p.number: p for p in programs}
        #: (program, version, procedure number, procedure) by their plain-call key.
        self._plain = {
            rpc.plain_call_key(p.number, vers, number): (p.number, vers, number, procedure)
            for p in programs
            for vers, procedures in p.versions.items()
            for number, procedure in procedures.items()
        }

    def handle(self, data: bytes | Oversized, peer: object = None) -> defer.Deferred:
        """Fire with the encoded reply, or None when no reply can be made."""
        reply = self.answer(data, peer)
        return reply if isinstance(reply, defer.Deferred) else defer.succeed(reply)

    def answer(
        self, data: bytes | Oversized, peer: object = None
    ) -> bytes | defer.Deferred[bytes | None] | None:
        """The encoded reply (None when none can be made), or a Deferred of it only
        when the procedure answers later: the transports send a ready reply in
        the same turn, without a Deferred per call."""
        try:
            plain = self._plain.get(data[4 : rpc.PLAIN_HEADER]) if type(data) is bytes else None
            if plain is not None:
                prog, vers, number, procedure = plain
                call = rpc.Call(int.from_bytes(data[:4], "big"), prog, vers, number)
                return self._run(procedure, call, data[rpc.PLAIN_HEADER :], peer)
            return self._handle(data, peer)
        except Exception:
            log.failure("RPC dispatch failed")
            xid = rpc.peek_xid(data.prefix if isinstance(data, Oversized) else data)
            return None if xid is None else _encode(rpc.accept_error(xid, rpc.SYSTEM_ERR))

    def _handle(self, data: bytes | Oversized, peer: object):
        oversized = isinstance(data, Oversized)
        raw = data.prefix if oversized else data
        try:
            call, args = rpc.decode_call(raw)
        except rpc.MessageError as exc:
            log.debug("dropping undecodable message: {exc}", exc=exc)
            return None
        if call.rpcvers != rpc.RPC_VERSION:
            return _encode(rpc.rpc_mismatch(call.xid))
        auth = rpc.check_auth(call)
        if auth != rpc.AUTH_OK:
            return _encode(rpc.auth_error(call.xid, auth))
        program = self.programs.get(call.prog)
        if program is None:
            return _encode(rpc.accept_error(call.xid, rpc.PROG_UNAVAIL))
        procedures = program.versions.get(call.vers)
        if procedures is None:
            return _encode(rpc.accept_error(call.xid, rpc.PROG_MISMATCH, program.low, program.high))
        procedure = procedures.get(call.proc)
        if procedure is None:
            return _encode(rpc.accept_error(call.xid, rpc.PROC_UNAVAIL))
        if oversized:
            return _encode(rpc.accept_error(call.xid, rpc.GARBAGE_ARGS))
        return self._run(procedure, call, args, peer)

    @staticmethod
    def _run(procedure: Procedure, call: rpc.Call, args: bytes, peer: object):
        """The procedure's encoded reply (or a Deferred of it)."""
        try:
            result = procedure(call, args, peer)
        except GarbageArgs as exc:
            log.debug("garbage arguments: {exc}", exc=exc)
            return _encode(rpc.accept_error(call.xid, rpc.GARBAGE_ARGS))
        if type(result) is bytes or not isinstance(result, defer.Deferred):
            return rpc.encode_success(call.xid, result)
        return result.addCallbacks(
            lambda body: rpc.encode_success(call.xid, body),
            lambda failure: _encode(_failed(call, failure)),
        )


def _failed(call: rpc.Call, failure: Failure) -> rpc.Reply:
    if failure.check(GarbageArgs):
        return rpc.accept_error(call.xid, rpc.GARBAGE_ARGS)
    log.failure("procedure {proc} failed", failure, proc=call.proc)
    return rpc.accept_error(call.xid, rpc.SYSTEM_ERR)


def _encode(reply: rpc.Reply | None) -> bytes | None:
    return None if reply is None else rpc.encode_reply(reply)


# --- TCP ----------------------------------------------------------------------


#: Seconds a client may leave a record unfinished before it is disconnected.
PARTIAL_RECORD_TIMEOUT = 60.0


@implementer(interfaces.IPushProducer)
class RpcStreamProtocol(protocol.Protocol, TimeoutMixin):
    """One TCP connection: record-marked calls in, record-marked replies out.

    Replies are written as they are ready. When the client stops reading
    replies, the transport's buffer fills, Twisted pauses this producer and we
    stop reading calls, so a client cannot make the server buffer without bound.
    A record must end within ``PARTIAL_RECORD_TIMEOUT`` of its first byte, or
    the connection is closed. The deadline is not pushed back by more bytes of
    the same record, so neither a client trickling a byte now and then nor one
    sending fragments without the last-fragment bit forever holds a connection.
    Between records a connection may stay open for ``idle_timeout`` seconds
    after its last complete record (or its start), then it is closed cleanly;
    None (the default) keeps it open (the indexer's relay keeps one, and
    reconnects when it is closed).
    """

    partial_timeout = PARTIAL_RECORD_TIMEOUT
    idle_timeout: float | None = None
    #: The address the factory admitted this connection from (``ConnectionCap``).
    source_addr: object = None
    _idle = False  # the idle timeout runs (no record started)

    def __init__(self, dispatcher: Dispatcher, max_record: int) -> None:
        self.dispatcher = dispatcher
        self.peer: object = None  # the transport's peer, given to each procedure
        self.reader = RecordReader(max_record, keep=rpc.MAX_CALL_HEADER)
        self.connected_ = False
        self._record_deadline = False  # the partial-record timeout is running

    def connectionMade(self) -> None:
        self.connected_ = True
        self.peer = self.transport.getPeer()
        self.transport.registerProducer(self, True)
        if self.idle_timeout is not None:
            self._idle = True
            self.setTimeout(self.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        records = self.reader.feed(data)
        ready: list[bytes] = []  # replies made in this read, sent together
        for record in records:
            if isinstance(record, Oversized):
                log.info("oversized record of {size} bytes", size=record.size)
            reply = self.dispatcher.answer(record, self.peer)
            if type(reply) is bytes:
                ready.append(encode_record(reply))
            elif reply is not None:  # a Deferred: the replies before it go first
                self._send(ready)
                reply.addCallback(self._reply)
        self._send(ready)
        if not self.connected_:
            return
        if self.reader.partial:
            if not self._record_deadline or records:
                # a new record started (this read may have finished earlier ones)
                self._record_deadline, self._idle = True, False
                self.setTimeout(self.partial_timeout)
        elif self._record_deadline or (records and self._idle):
            # between records: idle from the last complete one
            self._record_deadline = False
            self._idle = self.idle_timeout is not None
            self.setTimeout(self.idle_timeout)

    def timeoutConnection(self) -> None:
        if self._idle:
            log.debug("closing a connection idle for {t}s", t=self.idle_timeout)
            self.transport.loseConnection()  # idle is no fault: a clean close
            return
        log.info("closing a connection stuck in the middle of a record")
        self.transport.abortConnection()

    def _reply(self, reply: bytes | None) -> None:
        if reply is not None:
            self._send([encode_record(reply)])

    def _send(self, records: list[bytes]) -> None:
        """Write the replies in one piece, straight on the socket when nothing waits
        (``send_now``: a client waiting for each reply gets it a turn of the reactor
        sooner), and forget them."""
        if records and self.connected_:
            twisted_internals.send_now(self.transport, b"".join(records))
        records.clear()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected_ = False
        self.setTimeout(None)
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.connection_closed(self.source_addr)

    # IPushProducer: the transport tells us when its write buffer is full.
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.loseConnection()


class RpcStreamFactory(ConnectionCap, protocol.Factory):
    """Builds ``RpcStreamProtocol``s; refuses connections beyond ``max_connections``
    or ``max_per_source`` (``ConnectionCap``); their idle timeout is ``idle_timeout``."""

    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        max_record: int,
        max_connections: int = 1024,
        *,
        max_per_source: int | None = None,
        idle_timeout: float | None = None,
        known: KnownSources | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_record = max_record
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.idle_timeout = idle_timeout
        self.known = known

    def buildProtocol(self, addr) -> RpcStreamProtocol | None:
        if not self.admit(addr):
            return None
        proto = RpcStreamProtocol(self.dispatcher, self.max_record)
        proto.factory = self
        proto.source_addr = addr
        proto.idle_timeout = self.idle_timeout
        return proto


# --- UDP ----------------------------------------------------------------------


class ReplyCache:
    """Recent replies by (client address, XID), so a retransmission is answered again.

    A hash of the call is kept with the reply: the same XID with a different
    call is a new call. Bounded: the oldest entries go first, and an entry is
    small (a hash and a reply of a few dozen bytes).
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[object, int], tuple[int, bytes]] = OrderedDict()

    def get(self, key: tuple[object, int], call: bytes) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != hash(call):
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def __contains__(self, key: tuple[object, int]) -> bool:
        return key in self._entries

    def put(self, key: tuple[object, int], call: bytes, reply: bytes) -> None:
        self._entries[key] = (hash(call), reply)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class RpcDatagramProtocol(protocol.DatagramProtocol):
    """UDP: one call per datagram, one reply per datagram, with a reply cache."""

    def __init__(self, dispatcher: Dispatcher, cache_size: int = 4096) -> None:
        self.dispatcher = dispatcher
        self.cache = ReplyCache(cache_size)
        self._in_progress: set[tuple[object, int]] = set()

    def datagramReceived(self, data: bytes, addr) -> None:
        xid = rpc.peek_xid(data)
        if xid is None:
            return
        key = (addr, xid)
        if key in self._in_progress:
            return  # the original is still being handled; its reply will answer both
        cached = self.cache.get(key, data)
        if cached is not None:
            twisted_internals.send_datagram(self.transport, cached, addr)
            return
        reply = self.dispatcher.answer(data, addr)
        if reply is None or type(reply) is bytes:
            self._done(reply, key, data, addr)
            return
        self._in_progress.add(key)

        def done(reply: bytes | None) -> None:
            self._in_progress.discard(key)
            self._done(reply, key, data, addr)

        reply.addCallback(done)

    def _done(self, reply: bytes | None, key: tuple[object, int], data: bytes, addr) -> None:
        if reply is None:
            return
        self.cache.put(key, data, reply)
        if self.transport is not None:
            twisted_internals.send_datagram(self.transport, reply, addr)
