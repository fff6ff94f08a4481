"""``twistd p2p-stack``: the indexer, the audit logger and the time service in one process.

The stack's command line is built from the three services' own ``Options``
classes: every option of every part is available, under its own name, or
prefixed with the part's name (``--indexer-listen``, ``--logger-listen``,
``--time-listen``) when two parts share it. An option added to a part shows up
here by itself. The arguments given for a part are parsed by that part's
``Options``, so its defaults, coercions and checks apply unchanged.

Unless told otherwise (``--logger`` or ``--logger-host``), the indexer sends
its audit records to the stack's own logger, at its first TCP port on
127.0.0.1, with the logger's program number.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import reflect, usage

from p2p import wire
from p2p.console import say
from p2p.indexer import service as indexer_service
from p2p.logger import service as logger_service
from p2p.logs import LogOptions, ServiceLogs
from p2p.metrics import BY_PARENT, METRICS_OPTION, MetricsService
from p2p.startup import StartGuard
from p2p.timews import service as time_service

#: The parts, in start order: the logger first so the indexer's relay finds it.
PARTS: dict[str, type] = {
    "logger": logger_service,
    "indexer": indexer_service,
    "time": time_service,
}


@dataclass(frozen=True)
class PartOption:
    """One long option of one part's ``Options``."""

    part: str
    name: str  # as the part spells it, e.g. "max-connections"
    takes_value: bool
    doc: str


def part_options(part: str, options_class: type[usage.Options]) -> list[PartOption]:
    """The long options of ``options_class`` (parameters, flags and opt_ handlers).

    Gathered the way ``usage.Options`` gathers them; one-letter aliases and
    the base class's ``--help``/``--version`` are left out.
    """
    found: dict[str, PartOption] = {}
    parameters: list = []
    reflect.accumulateClassList(options_class, "optParameters", parameters)
    for name, _short, default, doc, *_coerce in parameters:
        shown = f"{doc} [default: {default}]" if default is not None else doc
        found[name] = PartOption(part, name, True, shown)
    flags: list = []
    reflect.accumulateClassList(options_class, "optFlags", flags)
    for name, _short, doc in flags:
        found[name] = PartOption(part, name, False, doc)
    handlers: dict = {}
    reflect.addMethodNamesToDict(options_class, handlers, "opt_")
    base: dict = {}
    reflect.addMethodNamesToDict(usage.Options, base, "opt_")
    by_function: dict = {}
    for attr in handlers:
        if attr in base or len(attr) == 1:
            continue
        function = getattr(options_class, "opt_" + attr)
        by_function.setdefault(function, []).append(attr)
    for function, attrs in by_function.items():
        name = max(attrs, key=len).replace("_", "-")  # the longest alias, as usage does
        takes_value = len(inspect.signature(function).parameters) == 2
        doc = inspect.getdoc(function) or ""
        found[name] = PartOption(part, name, takes_value, doc)
    return list(found.values())


def stack_names(options: list[PartOption]) -> dict[str, PartOption]:
    """The stack's name of every option: its own, or ``part-name`` when shared."""
    count: dict[str, int] = {}
    for option in options:
        count[option.name] = count.get(option.name, 0) + 1
    names: dict[str, PartOption] = {}
    for option in options:
        name = option.name if count[option.name] == 1 else f"{option.part}-{option.name}"
        if name in names:
            raise RuntimeError(f"stack option --{name} would mean two options")
        names[name] = option
    return names


def _handler(option: PartOption):
    """An ``opt_`` method recording the option for its part's own parser."""
    if option.takes_value:

        def handle(self, value: str) -> None:
            self.argv[option.part].append(f"--{option.name}={value}")

    else:

        def handle(self) -> None:
            self.argv[option.part].append(f"--{option.name}")

    handle.__doc__ = f"{option.doc} ({option.part})"
    return handle


class _StackOptionsBase(LogOptions, usage.Options):
    synopsis = "[options]"
    longdesc = (
        "The indexer, the audit logger and the SOAP time service in one process. "
        "Options two services share are prefixed with the service's name."
    )
    # One endpoint serves every part's metrics (the parts' own --metrics are not offered).
    optParameters = [METRICS_OPTION]

    def __init__(self) -> None:
        super().__init__()
        self.argv: dict[str, list[str]] = {part: [] for part in PARTS}
        self.parts: dict[str, usage.Options] = {}

    def postOptions(self) -> None:
        for part, module in PARTS.items():
            sub = module.Options()
            try:
                sub.parseOptions(self.argv[part])
            except usage.UsageError as exc:
                raise usage.UsageError(f"{part}: {exc}") from None
            if self["metrics"] is not None:
                sub["metrics"] = BY_PARENT  # counts; the stack serves them
            self.parts[part] = sub
        self._point_indexer_at_own_logger()

    def _given(self, part: str, name: str) -> bool:
        prefix = f"--{name}="
        return any(arg == f"--{name}" or arg.startswith(prefix) for arg in self.argv[part])

    def _point_indexer_at_own_logger(self) -> None:
        indexer, logger = self.parts["indexer"], self.parts["logger"]
        if self._given("indexer", "logger") or self._given("indexer", "logger-host"):
            return
        streams = [spec for spec in logger["listen"] if not spec.startswith("udp:")]
        if not streams:
            raise usage.UsageError("the logger has no TCP listen address: give --logger")
        target = connect_to(streams[0])
        if target is None:
            raise usage.UsageError(
                f"cannot tell the indexer where the logger listens ({streams[0]}): give --logger"
            )
        indexer["logger"] = target.endpoint
        indexer["logger-host"] = None
        if not self._given("indexer", "logger-program"):
            indexer["logger-program"] = logger["program"]


