"""``twistd p2p-indexer``: options and the service tree.

:func:`makeService` returns a MultiService holding the listening indexer and,
when a logger is configured, the relay that delivers the audit outbox to it.
"""

from __future__ import annotations

import os

from twisted.application.service import IService, MultiService
from twisted.internet import reactor as default_reactor
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage

from p2p import wire
from p2p.console import say
from p2p.indexer.address import AddressPolicy, primary_address
from p2p.indexer.directory import Directory
from p2p.indexer.protocol import IndexerFactory
from p2p.indexer.store import SYNC_MODES, Store
from p2p.listening import ListeningService, positive_float, positive_int
from p2p.logcontract import parse_program


class Options(usage.Options):
    """Command line of ``twistd p2p-indexer``."""

    synopsis = "[options]"
    longdesc = (
        "The p2p indexer: one request per TCP connection, directory in memory, "
        "every change committed to SQLite before its reply byte."
    )
    optParameters = [
        ["listen", "l", f"tcp:{wire.INDEXER_PORT}", "Server endpoint to listen on."],
        ["db", None, "p2p-indexer.db", "SQLite database file (':memory:' keeps nothing)."],
        [
            "timeout",
            None,
            wire.DEFAULT_TIMEOUT,
            "Seconds a client has to send its whole request (and read the reply).",
            positive_float,
        ],
        [
            "max-connections",
            None,
            wire.DEFAULT_MAX_CONNECTIONS,
            "Open connections beyond which new ones are closed at once.",
            positive_int,
        ],
        [
            "sync",
            None,
            "normal",
            "SQLite synchronous mode: normal (survives a process kill) "
            "or full (also survives a power loss; slower).",
        ],
        ["logger", None, None, "Client endpoint of the audit logger (tcp:host=H:port=P)."],
        [
            "logger-host",
            None,
            None,
            "Host whose portmapper locates the audit logger (env LOGGER_HOST).",
        ],
        [
            "logger-program",
            None,
            f"{wire.LOGGER_PROGRAM:#x}",
            "ONC-RPC program number of the audit logger (decimal or 0x...).",
            parse_program,
        ],
    ]

    def postOptions(self) -> None:
        if self["sync"] not in SYNC_MODES:
            raise usage.UsageError(f"--sync must be one of {', '.join(SYNC_MODES)}")
        if isinstance(self["logger-program"], str):  # the default, as shown in --help
            self["logger-program"] = parse_program(self["logger-program"])
        if not self["logger-host"]:
            self["logger-host"] = os.environ.get("LOGGER_HOST") or None

    @property
    def audit(self) -> bool:
        """True when a logger is configured, so requests are audited."""
        return bool(self["logger"] or self["logger-host"])


class IndexerService(ListeningService):
    """Opens the store, loads the directory, listens; commits and closes on stop."""

    label = "indexer"

    def __init__(
        self,
        listen: str,
        store: Store,
        directory: Directory,
        timeout: float,
        max_connections: int,
        reactor=None,
    ) -> None:
        super().__init__(listen, reactor=reactor if reactor is not None else default_reactor)
        self.store = store
        self.directory = directory
        self.timeout = timeout
        self.max_connections = max_connections

    def privilegedStartService(self) -> None:
        """Load the directory and listen, before twistd drops privileges.

        A port that cannot be opened raises here (with the store closed again),
        so twistd stops with the error and a non-zero status.
        """
        self.store.open()
        self.directory.load()
        self.factory = IndexerFactory(
            self.directory, self.reactor, self.timeout, self.max_connections
        )
        try:
            super().privilegedStartService()
        except Exception:
            self.store.close()
            raise

    def listening(self, port: IListeningPort) -> None:
        address = port.getHost()
        host = getattr(address, "host", None)
        if host is None:  # a UNIX socket
            name = getattr(address, "name", address)
            say(f"s> init server {os.fsdecode(name) if isinstance(name, bytes) else name}")
            return
        self.factory.policy = AddressPolicy(host)
        # Bound to every interface: show the address other hosts would use.
        shown = primary_address() if host in ("0.0.0.0", "::", "") else host
        say(f"s> init server {shown}:{address.port}")

    def stopService(self):
        d = super().stopService()
        if self.factory is not None:
            self.factory.stop()
        self.store.close()
        return d


def makeService(options: Options, reactor=None) -> IService:
    """The indexer (and the audit relay when a logger is configured) as one service."""
    reactor = reactor if reactor is not None else default_reactor
    store = Store(options["db"], sync=options["sync"])
    directory = Directory(store, audit=options.audit)
    top = MultiService()
    IndexerService(
        options["listen"],
        store,
        directory,
        options["timeout"],
        options["max-connections"],
        reactor,
    ).setServiceParent(top)
    if options.audit:
        from p2p.indexer.relay import make_relay

        make_relay(
            store,
            endpoint=options["logger"],
            host=options["logger-host"],
            program=options["logger-program"],
            reactor=reactor,
        ).setServiceParent(top)
    return top
