"""The indexer's rules on PostgreSQL, for a cluster of nodes sharing one database.

:class:`ClusterDirectory` is :class:`p2p.indexer.directory.Directory` for
``--db postgresql://...``: the same operations, codes and check order (taken
from each ``wire.OpSpec``: claim, then user exists, then connected, then the
operation's own check), but nothing is answered from memory.
:meth:`ClusterDirectory.handle` returns a Deferred of the request's
:class:`Outcome`, fired once its transaction committed. The requests waiting
for a database thread form a batch (:meth:`p2p.indexer.pgstore.PgStore.transact`),
applied in one transaction by one statement, ``p2p_batch`` (the rules as
server functions: :mod:`p2p.indexer.pgrules`); this module turns each result
into its reply, writes its audit record and ranks SEARCH's hits. The database
makes the rules hold across nodes:

- the user's row is locked (``FOR UPDATE``) by every request, so two changes of
  one user, on any nodes, run one after the other, each seeing the other's;
- ``REGISTER`` is ``INSERT ... ON CONFLICT DO NOTHING``: of two at once, on two
  nodes, exactly one inserts (0), the other sees the row (1);
- ``PUBLISH`` and ``DELETE`` rest on the unique key (owner, name), and a user's
  files go with it (``ON DELETE CASCADE``);
- the audit record goes into the outbox in the same transaction
  (:meth:`PgStore.add_record`), numbered in commit order.

Liveness (protocol.md section 7) lives in the database too: ``users.lease_until``
(the database's clock, in epoch seconds) and ``lease_kind``. Each node renews
the leases of the users it heard from, and of the users whose lease one of its
connections holds, in one statement per tick (:class:`ClusterLeases`); only the
leader drops expired users and probes silent ones (:class:`ClusterLiveness`), so
an expiry happens once in the cluster, persisted and audited as a DISCONNECT.

Search (protocol.md 8.3): each file's words, folded in Python exactly as the
SQLite store folds them (:func:`p2p.indexer.fulltext.words_of`), are a
``tsvector`` (``array_to_tsvector``: no PostgreSQL parser or dictionary in
between) under a GIN index; a query is a ``tsquery`` of prefixes (``'word':*``),
all required; the newest 300 matching files of connected owners are ranked in
Python by the same BM25 (:func:`p2p.indexer.fulltext.bm25`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from p2p import wire
from p2p.indexer.directory import BaseDirectory
from p2p.indexer.fulltext import (
    MAX_QUERY_WORDS,
    Hit,
    bm25,
    inverse_frequency,
    query_words,
    words_of,
)
from p2p.indexer.liveness import Ticking
from p2p.indexer.pgpipe import StatementPipe
from p2p.indexer.pgrules import RULES, Listings, Request, decode_batch, resolve_same
from p2p.indexer.pgstore import PgStore, batch_memo

Address = tuple[str, int]

#: ``lease_kind``: as the four sets of :class:`p2p.indexer.liveness.Leases`.
SILENT, RENEWING, HELD, GRACE = 0, 1, 2, 3
#: The database's clock, in epoch seconds (every node compares leases on it).
NOW = "extract(epoch from now())"
#: SEARCH ranks at most this many of the newest matching files of connected owners,
#: and counts a word's files up to MATCHING_CAP (as the SQLite store does).
SEARCH_CANDIDATES = 300
MATCHING_CAP = 5000
#: Users looked at per expiry tick, at most.
EXPIRY_BATCH = 256


@dataclass(slots=True)
class Outcome:
    """What one request's transaction decided."""

    code: int
    body: bytes = b""
    #: CONNECT of a user recorded as connected: the address to probe first (nothing
    #: was written, nor audited: the CONNECT is applied again after the probe).
    probe: Address | None = None
    #: HOLD: the CONNECT (``users.connected``) whose lease the connection now holds.
    connected: int | None = None
    #: The user's lease ended by this request (DISCONNECT, a CONNECT replacing it).
    ended: bool = False
    #: The request was a connected user's that passed the checks: its lease renews.
    seen: bool = False
    #: An audit record was written.
    audited: bool = False


