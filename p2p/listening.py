"""How every p2p server listens: one helper, one service, one connection cap, one option check.

- :func:`listen` listens on an endpoint description and raises at once when
  the port cannot be opened (TCP and UNIX endpoints listen synchronously), so
  a service calling it while twistd starts makes twistd exit non-zero with
  the error instead of running without its server.
- :class:`ListeningService` is that, as a twistd service: it listens before
  privileges are dropped, says where it listens (each service words its own
  line), says why it cannot, and stops listening at stop.
- :class:`ConnectionCap` counts a factory's open connections and refuses new
  ones beyond ``max_connections``, or beyond ``max_per_source`` from one
  source address: ``buildProtocol`` returns None, so the port closes the new
  socket at once, unanswered. Sources that proved themselves
  (:class:`KnownSources`) keep one connection even at the total cap.
  :class:`CappedWrappingFactory` puts the same cap in front of a factory whose
  protocols we do not write (twisted.web's ``Site``).
- :func:`positive_int` and :func:`positive_float` coerce ``usage.Options``
  parameters that must be at least 1 / above 0.

Public Twisted API only; this module imports nothing of the services.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure

from p2p import wire
from p2p.console import say

log = Logger()


def positive_int(text: str) -> int:
    """An option value that must be a whole number of at least 1."""
    number = int(text)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def positive_float(text: str) -> float:
    """An option value that must be a number above 0."""
    number = float(text)
    if not number > 0:  # also refuses NaN
        raise ValueError("must be > 0")
    return number


def local_http_url(address: object, path: str) -> str | None:
    """``http://HOST:PORT/PATH`` where a client on this host reaches a listening TCP
    address (the wildcard interface becomes loopback); None for other addresses."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return None
    host = wire.local_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def listen(reactor, description: str, factory: IProtocolFactory) -> Deferred[IListeningPort]:
    """Listen on a server endpoint description; fires with the listening port.

    A failure already known when the endpoint returns (the port is taken, the
    address is not ours: TCP and UNIX endpoints know at once) is raised here
    rather than left in the Deferred, so a caller starting under twistd stops
    twistd with the error. An endpoint that listens later fails the Deferred.
    """
    d = serverFromString(reactor, description).listen(factory)
    outcome: list = []

    def seen(result):
        outcome.append(result)
        return result

    d.addBoth(seen)
    if outcome and isinstance(outcome[0], Failure):
        d.addErrback(lambda _: None)  # raised below instead
        outcome[0].raiseException()
    return d


