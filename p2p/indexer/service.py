"""``twistd p2p-indexer``: options and the service tree.

:func:`makeService` returns a MultiService holding the listening indexer and,
when a logger is configured, the relay that delivers the audit outbox to it.

The indexer speaks TLS and the classic protocol on one port. Its TLS identity
comes from ``--tls-key``/``--tls-cert``, or else from ``<db>.tls.pem``, made on
the first start and reused after (a fresh one each start with ``:memory:``).
While it runs it holds the database's lock, so ``p2p-admin`` waits for it to stop.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from twisted.application.service import IService, MultiService
from twisted.internet import reactor as default_reactor
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage

from p2p import wire
from p2p.console import say
from p2p.indexer.address import AddressPolicy, primary_address
from p2p.indexer.directory import CLASSIC_POLICIES, Directory
from p2p.indexer.liveness import Leases, Liveness, watch
from p2p.indexer.metrics import IndexerMetrics
from p2p.indexer.pgstore import DEFAULT_THREADS, is_postgres
from p2p.indexer.protocol import IndexerFactory
from p2p.indexer.store import (
    MEMORY,
    SYNC_MODES,
    DatabaseBusy,
    Store,
    database_problem,
    lock_database,
    unlock_database,
)
from p2p.listening import (
    CAP_OPTIONS,
    ListeningService,
    positive_float,
)
from p2p.logcontract import parse_program
from p2p.logs import LogOptions, ServiceLogs
from p2p.metrics import METRICS_OPTION, Metrics, counts_wanted, serve_metrics
from p2p.startup import ListenFailure, StartFailure, StartGuard, file_problem
from p2p.tls import Identity, SniffingFactory, server_options, write_private

#: What the indexer prints at start, before its ``s> init server`` line.
FINGERPRINT_LINE = "p2p-indexer: TLS key fingerprint {}"


class Options(LogOptions, usage.Options):
    """Command line of ``twistd p2p-indexer``."""

    synopsis = "[options]"
    longdesc = (
        "The p2p indexer: one request per TCP connection (or several over TLS, on the "
        "same port), directory in memory, every change committed to SQLite before its "
        "reply byte."
    )
    optParameters = [
        ["listen", "l", f"tcp:{wire.INDEXER_PORT}", "Server endpoint to listen on."],
        [
            "db",
            None,
            "p2p-indexer.db",
            "SQLite database file (':memory:' keeps nothing), or a PostgreSQL URI "
            "(postgresql://...) that any number of indexer nodes share.",
        ],
        [
            "db-threads",
            None,
            DEFAULT_THREADS,
            "With PostgreSQL: threads (each with its own connection) running the requests.",
            int,
        ],
        [
            "timeout",
            None,
            wire.DEFAULT_TIMEOUT,
            "Seconds a client has to send its whole request (and read the reply).",
            positive_float,
        ],
        *CAP_OPTIONS,
        [
            "peer-timeout",
            None,
            wire.DEFAULT_PEER_TIMEOUT,
            "Seconds after which a connected user whose client is gone is dropped "
            "(its lease; a classic peer is probed once per this time at most).",
            positive_float,
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
        ["tls-key", None, None, "PEM file of the indexer's TLS private key (with --tls-cert)."],
        [
            "tls-cert",
            None,
            None,
            "PEM file of the indexer's TLS certificate (with --tls-key). Without both, "
            "the key is kept in <db>.tls.pem, made on the first start.",
        ],
        [
            "classic",
            None,
            "allow",
            "Requests without a client certificate (classic clients): allow (all), "
            "read-only (LIST_USERS, LIST_CONTENT, LIST_PEERS only) or deny.",
        ],
        METRICS_OPTION,
    ]

    #: The files given by --tls-key/--tls-cert (None: the identity beside the database);
    #: read at start, so an unusable one is one line on the terminal.
    identity_files: tuple[Path, Path] | None = None

    def postOptions(self) -> None:
        if not self["db"].strip():  # SQLite would open a nameless temporary database
            raise usage.UsageError("--db needs a file, :memory: or a postgresql:// URI")
        if self["sync"] not in SYNC_MODES:
            raise usage.UsageError(f"--sync must be one of {', '.join(SYNC_MODES)}")
        if self["classic"] not in CLASSIC_POLICIES:
            raise usage.UsageError(f"--classic must be one of {', '.join(CLASSIC_POLICIES)}")
        key, cert = self["tls-key"], self["tls-cert"]
        if (key is None) != (cert is None):
            raise usage.UsageError("--tls-key and --tls-cert go together: give both or neither")
        if key is not None:
            self.identity_files = (Path(key), Path(cert))
        if isinstance(self["logger-program"], str):  # the default, as shown in --help
            self["logger-program"] = parse_program(self["logger-program"])
        if not self["logger-host"]:
            self["logger-host"] = os.environ.get("LOGGER_HOST") or None
        if self["logger"]:  # parsed now: at makeService it would end in a traceback
            try:
                clientFromString(default_reactor, self["logger"])
            except (ValueError, TypeError, KeyError) as exc:
                raise usage.UsageError(f"--logger {self['logger']}: {exc}") from None

    @property
    def audit(self) -> bool:
        """True when a logger is configured, so requests are audited."""
        return bool(self["logger"] or self["logger-host"])


class IndexerService(ListenFailure, ListeningService):
    """Opens the store, loads the directory, listens; commits and closes on stop."""

    label = "indexer"
    #: The factory of the indexer's protocol (a cluster node's answers after its transaction).
    factory_class = IndexerFactory

    def __init__(
        self,
        listen: str,
        store: Store,
        directory: Directory,
        timeout: float,
        max_connections: int,
        reactor=None,
        identity: Identity | None = None,
        max_per_source: int | None = None,
        identity_files: tuple[Path, Path] | None = None,
        metrics: IndexerMetrics | None = None,
    ) -> None:
        super().__init__(listen, reactor=reactor if reactor is not None else default_reactor)
        #: What the requests are counted in (None: not counted).
        self.metrics = metrics
        self.store = store
        self.directory = directory
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        #: The TLS identity (None until started, unless given).
        self.identity = identity
        #: Where to read the identity at start (--tls-key, --tls-cert), when not given.
        self.identity_files = identity_files
        #: The factory of the indexer's protocol (``factory`` is the TLS sniffer around it).
        self.indexer: IndexerFactory | None = None
        #: Drops the users whose client is gone (from the start on).
        self.liveness: Liveness | None = None
        self._lock: int | None = None

    def privilegedStartService(self) -> None:
        """Lock and load the database, take the TLS identity, and listen, before twistd
        drops privileges.

        A database in use by another process, damaged, foreign or holding
        orphan rows, an unusable identity file or a port that cannot be opened
        raises :class:`p2p.startup.StartFailure` here, worded for the operator
        (with the store closed and the lock given back): twistd then stops
        with that one line and a non-zero status (``p2p.startup``).
        """
        try:
            self.open_store()
            if self.identity is None and self.identity_files is not None:
                self.identity = files_identity(*self.identity_files)
            if self.identity is None:
                self.identity = self.stored_identity()
            say(FINGERPRINT_LINE.format(self.identity.fingerprint))
            self.indexer = self.factory_class(
                self.directory,
                self.reactor,
                self.timeout,
                self.max_connections,
                max_per_source=self.max_per_source,
            )
            self.indexer.metrics = self.metrics
            self.factory = SniffingFactory(
                self.indexer, server_options(self.identity), self.reactor, self.timeout
            )
        except Exception as exc:
            self._release()
            problem = start_problem(self.store.path, exc)
            if problem is None:
                raise
            raise StartFailure(f"{self.label} cannot start: {problem}") from exc
        try:
            super().privilegedStartService()  # says itself why it cannot listen
        except Exception:
            self._release()
            raise
        self.liveness = self.watch()  # the leases given at load run from now

    def open_store(self) -> None:
        """Lock the database, open it and load the directory from it."""
        self._lock = lock_database(self.store.path)
        self.store.open()
        self.directory.load()

    def stored_identity(self) -> Identity:
        """The identity kept with the database, made on the first start."""
        return database_identity(self.store.path)

    def watch(self):
        """Start dropping the users whose client is gone."""
        return watch(self.indexer)

    def listening(self, port: IListeningPort) -> None:
        address = port.getHost()
        host = getattr(address, "host", None)
        if host is None:  # a UNIX socket
            name = getattr(address, "name", address)
            say(f"s> init server {os.fsdecode(name) if isinstance(name, bytes) else name}")
            return
        self.indexer.policy = AddressPolicy(host)
        # Bound to every interface: show the address other hosts would use.
        shown = primary_address() if host in ("0.0.0.0", "::", "") else host
        say(f"s> init server {shown}:{address.port}")

    def stopService(self):
        d = super().stopService()
        if self.indexer is not None:
            self.indexer.stop()
        if self.liveness is not None:
            self.liveness.stop()
        self._release()
        return d

    def _release(self) -> None:
        """Close the store, then give back the database's lock."""
        self.store.close()
        unlock_database(self._lock)
        self._lock = None