def file_words(name: str, description: str) -> list[str]:
    """The distinct folded words of a file's name and description (its ``tsvector``)."""
    return list(dict.fromkeys(words_of(name)[0].split() + words_of(description)[0].split()))


def prefix_query(words: list[str], prefix: bool = True) -> str:
    """A ``tsquery`` requiring every (folded) word, as the start of a word when ``prefix``.

    Each is a quoted lexeme (``'`` and ``\\`` escaped, though folded words hold
    neither), so nothing of a query reaches tsquery syntax.
    """
    mark = ":*" if prefix else ""
    return " & ".join(
        "'{}'{}".format(w.replace("\\", "\\\\").replace("'", "''"), mark) for w in words
    )


class ClusterDirectory(BaseDirectory):
    """Users, their addresses and files, in the shared database (see the module's doc)."""

    log = Logger()

    def __init__(
        self,
        store: PgStore,
        audit: bool = False,
        classic: str = "allow",
        leases: ClusterLeases | None = None,
    ) -> None:
        # Nothing is kept in ``connected`` (connected_count() asks the store).
        super().__init__(
            store, audit, classic, leases if leases is not None else ClusterLeases(store)
        )
        store.schema_extra.append(RULES)
        store.prepare = self._prepare
        #: Batches of requests sent from the reactor (made at the first request).
        self.pipe: StatementPipe | None = None
        store.closers.append(self._close_pipe)
        #: The long owner listings sent last, sent again from here while unchanged.
        self.listings = Listings()

    def connected_count(self) -> int:
        """The cluster's connected users, as the store last counted them (the metrics'
        gauge: read on the reactor, counted in the leadership thread each second)."""
        return self.store.connected_users

    def load(self) -> None:
        """Nothing to load: every request reads the database."""

    def handle(
        self,
        op: wire.OpSpec,
        datetime: str,
        user: str,
        args: list,
        address: Address | None = None,
        identity: str | None = None,
        stale: Address | None = None,
        probe: bool = True,
    ) -> Deferred:
        """Apply one well-formed request in a transaction (its batch's); a Deferred of its
        :class:`Outcome`, fired once committed.

        ``probe``: a CONNECT for a user recorded as connected returns the address to
        probe instead (nothing written); after the probe the factory sends it again
        with ``probe=False`` and, when nothing answered, ``stale`` (that address).
        """
        request = self.request(op, user, args, address, identity, stale, probe)
        if self.audit and op.name not in wire.UNAUDITED_OPS:
            file_name = args[0] if op.name in wire.AUDIT_FILE_OPS else None
            request["record"] = wire.audit_record(user, op.name, datetime, file_name)
        if op is wire.SEARCH:  # its hits are read in a transaction: the thread pool's
            return self.store.transact(self._apply, op, args, request, key=user)
        if self.pipe is None:
            self.pipe = StatementPipe(
                self.store.uri, self.store.reactor, self._statement, decode_batch
            )
        d = self.pipe.submit(user, request)
        return d.addCallback(self._outcome, op, args, request)

    def _statement(self, requests: list[dict]) -> tuple[bytes, list[bytes]]:
        """The one statement of a batch sent by the pipe."""
        lease = repr(float(self.leases.timeout)).encode("ascii")
        return b"SELECT p2p_batch($1::jsonb, $2::float8)", [json.dumps(requests).encode(), lease]

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            self.pipe.close()

    def request(
        self,
        op: wire.OpSpec,
        user: str,
        args: list,
        address: Address | None,
        identity: str | None,
        stale: Address | None,
        probe: bool,
    ) -> dict[str, Any]:
        """The request as :data:`p2p.indexer.pgrules.RULES` reads it: its codes from
        ``op`` (those it has), whether the ``--classic`` policy allows it, its fields."""
        request: dict[str, Any] = Request(
            op=op.name,
            user=user,
            identity=identity,
            allowed=identity is not None or op.name in self.classic_ops,
            error=op.error,
        )
        for name in ("no_user", "not_connected", "own"):
            code = getattr(op, name)
            if code is not None:
                request[name] = code
        name = op.name
        if name == wire.CONNECT.name:
            request["probe"] = probe
            if address is not None:
                request["ip"], request["port"] = address
            if stale is not None:
                request["stale_ip"], request["stale_port"] = stale
        elif name in (wire.PUBLISH.name, wire.PUBLISH_FILE.name):
            request["file"], request["description"] = args[0], args[1]
            request["words"] = file_words(args[0], args[1])
            if name == wire.PUBLISH_FILE.name:
                request["size"], request["sha256"], request["mode"] = args[2:5]
        elif name == wire.DELETE.name:
            request["file"] = args[0]
        elif name in (wire.LIST_CONTENT.name, wire.LIST_FILES.name):
            request["owner"] = args[0]
            request["unknown"] = wire.UNKNOWN
            request["share"] = True  # a repeat in the batch may come back as "same"
            self.listings.ask(request)
        elif name == wire.LIST_PEERS.name:
            request["unclaimed"] = wire.UNCLAIMED
        elif name == "SOURCES":
            request["sha256"] = args[0]
            request["max"] = getattr(wire, "MAX_SOURCES", 64)
        return request

    # --- In a pool thread, inside the batch's transaction ---------------------------

    def _prepare(self, cursor, works: list[tuple]) -> set[int]:
        """A batch's requests applied, and audited, by one statement (its own
        transaction), in the batch's order (by user); each request's result waits in
        the batch's memo. The positions of those done whole: all but the searches,
        whose hits are then read in the batch's transaction."""
        positions = [n for n, (work, _args) in enumerate(works) if work == self._apply]
        results = batch_memo()["results"] = {}
        if not positions:
            return set()
        requests = [works[n][1][-1] for n in positions]
        cursor.execute("SELECT p2p_batch(%s, %s)", (Jsonb(requests), float(self.leases.timeout)))
        done = set()
        found = resolve_same(cursor.fetchone()[0])
        for n, request, result in zip(positions, requests, found, strict=True):
            results[id(request)] = result
            if not result.get("search"):
                done.add(n)
        return done

    def _apply(self, cursor, op: wire.OpSpec, args: list, request: dict) -> Outcome:
        """In a pool thread: the :class:`Outcome` of a request its batch's statement
        applied (``cursor``: the batch's transaction, for SEARCH; None for the others)."""
        return self._outcome(batch_memo()["results"][id(request)], op, args, request, cursor)

    def _outcome(
        self, result: dict, op: wire.OpSpec, args: list, request: dict, cursor=None
    ) -> Outcome:
        """The request's :class:`Outcome` from what the rules said, and for SEARCH the
        hits (read with ``cursor``)."""
        if "probe" in result:  # nothing written: applied again after the probe
            return Outcome(op.own, probe=tuple(result["probe"]))
        outcome = Outcome(
            result["code"],
            ended=result.get("ended", False),
            seen=result.get("seen", False),
            connected=result.get("connected"),
        )
        if "rows" in result or "digest" in result:
            outcome.body = self.listings.body(request, result)
        elif outcome.code == wire.OK and op.name in (wire.ALIVE.name, wire.HOLD.name):
            outcome.body = b"%d\0" % self.leases.seconds  # the lease, whole seconds
        elif result.get("search"):
            outcome.code, outcome.body = _search(cursor, *args)
        outcome.audited = "record" in request
        return outcome


