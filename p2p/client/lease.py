"""Keeps the connected user listed: the lease (protocol.md, "Liveness").

An indexer that knows the liveness extension drops a connected user whose
lease is not kept, so that a killed client does not stay listed. While this
shell has a connected user, :class:`Lease` keeps it: right after ``CONNECT OK``
it asks the indexer to *hold* the lease on the kept TLS connection (``HOLD``,
section 7.3), then only watches that connection, and when it is lost connects
again and holds again at once (retrying every ninth of the lease while the
indexer cannot be reached). Where the indexer cannot hold (it does not know
``HOLD``, or the connection is the classic, plaintext one) it renews with
``ALIVE`` every third of the lease the indexer gave in its last reply, a
renewal that got no answer tried again after a third of that. Everything runs
on the reactor (a ``callLater`` per attempt), so neither a prompt waiting for
input nor a long ``GET_FILE`` holds it up; it prints nothing on stdout (the
result lines are the commands').

When the indexer answers that it no longer lists the user (it expired the
lease, or a ``DISCONNECT`` this shell did not send removed it), the lease says
so once on stderr and connects the user again with the same peer port; if that
fails it says why and goes offline, as ``DISCONNECT`` would. An indexer that
does not know ``ALIVE`` (a classic one closes without a reply byte) is never
asked again in this session: one line in the ``--verbose`` log.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2p import wire
from p2p.client.indexer_client import UnknownOperation, lease_seconds
from p2p.client.session import Session, reason

#: The operation that renews the lease (None until the wire module defines it).
ALIVE = getattr(wire, "ALIVE", None)
#: The operation that asks the indexer to hold the lease on the kept connection.
HOLD = getattr(wire, "HOLD", None)
#: The lease assumed before the indexer has said its own.
DEFAULT_LEASE = getattr(wire, "DEFAULT_PEER_TIMEOUT", 60.0)
#: Never renew more often than this, whatever lease an indexer announces.
MIN_INTERVAL = 0.2

#: Why the indexer refused the automatic CONNECT, by code.
_CONNECT_REFUSED = {
    wire.CONNECT.no_user: "the indexer no longer knows the name",
    wire.CONNECT.own: "it is connected from another client now",
}


class Lease:
    """Renews the lease of ``session``'s connected user (see the module docstring).

    :meth:`start` when a user is connected, :meth:`stop` before it is
    disconnected; the session does both. ``note`` writes one line for the user
    (stderr).
    """

    log = Logger()

    def __init__(self, session: Session) -> None:
        self.session = session
        self.reactor = session.reactor
        #: The lease in seconds, from the indexer's last ALIVE reply.
        self.lease: float = DEFAULT_LEASE
        #: False once the indexer said it does not know ALIVE: never asked again.
        self.supported = ALIVE is not None
        #: False once the indexer could not hold the lease (unknown HOLD, or code 3).
        self.hold_supported = HOLD is not None
        #: The user whose lease the indexer holds on our connection now, if any.
        self.held: str | None = None
        #: Reactor time the lease last began: CONNECT OK or a renewal sent and answered 0.
        self.renewed_at: float | None = None
        self._call: Any = None
        self._turn = 0  # start/stop bump it: an answer to an older turn is dropped

    @property
    def interval(self) -> float:
        """Seconds between two renewals: a third of the lease."""
        return max(MIN_INTERVAL, self.lease / 3)

    @property
    def retry_interval(self) -> float:
        """Seconds before trying again after a renewal got no answer: a third of the
        interval, so that a blip of two thirds of the lease does not lose it."""
        return max(MIN_INTERVAL, self.interval / 3)

    @property
    def running(self) -> bool:
        """A renewal is scheduled or under way, or the indexer holds the lease."""
        return self._call is not None or self.held is not None

    def start(self) -> None:
        """The session's user has just connected: renew now, then every :attr:`interval`."""
        self.stop()
        self.renewed_at = self.reactor.seconds()
        if self.supported:
            self._schedule(0)

    def stop(self) -> None:
        """No more renewals; an answer still on its way is ignored; a held lease's
        connection is no longer watched (the session disconnects the user)."""
        self._turn += 1
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        held, self.held = self.held, None
        if held is not None:
            self.session.indexer.unhold(held)

    # --- renewing -----------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        self._call = self.reactor.callLater(max(0.0, delay), self._renew, self._turn)

    def _renew(self, turn: int) -> Deferred:
        holding = self.hold_supported and not self.session.indexer.classic
        attempt = self._hold(turn) if holding else self._ask(turn)
        return attempt.addErrback(
            lambda failure: self.log.failure("keeping the lease failed", failure)
        )

    @defer.inlineCallbacks
    def _hold(self, turn: int):
        """Ask the indexer to hold the lease on our kept connection (HOLD)."""
        user = self.session.user
        if user is None:
            self._call = None
            return
        sent = self.reactor.seconds()
        try:
            code, rows = yield self.session.indexer.hold(user, lambda: self._lost(turn, user))
        except UnknownOperation:
            self._cannot_hold("the indexer does not know HOLD: renewing with ALIVE", turn)
            return
        except Exception as exc:
            if turn == self._turn:  # unreachable, timed out: try again soon
                self.log.info("HOLD for {user}: {why}", user=user, why=reason(exc))
                self._schedule(sent + self.retry_interval - self.reactor.seconds())
            return
        if turn != self._turn:
            if code == wire.OK:
                self.session.indexer.unhold(user)
            return
        if code == wire.OK:
            self.lease = lease_seconds(rows) or self.lease
            self.renewed_at = sent
            self.held = user
            self._call = None  # nothing to send: the connection holds it
        elif code in (HOLD.no_user, HOLD.not_connected):
            yield self._dropped(turn, user, code, sent)
        else:  # 3: refused this time (a key refused, the indexer's store failing): again later
            self.log.info("HOLD for {user}: code {code}", user=user, code=code)
            self._schedule(sent + self.interval - self.reactor.seconds())

    def _cannot_hold(self, why: str, turn: int) -> None:
        self.hold_supported = False
        self.log.info(why)
        if turn == self._turn:
            self._schedule(0)

    def _lost(self, turn: int, user: str) -> None:
        """The connection that held the lease closed: connect again and hold again now."""
        if turn != self._turn or self.held != user:
            return
        self.held = None
        self.log.info("the connection holding {user}'s lease closed; holding it again", user=user)
        self._schedule(0)

    @defer.inlineCallbacks
    def _ask(self, turn: int):
        user = self.session.user
        if user is None:
            self._call = None
            return
        sent = self.reactor.seconds()
        try:
            code, rows = yield self.session.indexer.request(ALIVE.name, user)
        except UnknownOperation:
            self.supported = False
            self._call = None
            self.log.info("the indexer does not know ALIVE: the lease is not renewed")
            return
        except Exception as exc:
            if turn == self._turn:  # unreachable, timed out: try again sooner
                self.log.info("ALIVE for {user}: {why}", user=user, why=reason(exc))
                self._schedule(sent + self.retry_interval - self.reactor.seconds())
            return
        if turn != self._turn:
            return
        if code == wire.OK:
            self.lease = lease_seconds(rows) or self.lease
            self.renewed_at = sent
            self._schedule(sent + self.interval - self.reactor.seconds())
        elif code in (ALIVE.no_user, ALIVE.not_connected):
            yield self._dropped(turn, user, code, sent)
        else:
            self.log.info("ALIVE for {user}: code {code}", user=user, code=code)
            self._schedule(sent + self.interval - self.reactor.seconds())

    # --- dropped: say so, connect again -----------------------------------------

    @defer.inlineCallbacks
    def _dropped(self, turn: int, user: str, code: int, sent: float):
        session = self.session
        why = self._why(user, code, sent)
        session.output.note(f"the indexer dropped {user} ({why}); reconnecting")
        port = session.port
        if session.server is None or port is None:
            failure = "this shell's peer server is not running"
        else:
            try:
                answer, _rows = yield session.indexer.request("CONNECT", user, port)
            except Exception as exc:
                failure = reason(exc)
            else:
                failure = None if answer == wire.OK else _connect_refused(answer)
        if turn != self._turn:  # the shell disconnected (or connected) meanwhile
            if failure is None and session.user != user:
                yield _quiet_disconnect(session, user)
            return
        if failure is None:
            session.output.note(f"{user} is connected again, serving on port {port}")
            self.renewed_at = self.reactor.seconds()
            holding = self.hold_supported and not session.indexer.classic
            self._schedule(0 if holding else self.interval)
            return
        session.output.note(
            f"could not connect {user} again: {failure}; {user} is offline now "
            "(the peer server is stopped; CONNECT to go online)"
        )
        self._call = None
        yield session.go_offline()

    def _why(self, user: str, code: int, sent: float) -> str:
        """The likely reason the indexer no longer lists ``user``, for the note."""
        if code == ALIVE.no_user:
            return f"it no longer knows {user}: unregistered, or released by its operator"
        since = None if self.renewed_at is None else sent - self.renewed_at
        if since is not None and since < self.lease:
            who = (
                f"another client with {user}'s key? another shell of {user}?"
                if self._claimed(user)
                else "the name is unclaimed: any client may disconnect it"
            )
            return (
                f"its lease was renewed {since:.0f}s before, so a DISCONNECT this shell did "
                f"not send removed it; {who}"
            )
        if since is None:
            return "its lease expired"
        return f"its lease of {self.lease:g}s expired: no renewal reached it for {since:.0f}s"

    def _claimed(self, user: str) -> bool:
        try:
            return self.session.home.identity(user) is not None and not self.session.indexer.classic
        except Exception:
            return False


def _connect_refused(code: int) -> str:
    return _CONNECT_REFUSED.get(code, f"the indexer refused it (code {code})")


@defer.inlineCallbacks
def _quiet_disconnect(session: Session, user: str):
    """Undo an automatic CONNECT that landed after the shell went offline."""
    try:
        yield session.indexer.request("DISCONNECT", user)
    except Exception as exc:
        Lease.log.info("late DISCONNECT of {user}: {why}", user=user, why=reason(exc))