#: What to do about an identity (key) file that is not one.
IDENTITY_FIX = (
    "restore the right file, or move it aside to make a new key "
    "(clients that pinned the old key will refuse the new one)"
)


def start_problem(db: str, exc: Exception) -> str | None:
    """The operator's line for what stopped the start (None: let p2p.startup word it)."""
    if isinstance(exc, DatabaseBusy):
        return f"{exc}: stop the other indexer, or wait for p2p-admin to finish"
    if isinstance(exc, sqlite3.Error):
        return database_problem(db, exc)
    if isinstance(exc, IdentityFileError):
        return f"{exc}: {IDENTITY_FIX}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return file_problem(exc.filename, exc)
    return None


class IdentityFileError(ValueError):
    """A TLS key or certificate file that cannot be used; the message names it."""


def files_identity(key: Path, cert: Path) -> Identity:
    """The identity of ``--tls-key``/``--tls-cert``; IdentityFileError naming them if unusable."""
    try:
        return Identity.from_files(key, cert)
    except OSError as exc:
        raise IdentityFileError(f"{exc.filename}: {exc.strerror}") from exc
    except ValueError as exc:
        raise IdentityFileError(f"{key} and {cert}: {exc}") from exc


def database_identity(db: str) -> Identity:
    """The identity kept beside the database (``<db>.tls.pem``), made on first use.

    ``:memory:`` keeps nothing: a new identity each time. A file there that is
    not an identity raises IdentityFileError naming it (the operator decides what to
    do with it: it is never overwritten).
    """
    if db == MEMORY:
        return Identity.generate()
    path = Path(f"{db}.tls.pem")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        identity = Identity.generate()
        write_private(path, identity.to_pem())
        return identity
    try:
        return Identity.from_pem(data)
    except ValueError as exc:
        raise IdentityFileError(f"{path}: {exc}") from exc