def _search(cursor, text: str, limit: int) -> tuple[int, bytes]:
    """SEARCH's code and listing: the error code for a query without a word or with
    more than MAX_QUERY_WORDS (protocol.md 8.3), else the best hits."""
    words = query_words(text)
    if not words or len(words) > MAX_QUERY_WORDS:
        return wire.SEARCH.error, b""
    return wire.OK, wire.encode_listing(
        (h.owner, h.name, h.description, _known(h.size), _known(h.sha256), h.copies)
        for h in search(cursor, words, limit)
    )


def search(cursor, words: list[str], limit: int) -> list[Hit]:
    """The best ``limit`` files of connected owners matching every word, best first.

    The words are folded and split as the files' words were (a word the folding
    cuts in two is searched as its parts); the candidates are the newest
    :data:`SEARCH_CANDIDATES` (at least ``limit``) matching files of connected
    owners, ranked by BM25, each word weighted by how many files hold it as a
    whole word (counted up to :data:`MATCHING_CAP`; the number of files is the
    planner's estimate). Ties: owner, then name. Then the copies of the hits' hashes.
    """
    folded = list(dict.fromkeys(part for word in words for part in words_of(word)[0].split()))
    if not folded or len(folded) > MAX_QUERY_WORDS:
        return []
    wanted = max(SEARCH_CANDIDATES, limit)
    candidates = cursor.execute(
        "SELECT f.owner, f.name, f.description, f.size, f.sha256 FROM files f"
        " JOIN users u ON u.name = f.owner"
        " WHERE f.words @@ %s::tsquery AND u.ip IS NOT NULL ORDER BY f.id DESC LIMIT %s",
        (prefix_query(folded), wanted),
    ).fetchall()
    if not candidates:
        return []
    if len(folded) == 1:
        weights = [1.0]
    else:
        total = cursor.execute(
            "SELECT greatest(reltuples::bigint, 0) FROM pg_class WHERE relname = 'files'"
        ).fetchone()[0]
        weights = []
        for word in folded:
            matching = cursor.execute(
                "SELECT count(*) FROM (SELECT 1 FROM files WHERE words @@ %s::tsquery LIMIT %s) m",
                (prefix_query([word], prefix=False), MATCHING_CAP),
            ).fetchone()[0]
            weights.append(inverse_frequency(max(total, matching), matching))
    split = [(words_of(c[1]), words_of(c[2])) for c in candidates]
    average = max(sum(n[1] + d[1] for n, d in split) / len(split), 1.0)
    scores = [bm25(folded, weights, n, d, average) for n, d in split]
    order = sorted(
        range(len(candidates)), key=lambda i: (-scores[i], candidates[i][0], candidates[i][1])
    )
    ranked = [candidates[i] for i in order[:limit]]
    hashes = list({c[4] for c in ranked if c[4] is not None})
    copies: dict[str, int] = {}
    if hashes:
        copies = dict(
            cursor.execute(
                "SELECT f.sha256, count(DISTINCT f.owner) FROM files f"
                " JOIN users u ON u.name = f.owner"
                " WHERE u.ip IS NOT NULL AND f.sha256 = ANY(%s) GROUP BY f.sha256",
                (hashes,),
            ).fetchall()
        )
    return [
        Hit(owner, name, description, size, sha, copies.get(sha, 1) if sha else 1)
        for owner, name, description, size, sha in ranked
    ]


