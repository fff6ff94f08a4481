"""Claimed names in the indexer's store and directory (docs/protocol.md, TLS extension).

A name registered with an identity (the fingerprint of a TLS client
certificate) answers only to that identity; ``--classic`` limits what requests
without identity may do; LIST_PEERS lists each connected user's claim.
"""

from __future__ import annotations

import sqlite3

from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer.directory import Directory
from p2p.indexer.store import Store

DT = "17/12/2014 13:20:35"
ALICE = "a" * wire.FINGERPRINT_LENGTH
MALLORY = "b" * wire.FINGERPRINT_LENGTH
HERE = ("127.0.0.1", 5000)

#: One well-formed request of each operation as alice (arguments that would succeed).
AS_ALICE: dict[str, list] = {
    "REGISTER": [],
    "UNREGISTER": [],
    "CONNECT": [6000],
    "DISCONNECT": [],
    "PUBLISH": ["new.txt", "a new file"],
    "DELETE": ["a.txt"],
    "LIST_USERS": [],
    "LIST_CONTENT": ["bob"],
    "LIST_PEERS": [],
}


class StoreClaims(TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()

    def open(self) -> Store:
        store = Store(self.path)
        store.open()
        self.addCleanup(store.close)
        return store

    def test_identity_survives_reopen(self) -> None:
        store = self.open()
        store.add_user("alice", ALICE)
        store.add_user("bob")
        store.add_file("alice", "a.txt", "a file")
        store.commit()
        store.close()
        store = self.open()
        users = store.load()
        self.assertEqual(users["alice"].identity, ALICE)
        self.assertIsNone(users["bob"].identity)
        row = store.user("alice")
        self.assertEqual((row.identity, row.address, row.files), (ALICE, None, {"a.txt": "a file"}))
        self.assertIsNone(store.user("carol"))

    def test_remove_user_drops_the_claim(self) -> None:
        store = self.open()
        store.add_user("alice", ALICE)
        store.commit()
        store.remove_user("alice")
        store.add_user("alice")
        store.commit()
        self.assertIsNone(store.user("alice").identity)

    def test_database_of_an_earlier_version(self) -> None:
        """A users table without the identity column gains it; its rows stay unclaimed."""
        db = sqlite3.connect(self.path)
        db.executescript(
            "CREATE TABLE users (name TEXT PRIMARY KEY, ip TEXT, port INTEGER);"
            "INSERT INTO users VALUES ('old', '10.0.0.1', 5000);"
        )
        db.close()
        store = self.open()
        users = store.load()
        self.assertEqual(list(users), ["old"])
        self.assertEqual((users["old"].address, users["old"].identity), (("10.0.0.1", 5000), None))
        store.add_user("new", ALICE)
        store.commit()
        store.close()
        self.assertEqual(self.open().user("new").identity, ALICE)


class Claims(TestCase):
    """alice claimed by ALICE, connected with a.txt; bob unclaimed, connected."""

    classic = "allow"

    def setUp(self) -> None:
        self.store = Store()
        self.store.open()
        self.addCleanup(self.store.close)
        self.store.add_user("alice", ALICE)
        self.store.set_address("alice", HERE)
        self.store.add_file("alice", "a.txt", "alice's file")
        self.store.add_user("bob")
        self.store.set_address("bob", ("127.0.0.1", 5001))
        self.store.commit()
        self.directory = Directory(self.store, audit=True, classic=self.classic)
        self.directory.load()

    def handle(self, op: str, user: str, args: list, identity: str | None) -> tuple[int, bytes]:
        address = ("127.0.0.1", args[0]) if op == "CONNECT" else None  # as the factory does
        return self.directory.handle(wire.OPS[op], DT, user, args, address, identity)

    def snapshot(self) -> tuple:
        """Memory and database, the outbox aside."""
        d = self.directory
        memory = (
            {n: (r.address, dict(r.files), r.identity) for n, r in d.users.items()},
            list(d.connected.items()),
        )
        db = self.store.db
        tables = tuple(
            db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ("users", "files")
        )
        return memory, tables

    def outbox(self) -> list[str]:
        return [r for _, r in self.store.db.execute("SELECT seq, record FROM outbox ORDER BY seq")]

    def assertRefused(self, op: str, user: str, args: list, identity: str | None) -> None:
        before, audited = self.snapshot(), len(self.outbox())
        code, body = self.handle(op, user, args, identity)
        where = f"{op} {user} as {identity}"
        self.assertEqual((code, body), (wire.OPS[op].error, b""), where)
        self.assertEqual(self.snapshot(), before, where)
        self.assertEqual(
            self.outbox()[audited:], [wire.audit_record(user, op, DT, *args[:1])], where
        )


class ClaimedNames(Claims):
    def test_every_op_refused_without_identity_or_with_another(self) -> None:
        for identity in (None, MALLORY):
            for op, args in AS_ALICE.items():
                self.assertRefused(op, "alice", args, identity)

    def test_owner_does_everything(self) -> None:
        for op, args, code in [
            ("REGISTER", [], wire.REGISTER.own),  # already registered: its own code
            ("LIST_USERS", [], 0),
            ("LIST_CONTENT", ["bob"], 0),
            ("LIST_PEERS", [], 0),
            ("PUBLISH", ["new.txt", "a new file"], 0),
            ("DELETE", ["a.txt"], 0),
            ("CONNECT", [6000], wire.CONNECT.own),  # already connected
            ("UNREGISTER", [], wire.UNREGISTER.error),  # connected: refused as ever
            ("DISCONNECT", [], 0),
            ("CONNECT", [6000], 0),
            ("DISCONNECT", [], 0),
            ("UNREGISTER", [], 0),
        ]:
            self.assertEqual(self.handle(op, "alice", args, ALICE)[0], code, op)
        self.assertNotIn("alice", self.directory.users)

    def test_unregister_drops_the_claim(self) -> None:
        self.handle("DISCONNECT", "alice", [], ALICE)
        self.assertEqual(self.handle("UNREGISTER", "alice", [], ALICE)[0], 0)
        self.assertEqual(self.handle("REGISTER", "alice", [], MALLORY)[0], 0)
        self.assertEqual(self.directory.users["alice"].identity, MALLORY)
        self.assertEqual(self.store.user("alice").identity, MALLORY)
        self.assertRefused("CONNECT", "alice", [7000], ALICE)

    def test_register_claims_only_with_identity(self) -> None:
        self.assertEqual(self.handle("REGISTER", "carol", [], None)[0], 0)
        self.assertIsNone(self.directory.users["carol"].identity)
        self.assertEqual(self.handle("REGISTER", "dave", [], MALLORY)[0], 0)
        self.assertEqual(self.store.user("dave").identity, MALLORY)
        self.assertRefused("CONNECT", "dave", [7000], None)

    def test_unclaimed_names_answer_anyone(self) -> None:
        for identity in (None, MALLORY, ALICE):
            self.assertEqual(self.handle("PUBLISH", "bob", ["b.txt", "x"], identity)[0], 0)
            self.assertEqual(self.handle("DELETE", "bob", ["b.txt"], identity)[0], 0)

    def test_claimed_owner_listed_by_others(self) -> None:
        """Listing a claimed user's files is a request of the asker, not of the owner."""
        code, body = self.handle("LIST_CONTENT", "bob", ["alice"], None)
        self.assertEqual((code, body), (0, wire.encode_listing([("a.txt", "alice's file")])))

    def test_no_user_code_before_claims(self) -> None:
        for op in ("UNREGISTER", "CONNECT", "DISCONNECT", "LIST_PEERS"):
            self.assertEqual(self.handle(op, "carol", AS_ALICE[op], MALLORY)[0], 1, op)

    def test_list_peers(self) -> None:
        code, body = self.handle("LIST_PEERS", "bob", [], None)
        self.assertEqual(code, 0)
        self.assertEqual(
            body,
            wire.encode_listing(
                [("alice", "127.0.0.1", 5000, ALICE), ("bob", "127.0.0.1", 5001, wire.UNCLAIMED)]
            ),
        )
        # As LIST_USERS, with the claim as a fourth column.
        self.assertEqual(
            self.handle("LIST_USERS", "bob", [], None)[1],
            wire.encode_listing([("alice", "127.0.0.1", 5000), ("bob", "127.0.0.1", 5001)]),
        )
        self.assertEqual(self.outbox()[-2:], [f"bob LIST_PEERS {DT}", f"bob LIST_USERS {DT}"])

    def test_list_peers_follows_connections(self) -> None:
        self.handle("LIST_PEERS", "bob", [], None)  # cached now
        self.handle("DISCONNECT", "alice", [], ALICE)
        self.assertEqual(
            self.handle("LIST_PEERS", "bob", [], None)[1],
            wire.encode_listing([("bob", "127.0.0.1", 5001, wire.UNCLAIMED)]),
        )
        self.handle("CONNECT", "alice", [5002], ALICE)
        self.assertEqual(
            self.handle("LIST_PEERS", "bob", [], None)[1],
            wire.encode_listing(
                [("bob", "127.0.0.1", 5001, wire.UNCLAIMED), ("alice", "127.0.0.1", 5002, ALICE)]
            ),
        )

    def test_list_peers_codes(self) -> None:
        self.handle("DISCONNECT", "bob", [], None)
        self.assertEqual(
            self.handle("LIST_PEERS", "bob", [], None), (wire.LIST_PEERS.not_connected, b"")
        )
        self.assertEqual(
            self.handle("LIST_PEERS", "carol", [], None), (wire.LIST_PEERS.no_user, b"")
        )

    def test_claims_survive_a_reload(self) -> None:
        self.directory.load()
        self.assertEqual(self.directory.users["alice"].identity, ALICE)
        self.assertRefused("DISCONNECT", "alice", [], None)

    def test_unknown_policy(self) -> None:
        self.assertRaises(ValueError, Directory, self.store, classic="sometimes")


class ReadOnly(Claims):
    classic = "read-only"

    def test_only_listings_without_identity(self) -> None:
        for op, args in AS_ALICE.items():
            if op in wire.READ_OPS:
                self.assertEqual(self.handle(op, "bob", ["alice"] if args else [], None)[0], 0, op)
            else:
                self.assertRefused(op, "bob", args, None)
        self.assertRefused("REGISTER", "carol", [], None)

    def test_everything_with_identity(self) -> None:
        self.assertEqual(self.handle("PUBLISH", "bob", ["b.txt", "x"], MALLORY)[0], 0)
        self.assertEqual(self.handle("REGISTER", "carol", [], MALLORY)[0], 0)

    def test_claims_still_apply(self) -> None:
        self.assertRefused("LIST_USERS", "alice", [], None)
        self.assertRefused("LIST_USERS", "alice", [], MALLORY)


class Deny(Claims):
    classic = "deny"

    def test_nothing_without_identity(self) -> None:
        for op, args in AS_ALICE.items():
            self.assertRefused(op, "bob", args, None)
        self.assertRefused("REGISTER", "carol", [], None)

    def test_everything_with_identity(self) -> None:
        self.assertEqual(self.handle("LIST_USERS", "bob", [], MALLORY)[0], 0)
        self.assertEqual(self.handle("DISCONNECT", "bob", [], MALLORY)[0], 0)
        self.assertEqual(self.handle("LIST_USERS", "alice", [], ALICE)[0], 0)