class _Indexer(StartGuard, ServiceLogs, MultiService):
    """The indexer and its relay; run by twistd, it logs through the bounded, rate-limited log,
    and a failure to start is one line on the terminal and status 1 (``p2p.startup``)."""

    label = "indexer"
    #: The indexer's counts (None without ``--metrics``).
    metrics: Metrics | None = None


def makeService(options: Options, reactor=None) -> IService:
    """The indexer (and the audit relay when a logger is configured) as one service."""
    reactor = reactor if reactor is not None else default_reactor
    top = _Indexer()
    top.log_options = options
    counts = IndexerMetrics() if counts_wanted(options) else None
    if is_postgres(options["db"]):
        from p2p.indexer.pgservice import cluster_parts

        service_class, store, directory = cluster_parts(options, reactor)
    else:
        service_class = IndexerService
        store = Store(options["db"], sync=options["sync"])
        leases = Leases(options["peer-timeout"], reactor.seconds)
        directory = Directory(store, audit=options.audit, classic=options["classic"], leases=leases)
    indexer = service_class(
        options["listen"],
        store,
        directory,
        options["timeout"],
        options["max-connections"],
        reactor,
        identity_files=options.identity_files,
        max_per_source=options["max-per-source"],
        metrics=counts,
    )
    indexer.setServiceParent(top)
    relay = None
    if options.audit:
        from p2p.indexer.relay import make_relay

        relay = make_relay(
            store,
            endpoint=options["logger"],
            host=options["logger-host"],
            program=options["logger-program"],
            reactor=reactor,
        )
        relay.setServiceParent(top)
    if counts is not None:
        watch_indexer(counts, indexer, relay)
        top.metrics = counts.metrics
        serve_metrics(top, options, [counts.metrics])
    return top


def watch_indexer(counts: IndexerMetrics, indexer: IndexerService, relay=None) -> None:
    """The gauges of a running indexer (nothing while it is not started)."""

    def open_connections() -> int | None:
        return None if indexer.indexer is None else indexer.indexer.open_connections

    def running_store():
        return indexer.store if indexer.running and indexer.indexer is not None else None

    counts.watch(open_connections, lambda: indexer.directory.connected_count())
    if relay is not None:

        def backlog() -> int | None:
            store = running_store()
            return None if store is None else store.outbox_count()

        counts.watch_relay(relay, backlog)