def _known(value: int | str | None) -> int | str:
    return wire.UNKNOWN if value is None else value


class ClusterLeases:
    """This node's share of liveness: the users it heard from (renewed in one statement
    per tick) and the connections holding leases (HOLD), renewed while open.

    The factory and the protocol call it as they call :class:`p2p.indexer.liveness.Leases`:
    ``release`` when a holding connection closes, ``on_end`` to close the holders
    of a lease that a request ended.
    """

    log = Logger()

    def __init__(self, store: PgStore, timeout: float = wire.DEFAULT_PEER_TIMEOUT) -> None:
        self.store = store
        self.timeout = timeout
        self.on_end: Callable[[object, str], None] | None = None
        #: Users heard from since the last tick.
        self._seen: set[str] = set()
        #: Users whose lease this node's connections hold: the CONNECT it belongs to,
        #: and the connections.
        self.held: dict[str, tuple[int, set[object]]] = {}
        self._last_held_renewal = -math.inf

    @property
    def seconds(self) -> int:
        """The lease as ALIVE announces it: whole seconds, at least 1."""
        return max(1, int(self.timeout))

    def seen(self, user: str) -> None:
        self._seen.add(user)

    def hold(self, user: str, connection: object, connected: int | None) -> None:
        """``connection`` holds ``user``'s lease (of the CONNECT numbered ``connected``)."""
        if connected is None:
            return
        held = self.held.get(user)
        if held is None or held[0] != connected:
            if held is not None:
                self._end(user)
            held = self.held[user] = (connected, set())
        held[1].add(connection)

    def release(self, user: str, connection: object) -> None:
        """``connection`` closed: if it was this node's last holding ``user``, the lease
        runs with ``wire.HELD_GRACE`` of it left (unless another node renews it)."""
        held = self.held.get(user)
        if held is None or connection not in held[1]:
            return
        held[1].discard(connection)
        if held[1]:
            return
        del self.held[user]
        if self.store.pool is None:
            return
        self.store.transact(
            _grace, user, held[0], self.timeout * wire.HELD_GRACE, key=user
        ).addErrback(lambda f: self.log.warn("cannot start {user}'s grace: {f}", user=user, f=f))

    def ended(self, user: str) -> None:
        """``user``'s lease ended by a request of this node: its holders here close."""
        self._end(user)

    def _end(self, user: str) -> None:
        held = self.held.pop(user, None)
        if held and self.on_end is not None:
            for connection in held[1]:
                self.on_end(connection, user)

    def renew(self, now: float) -> Deferred | None:
        """Renew the leases of the users heard from, and (every ninth of a lease) of the
        held ones; the holders of a lease that ended on another node close."""
        seen, self._seen = self._seen, set()
        held: dict[str, int] = {}
        if now - self._last_held_renewal >= self.timeout / 9:
            self._last_held_renewal = now
            held = {user: connected for user, (connected, _) in self.held.items()}
        if not seen and not held:
            return None
        d = self.store.transact(_renew, sorted(seen), held, self.timeout)

        def gone(kept: set[str]) -> None:
            for user, connected in held.items():
                current = self.held.get(user)
                if user not in kept and current is not None and current[0] == connected:
                    self._end(user)  # disconnected, or connected again, elsewhere

        return d.addCallback(gone)


