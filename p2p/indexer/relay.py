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

States (an Automat machine; the diagram is in docs/architecture.md)
------------------------------------------------------------------
``stopped`` -> start -> ``connecting`` -> connected -> ``sending``, or
``holding`` when the logger refused a record less than the refusal delay ago
(``holding`` -> resume -> ``sending``). ``sending`` -> refused or stalled ->
``dropping`` (the connection is being aborted; late replies on it are
ignored). Losing the connection in any connected state -> ``connecting``
(``ClientService`` reconnects after its backoff). stop -> ``stopped`` from
anywhere. Acknowledgements and outbox growth only act in ``sending``.
"""

from __future__ import annotations

from collections import OrderedDict

from automat import MethodicalMachine
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
#: Wait after the logger refuses a record: first, and at most (doubling in between).
FIRST_REFUSAL_DELAY = 0.5
MAX_REFUSAL_DELAY = 30.0


class _RelayProtocol(RpcClientProtocol):
    def __init__(self, relay: OutboxRelay) -> None:
        super().__init__()
        self.relay = relay

    def connectionMade(self) -> None:
        self.relay._connection_made(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.relay._connection_lost(self, reason)
        super().connectionLost(reason)


class _RelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr) -> _RelayProtocol:
        return _RelayProtocol(self.relay)


class OutboxRelay(service.Service):
    """Delivers a store's outbox to the logger over one reconnecting TCP connection."""

    _machine = MethodicalMachine()

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
        self.sender = ""
        self.proto: _RelayProtocol | None = None  # the connection of this state, if any
        self.inflight: OrderedDict[int, bool] = OrderedDict()  # seq -> acknowledged
        self.sent_through = 0  # highest seq sent on this connection
        self.acked_through = 0  # every seq up to here is acknowledged
        self.deleted_through = 0
        self.delivered = 0  # acknowledged rows (diagnostics, tests)
        #: Since when committed rows wait to be acknowledged (None: caught up); metrics.
        self.behind_since: float | None = None
        self._delete_call = None
        self._stall_call = None
        self._resume_call = None
        self._client: ClientService | None = None
        self._error_delay = 0.0  # grows while the logger keeps refusing records
        self._resume_at = 0.0
        store.add_outbox_listener(self._outbox_grew)

    # -- states

    @_machine.state(initial=True)
    def stopped(self) -> None:
        """Not running: no connection, nothing sent."""

    @_machine.state()
    def connecting(self) -> None:
        """Running; ``ClientService`` is (re)connecting to the logger."""

    @_machine.state()
    def holding(self) -> None:
        """Connected, waiting out the delay after the logger refused a record."""

    @_machine.state()
    def sending(self) -> None:
        """Connected: rows go out while the window has room, replies are counted."""

    @_machine.state()
    def dropping(self) -> None:
        """The connection is being aborted; whatever still arrives on it is ignored."""

    # -- inputs

    @_machine.input()
    def start(self) -> None:
        """The service starts."""

    @_machine.input()
    def stop(self) -> None:
        """The service stops."""

    @_machine.input()
    def connected(self, proto: _RelayProtocol) -> None:
        """A connection to the logger is up."""

    @_machine.input()
    def connected_too_soon(self, proto: _RelayProtocol) -> None:
        """A connection is up, but the logger refused a record moments ago."""

    @_machine.input()
    def resume(self) -> None:
        """The delay after a refusal is over."""

    @_machine.input()
    def lost(self) -> None:
        """The current connection is gone."""

    @_machine.input()
    def outbox_grew(self) -> None:
        """New rows wait in the outbox."""

    @_machine.input()
    def acknowledged(self, seq: int) -> None:
        """The logger answered 0 to row ``seq``."""

    @_machine.input()
    def refused(self, why: str) -> None:
        """The logger answered a LOG call with -1 or an RPC error."""

    @_machine.input()
    def stalled(self) -> None:
        """Calls are outstanding and no reply came for ``reply_timeout`` seconds."""

    # -- outputs

    @_machine.output()
    def _start_client(self) -> None:
        self._client = ClientService(
            self.endpoint, _RelayFactory(self), retryPolicy=self.policy, clock=self.reactor
        )
        self._client.startService()

    @_machine.output()
    def _stop_client(self) -> defer.Deferred:
        self._clear_connection()  # first: a connection lost while stopping is not news
        client, self._client = self._client, None
        d = client.stopService() if client is not None else defer.succeed(None)

        def finish(_):
            self._cancel("_delete_call")
            self._delete()

        return d.addBoth(finish)

    @_machine.output()
    def _adopt(self, proto: _RelayProtocol) -> None:
        # Nothing is in flight here: every way into ``connecting`` went through
        # ``_clear_connection`` (or is the start, with nothing sent yet).
        log.info("audit relay connected to {peer}", peer=proto.transport.getPeer())
        self.proto = proto

    @_machine.output()
    def _wait_to_resume(self) -> None:
        wait = max(self._resume_at - self.reactor.seconds(), 0.0)
        self._resume_call = self.reactor.callLater(wait, self._resume)

    @_machine.output()
    def _forget_connection(self) -> None:
        self._clear_connection()

    def _clear_connection(self) -> None:
        self.proto = None
        self.inflight.clear()
        self.sent_through = self.acked_through
        self._cancel("_stall_call")
        self._cancel("_resume_call")

    @_machine.output()
    def _pump(self) -> None:
        """Send pending rows while the window has room."""
        proto = self.proto
        room = self.window - len(self.inflight)
        if proto is None or room <= 0:
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
            self._stall_call = self.reactor.callLater(self.reply_timeout, self.stalled)
        if not self.inflight:  # nothing sent, nothing waiting for its reply
            self.behind_since = None

    @_machine.output()
    def _record_ack(self, seq: int) -> None:
        if seq not in self.inflight:
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
        self._cancel("_stall_call")
        if self.inflight:
            self._stall_call = self.reactor.callLater(self.reply_timeout, self.stalled)
        if advanced and self._delete_call is None:
            self._delete_call = self.reactor.callLater(0, self._delete)

    @_machine.output()
    def _penalise(self, why: str) -> None:
        self._error_delay = min(max(2 * self._error_delay, FIRST_REFUSAL_DELAY), MAX_REFUSAL_DELAY)
        self._resume_at = self.reactor.seconds() + self._error_delay
        log.warn(
            "audit relay: {why}; sending again in {delay:.1f}s", why=why, delay=self._error_delay
        )

    @_machine.output()
    def _report_stall(self) -> None:
        self._stall_call = None
        log.warn("audit relay: no reply from the logger in {t}s", t=self.reply_timeout)

    @_machine.output()
    def _abort(self) -> None:
        if self.proto is not None:
            self.proto.transport.abortConnection()

    @_machine.output()
    def _report_lost(self) -> None:
        log.info("audit relay lost the logger")

    # -- transitions

    stopped.upon(start, enter=connecting, outputs=[_start_client])
    connecting.upon(connected, enter=sending, outputs=[_adopt, _pump])
    connecting.upon(connected_too_soon, enter=holding, outputs=[_adopt, _wait_to_resume])
    holding.upon(resume, enter=sending, outputs=[_pump])
    sending.upon(outbox_grew, enter=sending, outputs=[_pump])
    sending.upon(acknowledged, enter=sending, outputs=[_record_ack, _pump])
    sending.upon(refused, enter=dropping, outputs=[_penalise, _abort])
    sending.upon(stalled, enter=dropping, outputs=[_report_stall, _abort])
    for _state in (holding, sending, dropping):
        _state.upon(lost, enter=connecting, outputs=[_forget_connection, _report_lost])
    for _state in (connecting, holding, sending, dropping):
        _state.upon(stop, enter=stopped, outputs=[_stop_client])
    # What may still arrive where it no longer applies changes nothing.
    for _state, _inputs in (
        (stopped, (outbox_grew, stop)),
        (connecting, (outbox_grew,)),
        (holding, (outbox_grew,)),
        (dropping, (outbox_grew, acknowledged, refused, stalled)),
    ):
        for _input in _inputs:
            _state.upon(_input, enter=_state, outputs=[])
    del _state, _inputs, _input

    # -- service

    def startService(self) -> None:
        super().startService()
        self.sender = self.store.sender_id  # known once the store is open
        self.behind_since = self.reactor.seconds()  # until a pump finds nothing to send
        self.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        outcome = self.stop()  # the outputs' results: [Deferred] when it was running
        return outcome[0] if outcome else defer.succeed(None)

    # -- events from the connection, the calls, the store and the clock

    def _connection_made(self, proto: _RelayProtocol) -> None:
        if self._resume_at > self.reactor.seconds():
            self.connected_too_soon(proto)
        else:
            self.connected(proto)

    def _connection_lost(self, proto: _RelayProtocol, reason: Failure) -> None:
        if proto is self.proto:
            self.lost()

    def _outbox_grew(self) -> None:
        if self.behind_since is None:
            self.behind_since = self.reactor.seconds()
        self.outbox_grew()

    def lag(self) -> float:
        """Seconds the relay has been behind the outbox (0 when caught up), for metrics."""
        since = self.behind_since
        return 0.0 if since is None else max(0.0, self.reactor.seconds() - since)

    def _resume(self) -> None:
        self._resume_call = None
        self.resume()

    def _replied(self, body: bytes, seq: int, proto: _RelayProtocol) -> None:
        if proto is not self.proto:
            return
        try:
            result = rpc.unpack_int(body)
        except rpc.MessageError:
            result = None
        if result == LOG_OK:
            self.acknowledged(seq)
        else:
            self.refused(f"logger answered {result} to record {seq}")

    def _call_failed(self, failure: Failure, proto: _RelayProtocol) -> None:
        if proto is self.proto and not failure.check(
            defer.CancelledError, error.ConnectionLost, error.ConnectionDone
        ):
            # An RPC error reply (GARBAGE_ARGS: the logger's --max-message is below
            # this record's size; PROG_UNAVAIL: wrong --program): retried, slowly.
            self.refused(f"LOG call failed: {failure.getErrorMessage()}")

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()

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
