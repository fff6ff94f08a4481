"""The indexer's audit relay: outbox rows to the logger, in order, exactly once.

Design
------
The indexer writes each request's audit record into its store's outbox in the
same transaction as the change (``Store.add_outbox``); every row has a
sequence number that strictly increases, is never reused and survives
restarts. This relay delivers those rows to the logger and deletes them once
the logger has answered 0; the user's reply never waits for any of it.

* One TCP connection (``ClientService``: reconnect with jittered exponential
  backoff). Rows are sent in ``seq`` order, pipelined, at most ``window`` calls
  in flight; each row is sent again only after a reconnection.
* Every LOG call identifies the row: its XID is the seq (mod 2**32) and its
  AUTH_SYS credential's machinename is ``p2p-outbox:<sender id>:<seq>``
  (``logcontract.relay_machinename``), the sender id being the store's stable id.
* The logger keeps, durably and before replying, the last seq it stored per
  sender (``audit.AuditLog``); a call with a seq not above it is answered 0
  without storing. So when the logger dies after storing a record but before
  its reply arrives, the relay's resend is acknowledged and not stored twice:
  every record arrives, in order, exactly once.
* A row is deleted (``outbox_delete_through``, batched per reactor turn) only
  after its reply 0 and the replies of every row before it. If the indexer
  dies before the delete commits, the row is sent again after restart and the
  logger deduplicates it.
* A reply other than 0 (-1: the logger could not store; an RPC error), a lost
  connection, or no reply for ``reply_timeout`` seconds while calls are
  outstanding drops the connection; after the backoff the relay resumes from
  the first unacknowledged row. After a -1 or an RPC error reply the relay
  also waits before sending again (0.5 s, doubling up to 30 s while refusals
  go on), so a logger that cannot write is not hammered. The logger, for its
  part, refuses a sender's later records while an earlier one failed, so a
  pipelined record never overtakes one that was not stored.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from p2p import wire
from p2p.logcontract import LOG_OK, relay_machinename
from p2p.oncrpc import rpc
from p2p.oncrpc.client import RpcClientProtocol
from p2p.oncrpc.portmap import PortmapperEndpoint

log = Logger()

DEFAULT_WINDOW = 64
DEFAULT_REPLY_TIMEOUT = 30.0


class _RelayProtocol(RpcClientProtocol):
    def __init__(self, relay: OutboxRelay) -> None:
        super().__init__()
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay._connected(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.relay._disconnected(self, reason)
        super().connectionLost(reason)


class _RelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr) -> _RelayProtocol:
        return _RelayProtocol(self.relay)


class OutboxRelay(service.Service):
    """Delivers a store's outbox to the logger over one reconnecting TCP connection."""

    def __init__(
        self,
        store,
        endpoint,
        program: int = wire.LOGGER_PROGRAM,
        reactor=None,
        window: int = DEFAULT_WINDOW,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        initial_delay: float = 0.1,
        max_delay: float = 5.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.store = store
        self.endpoint = endpoint
        self.program = program
        self.reactor = reactor
        self.window = window
        self.reply_timeout = reply_timeout
        self.policy = backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay)
        self.proto: _RelayProtocol | None = None
        self.inflight: OrderedDict[int, bool] = OrderedDict()  # seq -> acknowledged
        self.sent_through = 0  # highest seq sent on this connection
        self.acked_through = 0  # every seq up to here is acknowledged
        self.deleted_through = 0
        self.delivered = 0  # acknowledged rows (diagnostics, tests)
        self._delete_call = None
        self._stall_call = None
        self._client: ClientService | None = None
        self._listening = False
        self._error_delay = 0.0  # grows while the logger keeps refusing records
        self._resume_at = 0.0

    # -- service

    def startService(self) -> None:
        super().startService()
        self.sender = self.store.sender_id
        if not self._listening:
            self.store.add_outbox_listener(self._pump)
            self._listening = True
        self._client = ClientService(
            self.endpoint, _RelayFactory(self), retryPolicy=self.policy, clock=self.reactor
        )
        self._client.startService()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        client, self._client = self._client, None
        d = client.stopService() if client is not None else defer.succeed(None)

        def finish(_):
            self._cancel_stall()
            if self._delete_call is not None and self._delete_call.active():
                self._delete_call.cancel()
            self._delete()

        return d.addBoth(finish)

    # -- connection

    def _connected(self, proto: _RelayProtocol) -> None:
        log.info("audit relay connected to {peer}", peer=proto.transport.getPeer())
        self.proto = proto
        self.inflight.clear()
        self.sent_through = self.acked_through
        wait = self._resume_at - self.reactor.seconds()
        if wait > 0:  # the logger refused a record recently: give it time
            self.reactor.callLater(wait, self._pump)
        else:
            self._pump()

    def _disconnected(self, proto: _RelayProtocol, reason: Failure) -> None:
        if proto is not self.proto:
            return
        self.proto = None
        self.inflight.clear()
        self.sent_through = self.acked_through
        self._cancel_stall()
        if self.running:
            log.info("audit relay lost the logger: {why}", why=reason.getErrorMessage())

    def _drop(self, why: str) -> None:
        log.warn("audit relay dropping the connection: {why}", why=why)
        if self.proto is not None:
            self.proto.transport.abortConnection()

    # -- sending

    def _pump(self) -> None:
        """Send pending rows while the window has room."""
        proto = self.proto
        if proto is None or not self.running:
            return
        room = self.window - len(self.inflight)
        if room <= 0:
            return
        rows = self.store.outbox_pending(self.sent_through, room)
        for seq, record in rows:
            cred = rpc.AuthSys(relay_machinename(self.sender, seq)).encode()
            d = proto.call(
                self.program,
                wire.LOGGER_VERSION,
                wire.LOGGER_PROC_LOG,
                rpc.pack_string(record),
                cred=cred,
                xid=seq & rpc.UINT32_MASK,
            )
            self.inflight[seq] = False
            self.sent_through = seq
            d.addCallbacks(self._replied, self._call_failed, (seq, proto), None, (proto,))
        if rows and self._stall_call is None:
            self._stall_call = self.reactor.callLater(self.reply_timeout, self._stalled)

    def _replied(self, body: bytes, seq: int, proto: _RelayProtocol) -> None:
        if proto is not self.proto or seq not in self.inflight:
            return
        try:
            result = rpc.unpack_int(body)
        except rpc.MessageError:
            result = None
        if result != LOG_OK:
            self._refused(f"logger answered {result} to record {seq}")
            return
        self._error_delay = 0.0
        self.inflight[seq] = True
        advanced = False
        while self.inflight:
            first, acked = next(iter(self.inflight.items()))
            if not acked:
                break
            del self.inflight[first]
            self.acked_through = first
            self.delivered += 1
            advanced = True
        self._cancel_stall()
        if self.inflight:
            self._stall_call = self.reactor.callLater(self.reply_timeout, self._stalled)
        if advanced and self._delete_call is None:
            self._delete_call = self.reactor.callLater(0, self._delete)
        self._pump()

    def _call_failed(self, failure: Failure, proto: _RelayProtocol) -> None:
        if proto is self.proto and not failure.check(
            defer.CancelledError, error.ConnectionLost, error.ConnectionDone
        ):
            # An RPC error reply (GARBAGE_ARGS: the logger's --max-message is below
            # this record's size; PROG_UNAVAIL: wrong --program): retried, slowly.
            self._refused(f"LOG call failed: {failure.getErrorMessage()}")

    def _refused(self, why: str) -> None:
        self._error_delay = min(max(2 * self._error_delay, 0.5), 30.0)
        self._resume_at = self.reactor.seconds() + self._error_delay
        self._drop(f"{why}; sending again in {self._error_delay:.1f}s")

    def _stalled(self) -> None:
        self._stall_call = None
        if self.inflight:
            self._drop(f"no reply from the logger in {self.reply_timeout}s")

    def _cancel_stall(self) -> None:
        if self._stall_call is not None:
            if self._stall_call.active():
                self._stall_call.cancel()
            self._stall_call = None

    def _delete(self) -> None:
        self._delete_call = None
        if self.acked_through > self.deleted_through:
            self.store.outbox_delete_through(self.acked_through)
            self.deleted_through = self.acked_through


def make_endpoint(reactor, endpoint: str | None, host: str | None, program: int):
    """The logger's client endpoint: an endpoint string, or ``host``'s portmapper."""
    if endpoint:
        return clientFromString(reactor, endpoint)
    if host:
        return PortmapperEndpoint(reactor, host, program, wire.LOGGER_VERSION)
    raise ValueError("a logger endpoint or host is needed")


def make_relay(
    store, endpoint: str | None, host: str | None, program: int, reactor
) -> service.IService:
    """The relay service the indexer runs when a logger is configured."""
    return OutboxRelay(store, make_endpoint(reactor, endpoint, host, program), program, reactor)