def _grace(cursor, user: str, connected: int, grace: float) -> None:
    cursor.execute(
        f"UPDATE users SET lease_kind = {GRACE}, lease_until = {NOW} + %s"
        f" WHERE name = %s AND connected = %s AND lease_kind = {HELD}",
        (grace, user, connected),
    )


def _renew(cursor, seen: list[str], held: dict[str, int], timeout: float) -> set[str]:
    """Renew in one transaction; the held users whose lease is still the one held."""
    if seen:
        cursor.execute(
            f"UPDATE users SET lease_until = {NOW} + %s, lease_kind = CASE WHEN lease_kind"
            f" = {GRACE} THEN {RENEWING} ELSE lease_kind END"
            f" WHERE name = ANY(%s) AND ip IS NOT NULL AND lease_kind <> {HELD}",
            (timeout, seen),
        )
    if not held:
        return set()
    cursor.execute(
        f"UPDATE users u SET lease_until = {NOW} + %s, lease_kind = {HELD}"
        " FROM unnest(%s::text[], %s::bigint[]) AS h(name, connected)"
        " WHERE u.name = h.name AND u.connected = h.connected RETURNING u.name",
        (timeout, list(held), list(held.values())),
    )
    return {row[0] for row in cursor.fetchall()}


class ClusterLiveness(Ticking):
    """Every node's tick renews what it heard (:meth:`ClusterLeases.renew`); the
    leader's also drops the users whose lease ran out (renewing ones, held ones whose
    node stopped renewing, released ones past their grace) and probes silent ones past
    theirs, at most ``max_probes`` at a time: once in the cluster, whichever node leads.

    A drop is a DISCONNECT, persisted and audited as protocol.md 7.2 says, and only
    if the user is still connected by the same CONNECT with its lease still run out.
    """

    log = Logger()

    def __init__(
        self,
        directory: ClusterDirectory,
        reactor,
        prober: Callable[[Address], Deferred],
        leading: Callable[[], bool],
        on_dropped: Callable[[str, bool], None] | None = None,
        max_probes: int = 64,
    ) -> None:
        super().__init__(reactor, directory.leases.timeout)
        self.directory = directory
        self.leases = directory.leases
        self.prober = prober
        self.leading = leading
        self.on_dropped = on_dropped
        self.max_probes = max_probes
        self._probing: set[str] = set()
        self._busy = False
        #: This node led at its last tick, and gave every lease its fresh start.
        self._leads = False
        self.dropped = 0  # diagnostics, tests

    def check(self) -> None:
        renewing = self.leases.renew(self.reactor.seconds())
        if renewing is not None:
            renewing.addErrback(lambda f: self.log.warn("cannot renew leases: {f}", f=f))
        if self._busy or self.store_closed:
            return
        if not self.leading():
            self._leads = False
            return
        self._busy = True
        if not self._leads:
            # Taking the lead: nobody may have run the expiry (every node down, or
            # failing over), and clients could not renew with no node up. As a
            # restarted SQLite indexer does (protocol.md 7.2), every connected user
            # gets at least a full lease from now before anyone is dropped.
            d = self.directory.store.transact(_fresh_leases, self.leases.timeout)
            d.addCallback(lambda _: setattr(self, "_leads", True))
            d.addErrback(lambda f: self.log.warn("cannot start the leases afresh: {f}", f=f))
            d.addBoth(self._idle)
            return
        d = self.directory.store.transact(_expired, EXPIRY_BATCH)
        d.addCallback(self._act)
        d.addErrback(lambda f: self.log.warn("cannot read expired leases: {f}", f=f))
        d.addBoth(self._idle)

    @property
    def store_closed(self) -> bool:
        return self.directory.store.pool is None

    def _idle(self, _: object) -> None:
        self._busy = False

    def _act(self, expired: list[tuple[str, str, int, int, int]]) -> None:
        for user, ip, port, kind, connected in expired:
            if user in self._probing:
                continue
            if kind != SILENT:
                self._drop(user, connected)
            elif len(self._probing) < self.max_probes:
                self._probing.add(user)
                self.prober((ip, port)).addBoth(self._probed, user, connected)

    def _probed(self, answered: object, user: str, connected: int) -> None:
        self._probing.discard(user)
        if self.stopped or self.store_closed:
            return
        if answered is True:
            self.directory.store.transact(
                _answered, user, connected, self.leases.timeout, key=user
            ).addErrback(lambda f: self.log.warn("cannot renew {user}: {f}", user=user, f=f))
        else:
            self._drop(user, connected)

    def _drop(self, user: str, connected: int) -> None:
        record = (
            wire.audit_record(user, wire.DISCONNECT.name, wire.format_datetime())
            if self.directory.audit
            else None
        )
        d = self.directory.store.transact(_drop, user, connected, record, key=user)

        def done(dropped: bool) -> None:
            if dropped:
                self.dropped += 1
                self.log.info("{user}'s lease ran out: dropped", user=user)
                self.leases.ended(user)
                if self.on_dropped is not None:
                    self.on_dropped(user, record is not None)

        d.addCallbacks(done, lambda f: self.log.warn("cannot drop {user}: {f}", user=user, f=f))


