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
"""

from __future__ import annotations

from p2p import wire
from p2p.indexer.store import Store, UserRow

Address = tuple[str, int]
#: A reply: the code and the bytes that follow it (the listing after 0, else empty).
Result = tuple[int, bytes]

#: ``--classic`` policies: the operations served to a request without identity.
CLASSIC_POLICIES: dict[str, frozenset[str]] = {
    "allow": frozenset(wire.OPS),
    "read-only": wire.READ_OPS,
    "deny": frozenset(),
}


class Directory:
    """Users (connected or not) with the files each one published."""

    def __init__(self, store: Store, audit: bool = False, classic: str = "allow") -> None:
        if classic not in CLASSIC_POLICIES:
            raise ValueError(f"classic must be one of {sorted(CLASSIC_POLICIES)}, not {classic!r}")
        self.store = store
        #: Write one audit record per request into the store's outbox.
        self.audit = audit
        #: The operations served to requests without identity (``--classic``).
        self.classic_ops = CLASSIC_POLICIES[classic]
        self.users: dict[str, UserRow] = {}
        #: Connected users and their addresses, in connection order (LIST_USERS).
        self.connected: dict[str, Address] = {}
        #: The listings of LIST_USERS and LIST_PEERS, kept until ``connected`` changes.
        self._listings: dict[bool, bytes] = {}
        #: Each owner's LIST_CONTENT listing, kept until the owner's files change: one
        #: shared, immutable listing per change, however many ask (and never read it).
        self._contents: dict[str, bytes] = {}
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
        }

    def load(self) -> None:
        """Replace memory with what the store holds (at start, or after a failed commit)."""
        self.users = self.store.load()
        self.connected = {n: u.address for n, u in self.users.items() if u.address is not None}
        self._listings.clear()
        self._contents.clear()

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
        elif (identity is None and op.name not in self.classic_ops) or (
            row is not None and row.identity is not None and row.identity != identity
        ):
            code, body = op.error, b""
        elif row is None and op.no_user is not None:
            code, body = op.no_user, b""
        elif op.not_connected is not None and row.address is None:
            code, body = op.not_connected, b""
        else:
            code, body = self._handlers[op.name](user, row, args, address, identity)
        if self.audit:
            file_name = args[0] if op.name in wire.AUDIT_FILE_OPS else None
            self.store.add_outbox(wire.audit_record(user, op.name, datetime, file_name))
        return code, body

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
        self._contents.pop(user, None)
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
        return wire.OK, b""

    def _disconnect(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        row.address = None
        del self.connected[user]
        self._listings.clear()
        self.store.set_address(user, None)
        return wire.OK, b""

    def _publish(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        name, description = args
        if name in row.files:
            return wire.PUBLISH.own, b""
        row.files[name] = description
        self._contents.pop(user, None)
        self.store.add_file(user, name, description)
        return wire.OK, b""

    def _delete(
        self, user: str, row: UserRow, args: list, address: Address | None, identity: str | None
    ) -> Result:
        name = args[0]
        if name not in row.files:
            return wire.DELETE.own, b""
        del row.files[name]
        self._contents.pop(user, None)
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
