"""The indexer's directory: users, their addresses and published files, in memory.

Each operation checks in the order of its codes (user exists, then connected,
then its own check), changes memory and writes the same change through to the
store, and returns the reply code (plus the listing after 0 for the two LIST
operations). Every lookup is a dict access, so an operation costs the same with
ten users or a hundred thousand; only the listings grow with what they list.

Claimed names (docs/protocol.md, "Extension: TLS, claimed names, LIST_PEERS"):
each request comes with the ``identity`` of its connection, the fingerprint of
the client certificate it presented over TLS (None: plaintext, or no
certificate). A REGISTER with an identity claims the name for it; from then on
a request naming that user is refused with its "any other error" code unless
its identity is the claim. Requests without identity are further limited by
the ``classic`` policy: ``allow`` (all), ``read-only`` (wire.READ_OPS only) or
``deny`` (none). A refused request changes nothing and is audited as usual.

A full disk (the store's commit failed, :meth:`Store.serves`): reads
(wire.READ_OPS) are still answered from memory, their audit records held by
the store until it takes writes again; changes get their "any other error"
code, changing nothing (and audited the same way).

Content identity and search (protocol.md section 8): PUBLISH_FILE is PUBLISH
with a size and a hash (mode ``replace`` updates an entry in place); memory keeps
names and descriptions only, the store the rest. LIST_FILES is read from the store
and cached per owner like LIST_CONTENT, both dropped whenever that owner's files
change; SEARCH asks the store (:meth:`Store.search_async`) and is never cached: its
listing is a Deferred when the store answers later (a file store's search process).

Liveness (protocol.md section 7): every connected user holds a lease in
``leases``; a request that passes the checks of a connected user renews it,
``ALIVE`` (not audited) makes it a renewing one. :meth:`Directory.expire` drops
a user whose client is gone, as a DISCONNECT; :meth:`Directory.stale_address`
tells the factory which CONNECT must first probe the address recorded.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from p2p import wire
from p2p.indexer.fulltext import MAX_QUERY_WORDS, Hit, query_words
from p2p.indexer.liveness import Leases
from p2p.indexer.store import Store, UserRow

Address = tuple[str, int]
#: A reply: the code and the bytes that follow it (the listing after 0, else empty), or a
#: Deferred of those bytes (a SEARCH the store answers later: the code stands).
Result = tuple[int, bytes | Deferred]

#: ``--classic`` policies: the operations served to a request without identity.
CLASSIC_POLICIES: dict[str, frozenset[str]] = {
    "allow": frozenset(wire.OPS),
    "read-only": wire.READ_OPS,
    "deny": frozenset(),
}


def classic_ops(classic: str) -> frozenset[str]:
    """The operations the ``--classic`` policy ``classic`` serves to a request without
    identity (ValueError for a policy that does not exist)."""
    if classic not in CLASSIC_POLICIES:
        raise ValueError(f"classic must be one of {sorted(CLASSIC_POLICIES)}, not {classic!r}")
    return CLASSIC_POLICIES[classic]


class BaseDirectory:
    """What a directory holds whatever its store: the store, the audit switch, the
    ``--classic`` policy, the leases, and the connected users it keeps in memory."""

    def __init__(self, store: Any, audit: bool, classic: str, leases: Any) -> None:
        self.store = store
        #: Write one audit record per request into the store's outbox.
        self.audit = audit
        #: The operations served to requests without identity (``--classic``).
        self.classic_ops = classic_ops(classic)
        #: The connected users' leases.
        self.leases = leases
        #: Connected users and their addresses, in connection order (LIST_USERS).
        self.connected: dict[str, Address] = {}


class Directory(BaseDirectory):
    """Users (connected or not) with the files each one published."""

    def __init__(
        self,
        store: Store,
        audit: bool = False,
        classic: str = "allow",
        leases: Leases | None = None,
    ) -> None:
        # The leases are in memory only: a load starts them afresh.
        super().__init__(store, audit, classic, leases if leases is not None else Leases())
        self.users: dict[str, UserRow] = {}
        #: The listings of LIST_USERS and LIST_PEERS, kept until ``connected`` changes.
        self._listings: dict[bool, bytes] = {}
        #: Each owner's LIST_CONTENT listing, kept until the owner's files change: one
        #: shared, immutable listing per change, however many ask (and never read it).
        self._contents: dict[str, bytes] = {}
        #: The same for LIST_FILES (names, descriptions, sizes and hashes, from the store).
        self._file_listings: dict[str, bytes] = {}
        self._handlers = {
            wire.REGISTER.name: self._register,
            wire.UNREGISTER.name: self._unregister,
            wire.CONNECT.name: self._connect,
            wire.DISCONNECT.name: self._disconnect,
            wire.PUBLISH.name: self._publish,
            wire.DELETE.name: self._delete,
            wire.LIST_USERS.name: self._list_users,
            wire.LIST_CONTENT.name: self._list_content,
            wire.LIST_PEERS.name: self._list_peers,
            wire.ALIVE.name: self._alive,
            wire.HOLD.name: self._alive,  # the factory then ties the lease to the connection
            wire.PUBLISH_FILE.name: self._publish_file,
            wire.LIST_FILES.name: self._list_files,
            wire.SEARCH.name: self._search,
            wire.SOURCES.name: self._sources,
        }

    def connected_count(self) -> int:
        """The users connected now (the metrics' gauge)."""
        return len(self.connected)

    def load(self) -> None:
        """Replace memory with what the store holds (at start, or after a failed commit);
        the store's search side is opened then too (caught up), not at the first SEARCH."""
        self.users = self.store.load()
        open_index = getattr(self.store, "open_index", None)
        if open_index is not None:
            open_index()
        self.connected = {n: u.address for n, u in self.users.items() if u.address is not None}
        self.leases.reset(list(self.connected))
        self._listings.clear()
        self._contents.clear()
        self._file_listings.clear()

    def handle(
        self,
        op: wire.OpSpec,
        datetime: str,
        user: str,
        args: list,
        address: Address | None = None,
        identity: str | None = None,
    ) -> tuple[int, bytes]:
        """Apply one well-formed request; return its code and the bytes after it.

        First the identity: a request without one outside the ``classic``
        policy, or naming a user claimed by another identity, gets the error
        code. Then the common checks, in the order of the codes, as ``op``
        declares them (user exists, then connected); the operation's handler
        then runs its own check. ``args`` are the decoded arguments;
        ``address`` is what CONNECT records; ``identity`` is the fingerprint of
        the connection's client certificate (None without one).
        """
        row = self.users.get(user)
        if not self.store.serves(op.name not in wire.READ_OPS, self.audit):
            code, body = op.error, b""  # the disk is full: no change, or no room to audit
        elif self._refused(op, row, identity):
            code, body = op.error, b""
        elif row is None and op.no_user is not None:
            code, body = op.no_user, b""
        elif op.not_connected is not None and row.address is None:
            code, body = op.not_connected, b""
        else:
            if row is not None and row.address is not None:
                self.leases.seen(user)
            code, body = self._handlers[op.name](user, row, args, address, identity)
        if self.audit and op.name not in wire.UNAUDITED_OPS:
            self._audit(user, op.name, datetime, args)
        return code, body

    def _refused(self, op: wire.OpSpec, row: UserRow | None, identity: str | None) -> bool:
        """True when ``identity`` may not send ``op`` for the user of ``row`` (section 6.3)."""
        return (identity is None and op.name not in self.classic_ops) or (
            row is not None and row.identity is not None and row.identity != identity
        )

    def _audit(self, user: str, op: str, datetime: str, args: list) -> None:
        file_name = args[0] if op in wire.AUDIT_FILE_OPS else None
        self.store.add_outbox(wire.audit_record(user, op, datetime, file_name))

    # --- Liveness ------------------------------------------------------------

    def stale_address(self, user: str, identity: str | None) -> Address | None:
        """The address a CONNECT for ``user`` must probe first, or None (answer at once).

        Only for a connected user whose request passes the claim check. A
        recent ALIVE is no proof here: a client killed a moment ago renewed
        a moment before, and its user's new client must get in at once; the
        peer probed is then one of ours, which a probe does not disturb.
        """
        row = self.users.get(user)
        if row is None or row.address is None or self._refused(wire.CONNECT, row, identity):
            return None
        return row.address

    def forget_stale(self, user: str, address: Address) -> bool:
        """Disconnect ``user`` if still recorded at ``address`` (its peer did not answer),
        so the CONNECT that follows records the new one; not audited (the CONNECT is)."""
        row = self.users.get(user)
        if row is None or row.address != address:
            return False
        self._disconnect(user, row, [], None, None)
        return True

    def expire(self, user: str, datetime: str) -> bool:
        """Drop a connected user whose client is gone: a DISCONNECT, persisted and audited
        (``<user> DISCONNECT <datetime>``) as if it had sent one; its files stay."""
        row = self.users.get(user)
        if row is None or row.address is None:
            self.leases.end(user)
            return False
        if not self.store.serves(True, self.audit):
            # A full disk: a write now would fail the turn, reads included. A fresh
            # lease: dropped later, once the store takes writes again.
            self.leases.start(user)
            return False
        self._disconnect(user, row, [], None, None)
        if self.audit:
            self._audit(user, wire.DISCONNECT.name, datetime, [])
        return True

    # --- Each operation's own part: (code, body) ------------------------------
    # ``row`` is the user's entry: None only for REGISTER (which has no "user
    # does not exist" code); connected whenever ``op.not_connected`` exists.
    # ``identity`` matters only to REGISTER: the checks in ``handle`` did the rest.

    def _register(
        self,
        user: str,
        row: UserRow | None,
        args: list,
        address: Address | None,
        identity: str | None,
    ) -> Result:
        if row is not None:
            return wire.REGISTER.own, b""
        self.users[user] = UserRow(identity=identity)
        self.store.add_user(user, identity)
        return wire.OK, b""

    def _unregister(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        if row.address is not None:  # refused while connected
            return wire.UNREGISTER.error, b""
        del self.users[user]
        self._files_changed(user)
        self.store.remove_user(user)
        return wire.OK, b""

    def _connect(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        if row.address is not None:
            return wire.CONNECT.own, b""
        if address is None:
            return wire.CONNECT.error, b""
        row.address = address
        self.connected[user] = address
        self._listings.clear()
        self.store.set_address(user, address)
        self.leases.start(user)
        return wire.OK, b""

    def _disconnect(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        row.address = None
        del self.connected[user]
        self._listings.clear()
        self.store.set_address(user, None)
        self.leases.end(user)
        return wire.OK, b""

    def _alive(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        """The lease is renewed; the reply says how long it lasts (whole seconds)."""
        self.leases.renewed(user)
        return wire.OK, b"%d\0" % self.leases.seconds

    def _publish(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        name, description = args
        if name in row.files:
            return wire.PUBLISH.own, b""
        row.files[name] = description
        self._files_changed(user)
        self.store.add_file(user, name, description)
        return wire.OK, b""

    def _publish_file(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        """PUBLISH with size and hash; mode ``replace`` updates an entry in place."""
        name, description, size, sha256, mode = args
        if name in row.files and mode != "replace":
            return wire.PUBLISH_FILE.own, b""
        row.files[name] = description  # an existing entry keeps its place
        self._files_changed(user)
        self.store.publish_file(user, name, description, size, sha256)
        return wire.OK, b""

    def _delete(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        name = args[0]
        if name not in row.files:
            return wire.DELETE.own, b""
        del row.files[name]
        self._files_changed(user)
        self.store.remove_file(user, name)
        return wire.OK, b""

    def _list_users(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        return wire.OK, self._connected_listing(claims=False)

    def _list_peers(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        """LIST_USERS with each user's claim: its fingerprint, or wire.UNCLAIMED."""
        return wire.OK, self._connected_listing(claims=True)

    def _connected_listing(self, claims: bool) -> bytes:
        """The connected users as LIST_USERS lists them (with ``claims``: as LIST_PEERS).

        Kept until ``connected`` changes: a crowd asking for the listing costs one encoding.
        """
        listing = self._listings.get(claims)
        if listing is None:
            users = self.users
            listing = self._listings[claims] = wire.encode_listing(
                (name, ip, port, users[name].identity or wire.UNCLAIMED)
                if claims
                else (name, ip, port)
                for name, (ip, port) in self.connected.items()
            )
        return listing

    def _list_content(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        name = args[0]
        listing = self._contents.get(name)
        if listing is None:
            owner = self.users.get(name)
            if owner is None:
                return wire.LIST_CONTENT.own, b""
            listing = self._contents[name] = wire.encode_listing(owner.files.items())
        return wire.OK, listing

    def _list_files(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        """LIST_CONTENT with sizes and hashes (wire.UNKNOWN where published without)."""
        name = args[0]
        listing = self._file_listings.get(name)
        if listing is None:
            if name not in self.users:
                return wire.LIST_FILES.own, b""
            listing = self._file_listings[name] = wire.encode_listing(
                (file, description, _known(size), _known(sha256))
                for file, description, size, sha256 in self.store.list_files(name)
            )
        return wire.OK, listing

    def _search(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        """The best hits among connected owners' files; the error code for a query
        without a word (only punctuation, say) or with more than MAX_QUERY_WORDS."""
        text, limit = args
        words = query_words(text)
        if not words or len(words) > MAX_QUERY_WORDS:
            return wire.SEARCH.error, b""
        found = self.store.search_async(words, limit).addCallback(_hits_listing)
        if found.called:  # answered already (a memory store): the listing itself
            result, found.result = found.result, None
            if isinstance(result, Failure):
                result.raiseException()
            return wire.OK, result
        return wire.OK, found

    def _sources(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        """The connected owners of a file with this SHA-256 and their addresses, the
        asking user left out (protocol.md 8.6); never cached (owners come and go)."""
        found = self.store.sources(args[0], wire.MAX_SOURCES, exclude=user)
        return wire.OK, wire.encode_listing(
            (owner, name, *self.connected[owner])
            for owner, name in found
            if owner in self.connected
        )

    def _files_changed(self, user: str) -> None:
        """``user``'s files changed: its cached listings are stale."""
        self._contents.pop(user, None)
        self._file_listings.pop(user, None)


def _hits_listing(hits: list[Hit]) -> bytes:
    """SEARCH's listing of ``hits``: owner, name, description, size, hash, copies."""
    return wire.encode_listing(
        (h.owner, h.name, h.description, _known(h.size), _known(h.sha256), h.copies) for h in hits
    )


def _known(value: int | str | None) -> int | str:
    """A size or hash as listed: itself, or wire.UNKNOWN when it was not published."""
    return wire.UNKNOWN if value is None else value