def _fresh_leases(cursor, timeout: float) -> None:
    """A full lease from now for each connected user with less left, silent (probed
    when it runs out, as a restarted SQLite indexer's every user is): a client that
    renews, or a node that holds its lease, makes it renewing or held again."""
    cursor.execute(
        f"UPDATE users SET lease_until = {NOW} + %s, lease_kind = {SILENT}"
        f" WHERE ip IS NOT NULL AND lease_until < {NOW} + %s",
        (timeout, timeout),
    )


def _expired(cursor, limit: int) -> list[Any]:
    return cursor.execute(
        "SELECT name, ip, port, lease_kind, connected FROM users"
        f" WHERE ip IS NOT NULL AND lease_until <= {NOW} ORDER BY lease_until LIMIT %s",
        (limit,),
    ).fetchall()


def _answered(cursor, user: str, connected: int, timeout: float) -> None:
    cursor.execute(
        f"UPDATE users SET lease_until = {NOW} + %s"
        f" WHERE name = %s AND connected = %s AND lease_kind = {SILENT}",
        (timeout, user, connected),
    )


def _drop(cursor, user: str, connected: int, record: str | None) -> bool:
    cursor.execute(
        "UPDATE users SET ip = NULL, port = NULL, connected = NULL, lease_until = NULL"
        f" WHERE name = %s AND connected = %s AND lease_until <= {NOW}",
        (user, connected),
    )
    if cursor.rowcount != 1:
        return False  # renewed, disconnected or connected again meanwhile
    if record is not None:
        PgStore.add_record(cursor, record)
    return True