class ListeningService(Service):
    """A twistd service that listens on ``description`` with ``factory``.

    It listens in ``privilegedStartService`` (a low port works before twistd
    drops privileges), or in ``startService`` when started without it. A port
    that cannot be opened raises there, after :meth:`cannot_listen` has said
    why; one that fails later is logged and stops the reactor. Subclasses say
    where they listen in :meth:`listening` and may set ``factory`` in their own
    ``privilegedStartService`` before calling this one.
    """

    #: Who is listening, for the ``s> ... cannot listen on ...`` line.
    label = "service"

    def __init__(
        self, description: str, factory: IProtocolFactory | None = None, reactor=None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.description = description
        self.factory = factory
        self.reactor = reactor
        #: The listening port, once it is open.
        self.port: IListeningPort | None = None
        self._listen_called = False
        self._waiting: Deferred | None = None  # an endpoint that has not answered yet

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen_called = True
        try:
            d = listen(self.reactor, self.description, self.factory)
        except Exception:
            self.cannot_listen(Failure())
            raise
        if not d.called:
            self._waiting = d
        d.addCallbacks(self._listening, self._failed_later)

    def startService(self) -> None:
        super().startService()
        if not self._listen_called:
            self.privilegedStartService()

    def stopService(self) -> Deferred | None:
        super().stopService()
        self._listen_called = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.cancel()  # stopped before the endpoint answered: never listen
        port, self.port = self.port, None
        return maybeDeferred(port.stopListening) if port is not None else None

    def _listening(self, port: IListeningPort) -> None:
        self._waiting = None
        self.port = port
        self.listening(port)

    def _failed_later(self, failure: Failure) -> None:
        self._waiting = None
        if failure.check(CancelledError):
            return  # stopped while waiting
        self.cannot_listen(failure)
        log.failure("cannot listen on {description}", failure, description=self.description)
        # At start-up the reactor is not running yet: stop it as soon as it is.
        self.reactor.callWhenRunning(self.reactor.stop)

    def listening(self, port: IListeningPort) -> None:
        """The port is open: say where (``port.getHost()``). Override."""

    def cannot_listen(self, failure: Failure) -> None:
        """Say on the terminal why the port could not be opened (twistd's log may be a file)."""
        say(f"s> {self.label} cannot listen on {self.description}: {failure.getErrorMessage()}")


#: Default connections one source address may hold open on a server: a
#: sixteenth of ``wire.DEFAULT_MAX_CONNECTIONS`` (1024), so one address alone
#: never fills the cap; a NAT in front of many honest users still gets 64.
DEFAULT_MAX_PER_SOURCE = 64

#: ``--max-connections`` and ``--max-per-source``, the ``usage.Options`` rows of a
#: server whose factory is a :class:`ConnectionCap`.
CAP_OPTIONS: list[list] = [
    [
        "max-connections",
        None,
        wire.DEFAULT_MAX_CONNECTIONS,
        "Open connections beyond which new ones are closed at once.",
        positive_int,
    ],
    [
        "max-per-source",
        None,
        DEFAULT_MAX_PER_SOURCE,
        "Open connections from one address beyond which its new ones are closed at once.",
        positive_int,
    ],
]


def source_of(addr: object) -> str:
    """Whom a connection is counted against: the peer's host for TCP, ``local`` otherwise.

    Every UNIX-socket (or other host-less) connection counts as one source.
    """
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return addr.host
    return "local"


class KnownSources:
    """Sources that proved themselves (say, a relay whose records were stored).

    Bounded: the ``size`` most recently vouched for are kept, the oldest
    forgotten first. At its total cap a :class:`ConnectionCap` sharing this set
    still admits one connection from a known source that holds none, up to
    ``size`` connections beyond the cap, so a crowd of other sources filling
    every slot cannot keep such a client out.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._sources: OrderedDict[str, None] = OrderedDict()

    def vouch(self, addr: object) -> None:
        """``addr``'s source did something only a real client does: remember it."""
        source = source_of(addr)
        self._sources[source] = None
        self._sources.move_to_end(source)
        while len(self._sources) > self.size:
            self._sources.popitem(last=False)

    def __contains__(self, source: str) -> bool:
        return source in self._sources


class ConnectionCap:
    """Mixin for a protocol factory: at most ``max_connections`` open at once, and at
    most ``max_per_source`` of them from one source address (:func:`source_of`).

    The factory's ``buildProtocol`` asks :meth:`admit` first and returns None
    when refused (the port then closes the new socket at once, unanswered);
    each admitted connection's end must call :meth:`connection_closed` with
    the address ``admit`` was given. With ``max_per_source`` None (the
    default) sources are not counted apart. ``known``, when set, names the
    sources that may have one connection beyond the total cap.
    """

    max_connections: int
    max_per_source: int | None = None
    known: KnownSources | None = None
    #: Connections admitted and not yet closed.
    open_connections = 0
    #: Connections refused since the start.
    refused_connections = 0
    _refusing = False
    _held: dict[str, int] | None = None  # per source: connections open
    _refusing_sources: set[str] | None = None  # sources warned about, holding connections

    def admit(self, addr: object) -> bool:
        """Count a new connection in, or refuse it when a cap is reached."""
        if self.max_per_source is None:
            source, held = None, 0
        else:
            if self._held is None:
                self._held, self._refusing_sources = {}, set()
            source = source_of(addr)
            held = self._held.get(source, 0)
            if held >= self.max_per_source:
                return self._refuse_source(source, held)
        if self.open_connections >= self.max_connections and not self._may_exceed(source, held):
            self.refused_connections += 1
            if not self._refusing:  # once per spell at the cap, not once per connection
                self._refusing = True
                log.warn(
                    "{n} connections open: refusing new ones (first: {addr})",
                    n=self.open_connections,
                    addr=addr,
                )
            return False
        self._refusing = False
        self.open_connections += 1
        if source is not None:
            self._held[source] = held + 1
        return True

    def _may_exceed(self, source: str | None, held: int) -> bool:
        known = self.known
        return (
            known is not None
            and held == 0
            and source in known
            and self.open_connections < self.max_connections + known.size
        )

    def _refuse_source(self, source: str, held: int) -> bool:
        self.refused_connections += 1
        if source not in self._refusing_sources:  # once until that source's count drops to 0
            self._refusing_sources.add(source)
            log.warn("{source} holds {n} connections: refusing more from it", source=source, n=held)
        return False

    def connection_closed(self, addr: object = None) -> None:
        """An admitted connection from ``addr`` (as given to :meth:`admit`) has ended."""
        self.open_connections -= 1
        if self._held is not None:
            source = source_of(addr)
            held = self._held.pop(source, 0) - 1
            if held > 0:
                self._held[source] = held
            else:
                self._refusing_sources.discard(source)


class CappedWrappingFactory(ConnectionCap, WrappingFactory):
    """Wraps a factory whose protocols do not report their end; caps its connections."""

    def __init__(
        self,
        wrapped: IProtocolFactory,
        max_connections: int,
        max_per_source: int | None = None,
    ) -> None:
        super().__init__(wrapped)
        self.max_connections = max_connections
        self.max_per_source = max_per_source

    def buildProtocol(self, addr):
        if not self.admit(addr):
            return None
        wrapper = super().buildProtocol(addr)
        wrapper.source_addr = addr
        return wrapper

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        self.connection_closed(p.source_addr)
