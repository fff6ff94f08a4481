"""Who is still online: leases of connected users, and probes of classic peers.

docs/protocol.md section 7. Every connected user holds a lease of
``timeout`` seconds, kept in memory only (a restart gives everyone a fresh one:
the grace period). Any request of the user renews it; our clients send
``HOLD`` once on their kept TLS connection, which then holds the lease for as
long as it stays open (TCP keepalive finds a vanished host), or else ``ALIVE``
every third of it.

- A user that sent ``ALIVE`` since its CONNECT (*renewing*) and lets its lease
  run out is dropped.
- A *held* user never expires while a holding connection is open. When the
  last one closes, the user has ``wire.HELD_GRACE`` of the lease to hold
  again (or send anything); then it is dropped.
- A user that never did (a classic client, or one of ours not heard from since
  a restart: *silent*) is probed once its last evidence is ``timeout`` old: a
  TCP connect to its recorded address, closed at once without a byte. An
  answer counts as evidence; a refusal or no answer within ``probe_timeout``
  drops it. Probes are spread over the timeout (at most the silent population
  divided by the timeout per second, at least one per tick) and at most
  ``max_probes`` are in flight.

:class:`Leases` is the bookkeeping (the directory calls it on every request);
:class:`Liveness` is the clock: one tick every ``min(1 s, timeout / 10)``
looks only at the oldest entries, so a tick costs the same with ten users or
a hundred thousand. A dropped user goes through ``drop(user)``, which the
indexer's factory turns into a DISCONNECT (persisted and audited).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from p2p import wire

Address = tuple[str, int]
#: ``prober(address)`` fires True when something accepted a TCP connection there.
Prober = Callable[[Address], Deferred]
#: Probes in flight at most (the CONNECT of a locked-out user is not counted: each
#: one holds a client connection, which the connection cap bounds).
DEFAULT_MAX_PROBES = 64
#: The longest a probe waits for an answer.
MAX_PROBE_TIMEOUT = 5.0


class Leases:
    """The connected users' last evidence of life, oldest first.

    ``renewing``: users that sent ALIVE since their CONNECT, by their last
    request. ``silent``: the others, by their last request or answered probe
    (a user being probed is in neither until its probe ends or it is heard
    from). ``held``: users whose lease a kept connection holds (HOLD), with
    the connections holding it; they never expire while one of those
    connections is open. ``grace``: users whose last holding connection
    closed, by the deadline to hold again (``wire.HELD_GRACE`` of the lease);
    a user is in only one of the four.
    """

    def __init__(
        self, timeout: float = wire.DEFAULT_PEER_TIMEOUT, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout = timeout
        self.now = now
        self.renewing: OrderedDict[str, float] = OrderedDict()
        self.silent: OrderedDict[str, float] = OrderedDict()
        self.held: dict[str, set[object]] = {}
        self.grace: OrderedDict[str, float] = OrderedDict()
        #: Called with (connection, user) for each connection that held a lease ended by
        #: the user's DISCONNECT or a new CONNECT (not by the connection's own close).
        self.on_end: Callable[[object, str], None] | None = None
        #: Each connected user's lease number: a new one at every start (CONNECT, a
        #: load), gone at the end, so a HOLD answered before a DISCONNECT and a new
        #: CONNECT of the same turn can tell the lease it was given has ended.
        self.number: dict[str, int] = {}
        self._numbers = itertools.count(1)

    @property
    def seconds(self) -> int:
        """The lease as ALIVE announces it: whole seconds, at least 1."""
        return max(1, int(self.timeout))

    def start(self, user: str) -> None:
        """A fresh lease (CONNECT, or a restart): silent until the user sends ALIVE.

        Connections that held an earlier lease of the user hold this one no more.
        """
        self.renewing.pop(user, None)
        self._unhold(user)
        self.grace.pop(user, None)
        self.number[user] = next(self._numbers)
        self.silent[user] = self.now()
        self.silent.move_to_end(user)

    def seen(self, user: str) -> None:
        """A request of the connected ``user``: its lease is renewed."""
        if user in self.held:
            return
        if self.grace.pop(user, None) is not None:  # it talks: alive, and renewing
            self.renewing[user] = self.now()
            return
        entries = self.renewing if user in self.renewing else self.silent
        entries[user] = self.now()
        entries.move_to_end(user)

    def renewed(self, user: str) -> None:
        """ALIVE from the connected ``user``: it renews from now on, and is never probed."""
        if user in self.held:
            return
        self.silent.pop(user, None)
        self.grace.pop(user, None)
        self.renewing[user] = self.now()
        self.renewing.move_to_end(user)

    def hold(self, user: str, connection: object) -> None:
        """HOLD from the connected ``user`` on ``connection``: no expiry while it is open."""
        self.renewing.pop(user, None)
        self.silent.pop(user, None)
        self.grace.pop(user, None)
        self.held.setdefault(user, set()).add(connection)

    def release(self, user: str, connection: object) -> None:
        """``connection`` closed. If it was the last holding the user's lease, the lease
        runs again with ``wire.HELD_GRACE`` of it left: time enough for a live client to
        connect again and hold it, while a client that is gone leaves well within one
        lease of its last sign of life."""
        holders = self.held.get(user)
        if holders is None or connection not in holders:
            return
        holders.discard(connection)
        if holders:
            return
        del self.held[user]
        self.grace[user] = self.now() + self.timeout * wire.HELD_GRACE

    def end(self, user: str) -> None:
        """The user is no longer connected."""
        self.number.pop(user, None)
        self.renewing.pop(user, None)
        self.silent.pop(user, None)
        self._unhold(user)
        self.grace.pop(user, None)

    def _unhold(self, user: str) -> None:
        """The user's lease ends otherwise than by its holders' close: tell them."""
        holders = self.held.pop(user, None)
        if holders and self.on_end is not None:
            for connection in holders:
                self.on_end(connection, user)

    def reset(self, connected: list[str]) -> None:
        """Match the connected users (after a load): new ones get a fresh lease."""
        keep = set(connected)
        for entries in (self.renewing, self.silent, self.held, self.grace, self.number):
            for user in [u for u in entries if u not in keep]:
                del entries[user]
        for user in connected:
            if not self.heard(user):
                self.start(user)

    def heard(self, user: str) -> bool:
        """True when the user is renewing, held, or was heard from since its probe began."""
        return (
            user in self.renewing or user in self.silent or user in self.held or user in self.grace
        )


class Ticking:
    """A :meth:`check` every :attr:`tick` seconds (a tenth of the lease, at most 1 s)
    on ``reactor``, from :meth:`start` until :meth:`stop`: the liveness loop of either
    store (the leases given at load run from the start on)."""

    def __init__(self, reactor: IReactorTime, lease: float) -> None:
        self.reactor = reactor
        #: Seconds between two looks at the oldest leases.
        self.tick = min(1.0, lease / 10)
        self.stopped = False
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor

    def start(self) -> None:
        """Begin ticking (once: a second start changes nothing)."""
        if not self._loop.running:
            self._loop.start(self.tick, now=False)

    def stop(self) -> None:
        """Stop ticking: nobody is dropped any more."""
        self.stopped = True
        if self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        """One tick."""
        raise NotImplementedError


class Liveness(Ticking):
    """Drops connected users whose lease ran out, probing silent ones first."""

    log = Logger()

    def __init__(
        self,
        leases: Leases,
        reactor: IReactorTime,
        address_of: Callable[[str], Address | None],
        drop: Callable[[str], None],
        prober: Prober,
        max_probes: int = DEFAULT_MAX_PROBES,
    ) -> None:
        super().__init__(reactor, leases.timeout)
        self.leases = leases
        self.address_of = address_of
        self.drop = drop
        self.prober = prober
        self.max_probes = max_probes
        #: In flight: user -> (the address probed, its Deferred).
        self._probes: dict[str, tuple[Address, Deferred]] = {}
        self._scheduled = 0  # of those, how many the tick started (bounded by max_probes)
        self._allowance = 0  # probes this tick may still start
        self.probes_sent = 0  # diagnostics and the benchmark

    def stop(self) -> None:
        """Stop ticking and give up the probes in flight (nobody is dropped any more)."""
        super().stop()
        for _address, d in list(self._probes.values()):
            d.cancel()

    def check(self) -> None:
        """One tick: drop renewing users past their lease and released ones past their
        grace, probe silent ones past their lease."""
        leases = self.leases
        now = leases.now()
        self._drop_until(leases.renewing, now - leases.timeout, "renewed nothing for a lease")
        self._drop_until(
            leases.grace, now, "did not hold its lease again after its connection closed"
        )
        population = len(leases.silent) + self._scheduled
        self._allowance = max(1, math.ceil(population * self.tick / leases.timeout))
        self._probe_due()

    def _drop_until(self, entries: OrderedDict[str, float], limit: float, why: str) -> None:
        """Drop the users at the head of ``entries`` (oldest first) whose time is <= limit."""
        while entries:
            user, when = next(iter(entries.items()))
            if when > limit:
                break
            del entries[user]
            self.log.info("{user} {why}: dropped", user=user, why=why)
            self.drop(user)

    def _probe_due(self) -> None:
        """Probe the silent users past their lease, oldest first, while this tick's
        allowance lasts and fewer than ``max_probes`` are in flight."""
        silent = self.leases.silent
        expired = self.leases.now() - self.leases.timeout
        while silent and self._allowance > 0 and self._scheduled < self.max_probes:
            user, last = next(iter(silent.items()))
            if last > expired:
                break
            del silent[user]
            self._allowance -= 1
            self._scheduled += 1
            self.probe(user).addCallback(self._probed, user)

    def _probed(self, answered: bool, user: str) -> None:
        self._scheduled -= 1
        if self.stopped:
            return
        if not answered and not self.leases.heard(user) and self.address_of(user) is not None:
            self.log.info("{user}'s peer does not answer: dropped", user=user)
            self.drop(user)
        self._probe_due()  # a slot is free: the rest of this tick's allowance may use it

    def probe(self, user: str) -> Deferred:
        """Probe the user's recorded address; fires True if it answered.

        One probe per user at a time: a second asker shares the first's answer.
        An answer is evidence: the user's lease runs again from now.
        """
        address = self.address_of(user)
        if address is None:
            return succeed(False)
        running = self._probes.get(user)
        if running is not None and running[0] == address:
            return _share(running[1])
        self.probes_sent += 1
        d = self.prober(address)
        self._probes[user] = (address, d)

        def done(answered: object) -> bool:
            answered = answered is True
            if self._probes.get(user, (None, None))[1] is d:
                del self._probes[user]
            if answered and self.address_of(user) == address and user not in self.leases.renewing:
                self.leases.seen(user)
            return answered

        d.addBoth(done)
        return _share(d)


def _share(d: Deferred) -> Deferred:
    """A new Deferred with ``d``'s result, leaving ``d``'s own result in place."""
    out: Deferred = Deferred()

    def relay(result: object) -> object:
        out.callback(result)
        return result

    d.addCallback(relay)
    return out


class TCPProber:
    """Connects to an address and closes at once, without sending a byte."""

    def __init__(self, reactor, timeout: float = MAX_PROBE_TIMEOUT) -> None:
        self.reactor = reactor
        self.timeout = timeout

    def __call__(self, address: Address) -> Deferred:
        host, port = address
        kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = kind(self.reactor, host, port, timeout=self.timeout)
        d = connectProtocol(endpoint, Protocol())

        def answered(proto: Protocol) -> bool:
            proto.transport.loseConnection()
            return True

        return d.addCallbacks(answered, lambda _failure: False)


def watch(factory, max_probes: int = DEFAULT_MAX_PROBES) -> Liveness:
    """Start dropping the gone users of an :class:`p2p.indexer.protocol.IndexerFactory`.

    Its directory's leases decide the timeout. A probe waits at most
    ``MAX_PROBE_TIMEOUT``, half the lease, and half the request timeout (a
    CONNECT waits for one before its reply).
    """
    directory, reactor = factory.directory, factory.reactor
    leases = directory.leases
    wait = min(MAX_PROBE_TIMEOUT, leases.timeout / 2, factory.timeout / 2)
    liveness = Liveness(
        leases,
        reactor,
        address_of=lambda user: directory.connected.get(user),  # load() replaces the dict
        drop=factory.expire,
        prober=TCPProber(reactor, wait),
        max_probes=max_probes,
    )
    factory.liveness = liveness
    liveness.start()
    return liveness