def _build_options_class() -> type[usage.Options]:
    # The parts' log options are the process's: the stack has them once, as its own.
    own = {name for name, *_ in LogOptions.optParameters} | {METRICS_OPTION[0]}
    options: list[PartOption] = []
    for part, module in PARTS.items():
        options += [o for o in part_options(part, module.Options) if o.name not in own]
    namespace = {
        "opt_" + name.replace("-", "_"): _handler(option)
        for name, option in stack_names(options).items()
    }
    namespace["__doc__"] = "Command line of ``twistd p2p-stack`` (built from the parts)."
    return type("Options", (_StackOptionsBase,), namespace)


Options = _build_options_class()


# --- Where a client reaches a listening address ------------------------------


@dataclass(frozen=True)
class Target:
    """How a local client reaches a server endpoint: host and port, and as an endpoint."""

    host: str
    port: int
    endpoint: str


def _split(description: str) -> list[str]:
    """Split an endpoint description on ``:``, honouring ``\\:`` escapes."""
    parts, current, chars = [], "", iter(description)
    for ch in chars:
        if ch == "\\":
            current += next(chars, "")
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def connect_to(description: str) -> Target | None:
    """Where a client on this host reaches a ``tcp:``/``tcp6:`` server endpoint.

    The wildcard interface becomes loopback. ``None`` for other kinds and for
    port 0 (only known once listening).
    """
    kind, *rest = _split(description)
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [p for p in rest if "=" not in p]
    keywords = dict(p.split("=", 1) for p in rest if "=" in p)
    port_text = keywords.get("port", positional[0] if positional else "")
    if not port_text.isdigit() or int(port_text) == 0:
        return None
    interface = keywords.get("interface", positional[2] if len(positional) > 2 else "")
    if kind == "tcp":
        host = wire.local_host(interface)
        return Target(host, int(port_text), f"tcp:host={host}:port={port_text}")
    host = wire.local_host(interface, unspecified="::1")
    escaped = host.replace(":", "\\:")
    return Target(host, int(port_text), f"tcp6:host={escaped}:port={port_text}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def client_command(
    options: usage.Options,
    bound_indexer: Target | None = None,
    bound_wsdl: str | None = None,
    fingerprint: str | None = None,
) -> str:
    """The command that starts a client against this stack.

    ``bound_indexer`` and ``bound_wsdl`` are where the services really listen,
    for endpoints whose port the options leave to the kernel (``tcp:0``);
    ``fingerprint`` is the indexer's key, which the command pins (no first-use trust).
    """
    indexer = connect_to(options.parts["indexer"]["listen"]) or bound_indexer
    time = connect_to(options.parts["time"]["listen"])
    # Beside this Python, as in .venv/bin, and absolute: the line works pasted anywhere.
    client = Path(sys.executable).with_name("p2p-client")
    words = [str(client.absolute()) if client.exists() else "p2p-client"]
    if indexer is not None:
        words += ["-s", indexer.host, "-p", str(indexer.port)]
    if fingerprint is not None:
        words += ["--indexer-fingerprint", fingerprint]
    if time is not None:
        words += ["--wsdl", f"http://{_url_host(time.host)}:{time.port}/?wsdl"]
    elif bound_wsdl is not None:
        words += ["--wsdl", bound_wsdl]
    return shlex.join(words)


#: The demo folder ``make run`` names: the stack fills it and prints a tour.
DEMO_ENV = "P2P_DEMO_DIR"
DEMO_FILE = "hello.txt"
DEMO_BYTES = b"Hello from alice! This file came to you peer to peer.\n"


