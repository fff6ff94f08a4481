"""An indexer node on PostgreSQL (``--db postgresql://...``): its factory and service.

:class:`ClusterFactory` is the indexer's factory with one difference: a
request's reply waits for its own transaction (a Deferred from
:class:`p2p.indexer.pgdirectory.ClusterDirectory`) instead of the turn's group
commit, which the SQLite path keeps unchanged. :class:`ClusterIndexerService`
opens the shared database instead of locking a file, presents the cluster's
one TLS identity (kept in the database, made by the first node to start,
unless ``--tls-key``/``--tls-cert`` give one), and runs the leadership and the
liveness tick of :mod:`p2p.indexer.pgdirectory`.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure

from p2p import wire
from p2p.indexer.liveness import MAX_PROBE_TIMEOUT, TCPProber
from p2p.indexer.pgdirectory import ClusterDirectory, ClusterLeases, ClusterLiveness, Outcome
from p2p.indexer.pgpipe import StatementFailed
from p2p.indexer.pgstore import Leadership, PgStore
from p2p.indexer.protocol import IndexerFactory, IndexerProtocol
from p2p.indexer.service import IndexerService
from p2p.startup import StartFailure
from p2p.tls import Identity

_CODES = [bytes((code,)) for code in range(256)]
#: Listings this long or longer are shared by the replies sending the same bytes, and
#: the number of them kept (:meth:`ClusterFactory.shared`).
SHARED_LISTING = 64 * 1024
SHARED_KEPT = 4
#: The cluster's TLS identity in the database's ``meta`` table.
IDENTITY_KEY = "tls_identity"


class ClusterFactory(IndexerFactory):
    """The indexer's factory for a node of a cluster: one transaction per request."""

    directory: ClusterDirectory

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: Requests whose transaction has not answered yet.
        self._running: set[Deferred] = set()
        #: Probes the CONNECT of a user recorded as connected (set by the service).
        self.prober = None
        #: The last long listings sent (see :meth:`shared`), oldest first.
        self._listings: OrderedDict[bytes, bytes] = OrderedDict()

    def expire(self, user: str) -> None:
        """Expiry is the leader's (:class:`ClusterLiveness`), in the database."""

    def _apply(
        self,
        proto: IndexerProtocol,
        op: wire.OpSpec,
        values: list,
        stale: tuple[str, int] | None = None,
        probe: bool = True,
    ) -> None:
        if self.stopped:
            proto.reply(_CODES[op.error])
            return
        datetime, user, *args = values
        address = self.connect_address(proto, args[0]) if op is wire.CONNECT else None
        d = self.directory.handle(
            op,
            datetime,
            user,
            args,
            address,
            proto.identity,
            stale=stale,
            probe=probe and self.prober is not None,
        )
        self._running.add(d)
        d.addBoth(self._finished, d)
        d.addCallbacks(self._answered, self._failed, (proto, op, values, user), None, (proto, op))

    def _finished(self, result: object, d: Deferred) -> object:
        self._running.discard(d)
        return result

    def _answered(
        self, outcome: Outcome, proto: IndexerProtocol, op: wire.OpSpec, values: list, user: str
    ) -> None:
        if outcome.probe is not None:
            # A CONNECT for a user recorded as connected: its recorded peer first.
            probed = self.prober(outcome.probe)
            probed.addCallback(
                lambda answered: self._apply(
                    proto, op, values, None if answered is True else outcome.probe, False
                )
            )
            return
        leases = self.directory.leases
        if outcome.ended:
            self._asking = proto  # a lease this connection holds is not closed for it
            try:
                leases.ended(user)
            finally:
                self._asking = None
        if outcome.seen:
            leases.seen(user)
        if outcome.audited:
            self.store.records_added()
        if op is wire.HOLD and outcome.code == wire.OK and not proto.lost:
            leases.hold(user, proto, outcome.connected)
            proto.hold(user, leases.timeout)
        proto.reply(_CODES[outcome.code], self.shared(outcome.body))

    def shared(self, body: bytes) -> bytes:
        """``body``, or the equal listing a reply already sends. Each request's listing
        is built anew from its transaction's rows: a crowd of readers that never read
        one long listing held one copy each (400 MB for 100 readers of a 4 MB one).
        The last :data:`SHARED_KEPT` long listings are kept, so a repeat is sent from
        the copy already held (the SQLite directory shares its cached listing so)."""
        if len(body) < SHARED_LISTING:
            return body
        kept = self._listings.get(body)
        if kept is not None:
            self._listings.move_to_end(kept)
            return kept
        self._listings[body] = body
        if len(self._listings) > SHARED_KEPT:
            self._listings.popitem(last=False)
        return body

    def _failed(self, failure: Failure, proto: IndexerProtocol, op: wire.OpSpec) -> None:
        import psycopg

        if failure.check(psycopg.OperationalError, StatementFailed):  # the server is away
            # (or refused the statement): one line, no trace
            self.log.warn(
                "database unreachable ({why}); answering the error code",
                why=" ".join(failure.getErrorMessage().split()),
            )
        else:
            self.log.failure("database transaction failed; answering the error code", failure)
        proto.reply(_CODES[op.error])

    def drained(self) -> Deferred:
        """Fires once every request under way has its answer."""
        return DeferredList(list(self._running), consumeErrors=True)


