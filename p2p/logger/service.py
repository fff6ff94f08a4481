"""``twistd p2p-logger``: the audit logger serving LOG on TCP and UDP.

Options and ``makeService`` follow the service contract of the rules, so the
all-in-one stack can compose this service. At start the service opens the
audit file, listens on every ``--listen`` address, prints where it listens and
registers its ports with the local portmapper (unless ``--no-rpcbind``); at
stop it unregisters, stops listening and closes the files.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from p2p import wire
from p2p.console import say
from p2p.listening import (
    DEFAULT_MAX_PER_SOURCE,
    KnownSources,
    listen,
    positive_float,
    positive_int,
)
from p2p.logcontract import parse_program
from p2p.logger.audit import DEFAULT_MAX_SENDERS, AuditLog
from p2p.logger.program import DEFAULT_MAX_MESSAGE, LoggerProgram
from p2p.logs import LogOptions, ServiceLogs
from p2p.metrics import METRICS_OPTION, Metrics, counts_wanted, serve_metrics
from p2p.oncrpc import portmap, rpc
from p2p.oncrpc.server import Dispatcher, RpcDatagramProtocol, RpcStreamFactory
from p2p.startup import StartGuard

log = Logger()

DEFAULT_LISTEN = (f"tcp:{wire.LOGGER_PORT}", f"udp:{wire.LOGGER_PORT}")

#: Seconds a TCP connection may go without a complete record (``--idle-timeout``).
DEFAULT_IDLE_TIMEOUT = 120.0


def _program(text: str) -> int:
    try:
        return parse_program(text)
    except ValueError as exc:
        raise usage.UsageError(f"--program {exc}") from None


def parse_udp(spec: str) -> tuple[int, str]:
    """``udp:PORT[:interface=ADDR]`` -> (port, interface); ADDR may be IPv6 (``::1``)."""
    port_text, sep, rest = spec[len("udp:") :].partition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise usage.UsageError(f"bad UDP address {spec!r}: udp:PORT[:interface=ADDR]")
    interface = ""
    if sep:
        key, eq, value = rest.partition("=")
        if key != "interface" or not eq or not value:
            raise usage.UsageError(f"bad UDP option {rest!r} in {spec!r}")
        interface = value
    return int(port_text), interface


class Options(LogOptions, usage.Options):
    """Command line of ``twistd p2p-logger``."""

    synopsis = "[--listen ENDPOINT]... [--program N] [--audit-file PATH] [options]"
    longdesc = (
        "The p2p audit logger: ONC-RPC program P2P_LOGGER (logger.x) on TCP and UDP. "
        "Each LOG record is printed and appended to the audit file before the reply."
    )
    optFlags = [
        ["no-rpcbind", None, "Do not register with the local portmapper/rpcbind."],
        [
            "fsync",
            None,
            "fsync the audit file before each reply (grouped); slower, survives power loss.",
        ],
    ]
    optParameters = [
        [
            "program",
            None,
            f"{wire.LOGGER_PROGRAM:#x}",
            "RPC program number (0x20000000-0x3FFFFFFF).",
            _program,
        ],
        ["audit-file", None, "p2p-audit.log", "File the records are appended to."],
        ["state-file", None, None, "Relay sequence journal (default: AUDIT-FILE.state)."],
        [
            "max-message",
            None,
            DEFAULT_MAX_MESSAGE,
            "Longest LOG message in bytes; longer is GARBAGE_ARGS.",
            positive_int,
        ],
        [
            "max-senders",
            None,
            DEFAULT_MAX_SENDERS,
            "Relay senders remembered for exactly-once delivery; beyond it the one "
            "that stored least recently is forgotten (any client can make up senders).",
            positive_int,
        ],
        ["rpcbind-host", None, "127.0.0.1", "Where the portmapper to register with runs."],
        [
            "max-connections",
            None,
            wire.DEFAULT_MAX_CONNECTIONS,
            "Open TCP connections beyond which new ones are closed at once.",
            positive_int,
        ],
        [
            "max-per-source",
            None,
            DEFAULT_MAX_PER_SOURCE,
            "Open TCP connections from one address beyond which its new ones are closed "
            "at once (a relay whose records were stored still gets one at the total cap).",
            positive_int,
        ],
        [
            "idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds a TCP connection may stay without a complete record before it is "
            "closed (the indexer's relay reconnects).",
            positive_float,
        ],
        METRICS_OPTION,
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, spec: str) -> None:
        """Listen here (repeatable): tcp:... (any stream endpoint) or udp:PORT[:interface=ADDR].

        Default: tcp:9091 and udp:9091.
        """
        if spec.startswith("udp:"):
            parse_udp(spec)
        self["listen"].append(spec)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if isinstance(self["program"], str):
            self["program"] = _program(self["program"])
        if not self["listen"]:
            self["listen"] = list(DEFAULT_LISTEN)


def _describe(kind: str, address) -> str:
    if isinstance(address, IPv4Address):
        return f"{kind} {address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"{kind} [{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return f"{kind} unix:{name.decode() if isinstance(name, bytes) else name}"
    return f"{kind} {address}"


class FsyncGroup:
    """One fsync (in a thread) for all the records stored in the same reactor turn."""

    def __init__(self, reactor, sync) -> None:
        self.reactor = reactor
        self.sync = sync
        self._waiters: list[defer.Deferred] = []

    def __call__(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        if len(self._waiters) == 1:
            self.reactor.callLater(0, self._run)
        return d

    def _run(self) -> None:
        waiters, self._waiters = self._waiters, []

        def fire(result):
            for d in waiters:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)

        threads.deferToThread(self.sync).addBoth(fire)


class LoggerService(StartGuard, ServiceLogs, service.MultiService):
    """Listeners, audit file and portmapper registration of one logger.

    Run by twistd, it logs rate-limited to bounded files (``p2p.logs``). An
    audit file or journal that cannot be opened or written (no permission, a
    full disk) or a port that cannot be listened on at start is one line on
    the terminal naming it, and status 1 (``p2p.startup``).
    """

    label = "logger"
    #: The logger's counts (None without ``--metrics``); served by its child, or the stack.
    metrics: Metrics | None = None

    def __init__(self, options: Options, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.options = options
        self.log_options = options
        self.program_number: int = options["program"]
        self.audit = AuditLog(
            options["audit-file"],
            options["state-file"],
            max_senders=options["max-senders"],
            run_in_thread=threads.deferToThread,
        )
        self.logger = LoggerProgram(self.audit, self.program_number, options["max-message"])
        if options["fsync"]:
            self.logger.durable = FsyncGroup(reactor, self.audit.fsync)
        #: Sources whose relay records were stored over TCP: they keep a slot at the cap.
        self.relays = KnownSources()
        self.logger.relay_seen = self._relay_seen
        self.factories: list[RpcStreamFactory] = []  # of the TCP listeners: their connections
        if counts_wanted(options):
            self.metrics = Metrics("p2p_logger")
            self.logger.count_in(self.metrics)
            self.metrics.gauge(
                "open_connections",
                "TCP connections open.",
                lambda: sum(f.open_connections for f in self.factories),
            )
            serve_metrics(self, options, [self.metrics])
        self.dispatcher = Dispatcher([self.logger.program()])
        # record: the largest message plus the longest call header and the length word
        self.max_record = options["max-message"] + rpc.MAX_CALL_HEADER + 8
        self.ports: list[tuple[str, object]] = []  # ("tcp"|"udp", listening port)
        self.registered = False
        self.ready: defer.Deferred = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        with self.start_guard():
            self._open()

    def _open(self) -> None:
        """Open the audit file and listen everywhere; raises when one cannot be."""
        self.audit.open()
        waits = []
        for spec in self.options["listen"]:
            if spec.startswith("udp:"):
                port, interface = parse_udp(spec)
                proto = RpcDatagramProtocol(self.dispatcher)
                listening = self.reactor.listenUDP(port, proto, interface=interface)
                listening.maxPacketSize = 65536  # any datagram up to the UDP maximum, whole
                self.ports.append(("udp", listening))
            else:
                factory = RpcStreamFactory(
                    self.dispatcher,
                    self.max_record,
                    self.options["max-connections"],
                    max_per_source=self.options["max-per-source"],
                    idle_timeout=self.options["idle-timeout"],
                    known=self.relays,
                )
                self.factories.append(factory)
                # raises at once when the port is taken: twistd reports it and exits
                d = listen(self.reactor, spec, factory)
                waits.append(d.addCallback(lambda p: self.ports.append(("tcp", p))))
        defer.gatherResults(waits, consumeErrors=True).addCallback(self._listening)

    def _relay_seen(self, peer: object) -> None:
        # A UDP peer is a (host, port) tuple and may be forged: only TCP vouches.
        if isinstance(peer, (IPv4Address, IPv6Address, UNIXAddress)):
            self.relays.vouch(peer)

    def _listening(self, _=None) -> defer.Deferred:
        where = " ".join(_describe(kind, port.getHost()) for kind, port in self.ports)
        say(f"s> logger program {self.program_number:#x} version {wire.LOGGER_VERSION} {where}")
        d = defer.succeed(None) if self.options["no-rpcbind"] else self._register()
        return d.addBoth(lambda _: self.ready.callback(self))

    @defer.inlineCallbacks
    def _register(self):
        host = self.options["rpcbind-host"]
        vers = wire.LOGGER_VERSION
        try:
            yield portmap.pmap_unset(self.reactor, host, self.program_number, vers)
        except Exception as exc:
            say(f"s> rpcbind not available on {host} ({_reason(exc)}): not registered")
            return
        done = []
        for kind, port in self.ports:
            address = port.getHost()
            if not isinstance(address, IPv4Address):
                continue
            prot = portmap.IPPROTO_TCP if kind == "tcp" else portmap.IPPROTO_UDP
            try:
                ok = yield portmap.pmap_set(
                    self.reactor, host, self.program_number, vers, prot, address.port
                )
            except Exception as exc:
                ok, why = False, _reason(exc)
            else:
                why = "refused (already registered?)"
            if ok:
                self.registered = True
                done.append(f"{kind} {address.port}")
            else:
                say(f"s> rpcbind did not register {kind} {address.port}: {why}")
        if done:
            say(
                f"s> rpcbind registered program {self.program_number:#x} version {vers} "
                + " ".join(done)
            )

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        if self.registered:
            self.registered = False
            try:
                yield portmap.pmap_unset(
                    self.reactor,
                    self.options["rpcbind-host"],
                    self.program_number,
                    wire.LOGGER_VERSION,
                )
                say(f"s> rpcbind unregistered program {self.program_number:#x}")
            except Exception as exc:
                log.warn("could not unregister: {exc}", exc=exc)
        ports, self.ports = self.ports, []
        self.factories = []
        for _kind, port in ports:
            yield port.stopListening()
        self.audit.close()


def _reason(exc: BaseException) -> str:
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"


def makeService(options: Options) -> service.IService:
    """The logger as a twistd service."""
    return LoggerService(options)