def demo_tour(command: str, demo: Path) -> list[str]:
    """Fill ``demo`` (alice's share holding one file, bob's empty one); the tour's lines.

    Lines indented by four spaces are to be pasted: a shell command, or the
    commands at a client's prompt. Every path is absolute, so they work from
    any directory.
    """
    demo = demo.absolute()
    alice, bob = demo / "alice", demo / "bob"
    for folder in (alice, bob):
        folder.mkdir(parents=True, exist_ok=True)
    sample = alice / DEMO_FILE
    if not sample.exists():
        sample.write_bytes(DEMO_BYTES)
    copy = bob / DEMO_FILE
    return [
        f"s> tour: in a second terminal, from any directory, alice shares {alice}:",
        f"    {command} --share-dir {shlex.quote(str(alice))}",
        "s> tour: at alice's c> prompt:",
        "    REGISTER alice",
        "    CONNECT alice",
        f"    PUBLISH {DEMO_FILE} a file from the demo folder",
        f"s> tour: in a third terminal, bob fetches it into {bob}:",
        f"    {command} --share-dir {shlex.quote(str(bob))}",
        "s> tour: at bob's c> prompt:",
        "    REGISTER bob",
        "    CONNECT bob",
        "    LIST_USERS",
        "    LIST_CONTENT alice",
        "    SEARCH hello",
        f"    GET_FILE alice {DEMO_FILE} {copy}",
        "    QUIT",
        f"s> tour: then QUIT at alice's prompt, and: cat {shlex.quote(str(copy))}",
    ]


def _bound_addresses(top: MultiService) -> tuple[Target | None, str | None, str | None]:
    """Where the running indexer and time service listen (for ``tcp:0`` endpoints),
    and the indexer's key fingerprint."""
    indexer, wsdl, fingerprint = None, None, None
    services = list(top)
    while services:
        service = services.pop()
        if isinstance(service, MultiService):
            services.extend(service)
        elif isinstance(service, indexer_service.IndexerService) and service.port is not None:
            address = service.port.getHost()
            host = getattr(address, "host", None)
            if host is not None:
                indexer = Target(wire.local_host(host), address.port, "")
            if service.identity is not None:
                fingerprint = service.identity.fingerprint
        elif isinstance(service, time_service.TimeWebService) and "://" in (service.url or ""):
            wsdl = service.url
    return indexer, wsdl, fingerprint


class StackService(StartGuard, ServiceLogs, MultiService):
    """The three services; says how to start a client once they are all up.

    A part that cannot start (an exception, or a critical event it logs while
    starting, such as a port already in use) is said on the terminal in one
    line, since twistd's log may go to a file, and the stack stops instead of
    running without it: at start, with status 1 and no traceback (``p2p.startup``).
    """

    label = "stack"

    def __init__(self, options: usage.Options) -> None:
        super().__init__()
        self.options = options
        self.log_options = options
        self.startup_failures: list[str] = []

    def _observe(self, event: dict) -> None:
        if event.get("log_level") is LogLevel.critical:
            failure = event.get("log_failure")
            text = formatEvent(event)
            if failure is not None:
                text = f"{text}: {failure.getErrorMessage()}"
            self.startup_failures.append(text)

    def privilegedStartService(self) -> None:
        globalLogPublisher.addObserver(self._observe)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        # Once the reactor runs: every part has printed its address by then, and
        # twistd's signal handlers are installed, so Ctrl-C is a clean stop.
        reactor.callWhenRunning(self._announce, reactor)

    def stopService(self) -> defer.Deferred:
        d = defer.maybeDeferred(super().stopService)
        return d.addCallback(lambda _: say("s> stack stopped"))

    def cannot_start(self, text: str) -> NoReturn:
        """A part's failure (worded by its own guard): one line, then status 1."""
        with contextlib.suppress(ValueError):
            globalLogPublisher.removeObserver(self._observe)
        for part in self:  # the part's fix names its --listen: the stack's is --PART-listen
            if text.startswith(f"{getattr(part, 'label', part.name)} "):
                text = text.replace("--listen", f"--{part.name}-listen")
        super().cannot_start(f"cannot start the stack: {text}")

    def _announce(self, reactor) -> None:
        with contextlib.suppress(ValueError):
            globalLogPublisher.removeObserver(self._observe)
        if self.startup_failures:
            for failure in self.startup_failures:
                say(f"s> cannot start the stack: {failure}")
            with contextlib.suppress(ReactorNotRunning):  # the part may have stopped it already
                reactor.stop()
            return
        command = client_command(self.options, *_bound_addresses(self))
        say(f"s> client: {command}")
        say("s> ready; Ctrl-C stops the stack")
        demo = os.environ.get(DEMO_ENV)
        if demo:
            try:
                say("\n".join(demo_tour(command, Path(demo))))
            except OSError as exc:
                say(f"s> tour: cannot prepare the demo folder {demo}: {exc}")


def makeService(options: usage.Options) -> IService:
    """The stack: one MultiService holding the logger, the indexer and the time service,
    and with ``--metrics`` the endpoint serving all their metrics."""
    stack = StackService(options)
    for part, module in PARTS.items():
        child = module.makeService(options.parts[part])
        if not child.name:
            child.setName(part)
        child.setServiceParent(stack)
    if options["metrics"] is not None:
        collectors = [c.metrics for c in stack if getattr(c, "metrics", None) is not None]
        MetricsService(options["metrics"], collectors).setServiceParent(stack)
    return stack