#: How long a stopping node waits for the answers of requests under way.
STOP_DRAIN = 15.0


class ClusterIndexerService(IndexerService):
    """An indexer node: the shared database, no file lock, the cluster's identity."""

    factory_class = ClusterFactory
    store: PgStore
    directory: ClusterDirectory

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.leadership: Leadership | None = None

    def open_store(self) -> None:
        import psycopg

        try:
            self.store.open()
        except psycopg.Error as exc:
            said = " ".join(str(exc).split())
            raise StartFailure(
                f"{self.label} cannot start: {self.store.path}: {said}: check the URI, "
                "that the server runs and that this user may connect and create tables"
            ) from exc

    def stored_identity(self) -> Identity:
        """The cluster's identity, from the database (made by the first node)."""
        pem = self.store.meta(IDENTITY_KEY, lambda: Identity.generate().to_pem().decode("ascii"))
        return Identity.from_pem(pem.encode("ascii"))

    def watch(self) -> ClusterLiveness:
        factory = self.indexer
        leases = self.directory.leases
        wait = min(MAX_PROBE_TIMEOUT, leases.timeout / 2, factory.timeout / 2)
        factory.prober = TCPProber(self.reactor, wait)
        self.leadership = Leadership(self.store, self.reactor)
        liveness = ClusterLiveness(
            self.directory,
            self.reactor,
            prober=factory.prober,
            leading=lambda: self.leadership is not None and self.leadership.leading,
            on_dropped=lambda user, audited: self.store.records_added() if audited else None,
        )
        self.leadership.start()
        liveness.start()
        return liveness

    def stopService(self):
        d = super(IndexerService, self).stopService()  # stop listening
        if self.liveness is not None:
            self.liveness.stop()
        drained = succeed(None)
        if self.indexer is not None:
            self.indexer.stop()
            # Answers waiting on a database that stopped answering are given up after
            # STOP_DRAIN seconds: the node stops anyway (their clients see the close).
            drained = self.indexer.drained().addTimeout(STOP_DRAIN, self.indexer.reactor)
        return DeferredList([d, drained], consumeErrors=True).addBoth(lambda _: self._release())

    def _release(self) -> None:
        self.store.close()


def cluster_parts(options, reactor) -> tuple[type, PgStore, ClusterDirectory]:
    """What ``twistd p2p-indexer --db postgresql://...`` runs: the node's service class,
    its store and its directory (``makeService`` builds the rest as for SQLite)."""
    store = PgStore(options["db"], threads=options["db-threads"], reactor=reactor)
    leases = ClusterLeases(store, options["peer-timeout"])
    directory = ClusterDirectory(
        store, audit=options.audit, classic=options["classic"], leases=leases
    )
    return ClusterIndexerService, store, directory
