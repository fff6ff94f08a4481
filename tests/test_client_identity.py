"""The client's identities and local record: ``p2p.client.home`` and the commands over it.

The home's files (names safe for any user name, 0600 files in a 0700 directory,
atomic writes), what REGISTER / UNREGISTER / PUBLISH / DELETE / CONNECT keep
there, and, with real processes, export and import moving a user between two
homes.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p import tls, wire
from p2p.client.home import Home, HomeError, IdentityExists, file_stem
from tests.support import deadline, fresh_home, run_command
from tests.test_client_e2e import Stack
from tests.test_client_shell import FakeServer, ShellTestCase


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class HomeFileTests(TestCase):
    def setUp(self) -> None:
        self.home = Home(Path(self.mktemp()) / "p2p")

    def test_nothing_written_until_needed(self) -> None:
        self.assertIsNone(self.home.identity("alice"))
        self.assertEqual(self.home.published("alice", "."), frozenset())
        self.assertIsNone(self.home.pinned_indexer("localhost", 9090))
        self.assertFalse(self.home.path.exists())

    def test_identity_file_private_with_its_user_first(self) -> None:
        identity = self.home.create_identity("alice")
        path = self.home.identity_file("alice")
        self.assertEqual(mode(self.home.path), 0o700)
        self.assertEqual(mode(path), 0o600)
        data = path.read_bytes()
        self.assertTrue(data.startswith(b"user: alice\n-----BEGIN PRIVATE KEY-----"), data[:40])
        self.assertEqual(self.home.identity("alice").fingerprint, identity.fingerprint)
        self.assertIsNone(self.home.identity("bob"))
        # No temporary file left behind by the atomic write.
        self.assertEqual([p.name for p in path.parent.iterdir()], [path.name])
        self.home.forget_identity("alice")
        self.assertIsNone(self.home.identity("alice"))
        self.home.forget_identity("alice")  # nothing to forget: no error

    def test_file_names_for_any_user_name(self) -> None:
        names = ["alice", "Alice", "ALICE", "a/b", "..", ".", "%41lice", "zoë", "☃" * 85, "x" * 256]
        stems = [file_stem(name) for name in names]
        self.assertEqual(len(set(stems)), len(names))  # case matters, even on macOS
        for stem in stems:
            self.assertNotIn("/", stem)
            self.assertFalse(stem.startswith("."), stem)
            self.assertLessEqual(len(stem + ".json"), 255)
        self.assertEqual(file_stem("alice"), "alice")
        for name in names:
            self.home.create_identity(name)
        for name in names:
            self.assertIsNotNone(self.home.identity(name), name)
        self.assertEqual(len(list((self.home.path / "identities").iterdir())), len(names))

    def test_a_file_of_another_user_is_not_taken(self) -> None:
        self.home.create_identity("bob")
        self.home.identity_file("bob").rename(self.home.identity_file("alice"))
        with self.assertRaises(HomeError):
            self.home.identity("alice")

    def test_export_and_import(self) -> None:
        identity = self.home.create_identity("zoë")
        exported = Path(self.mktemp())
        self.home.export_identity("zoë", exported)
        self.assertEqual(mode(exported), 0o600)
        with self.assertRaises(HomeError):  # never over an existing file
            self.home.export_identity("zoë", exported)
        with self.assertRaises(HomeError):
            self.home.export_identity("nobody", self.mktemp())
        other = Home(self.mktemp())
        self.assertEqual(other.import_identity(exported), "zoë")
        self.assertEqual(other.identity("zoë").fingerprint, identity.fingerprint)
        self.assertEqual(mode(other.identity_file("zoë")), 0o600)
        self.assertEqual(other.import_identity(exported), "zoë")  # the same one again: fine
        # Another identity for zoë is kept: refused unless told.
        third = Home(self.mktemp())
        kept = third.create_identity("zoë")
        with self.assertRaises(IdentityExists):
            third.import_identity(exported)
        self.assertEqual(third.identity("zoë").fingerprint, kept.fingerprint)
        third.import_identity(exported, replace=True)
        self.assertEqual(third.identity("zoë").fingerprint, identity.fingerprint)

    def test_import_refuses_what_is_not_an_identity(self) -> None:
        bad = Path(self.mktemp())
        bad.write_bytes(tls.Identity.generate().to_pem())  # no user line
        with self.assertRaises(HomeError):
            self.home.import_identity(bad)
        bad.write_bytes(b"user: alice\nnot pem\n")
        with self.assertRaises(HomeError):
            self.home.import_identity(bad)
        with self.assertRaises(HomeError):
            self.home.import_identity(Path(self.mktemp()))  # missing
        self.assertFalse(self.home.path.exists())

    def test_known_indexers(self) -> None:
        a, b = "a" * 64, "b" * 64
        self.home.pin_indexer("Indexer.example", 9090, a)
        self.home.pin_indexer("::1", 9090, b)
        self.home.pin_indexer("indexer.example", 9091, b)
        self.assertEqual(self.home.pinned_indexer("indexer.example", 9090), a)
        self.assertEqual(self.home.pinned_indexer("indexer.example", 9091), b)
        self.home.pin_indexer("indexer.example", 9090, b)  # replaces its line
        self.assertEqual(
            self.home.known_indexers_file.read_text(),
            f"[::1]:9090 {b}\nindexer.example:9091 {b}\nindexer.example:9090 {b}\n",
        )
        self.assertEqual(mode(self.home.known_indexers_file), 0o600)
        with self.assertRaises(ValueError):
            self.home.pin_indexer("x", 1, "not hex")

    def test_published_by_share_directory(self) -> None:
        one, two = Path(self.mktemp()), Path(self.mktemp())
        self.home.add_published("alice", one, "a.txt")
        self.home.add_published("alice", one, "b.txt")
        self.home.add_published("alice", two, "a.txt")
        self.assertEqual(self.home.published("alice", one), {"a.txt", "b.txt"})
        self.assertEqual(self.home.published("bob", one), set())
        self.home.remove_published("alice", one, "a.txt")
        self.assertEqual(self.home.published("alice", one), {"b.txt"})
        self.assertEqual(mode(self.home.published_file("alice")), 0o600)
        # Another Home on the same directory (another shell of this machine) reads it.
        self.assertEqual(Home(self.home.path).published("alice", two), {"a.txt"})
        self.home.clear_published("alice", two)
        self.assertEqual(self.home.published("alice", two), set())
        self.home.clear_published("alice")
        self.assertFalse(self.home.published_file("alice").exists())


class ShellIdentityTests(ShellTestCase):
    def test_register_keeps_a_new_identity_only_when_registered(self) -> None:
        self.indexer.other("REGISTER", "taken")
        self.assertEqual(self.send("REGISTER taken"), ["c> USERNAME IN USE"])
        self.assertIsNone(self.home.identity("taken"))
        self.assertEqual(self.send("REGISTER alice"), ["c> REGISTER OK"])
        kept = self.home.identity("alice")
        self.assertEqual(self.indexer.identities[-1].fingerprint, kept.fingerprint)
        self.assertIn(str(self.home.identity_file("alice")), self.output.notes[-1])
        # Registered again (e.g. on a new indexer): the same identity.
        self.indexer.other("UNREGISTER", "alice")
        self.assertEqual(self.send("REGISTER alice"), ["c> REGISTER OK"])
        self.assertEqual(self.indexer.identities[-1].fingerprint, kept.fingerprint)
        self.assertEqual(self.home.identity("alice").fingerprint, kept.fingerprint)

    def test_an_unknown_outcome_keeps_the_identity_a_refusal_does_not(self) -> None:
        self.indexer.faults["REGISTER"] = wire.encode_code(wire.REGISTER.error)
        self.assertEqual(self.send("REGISTER bob"), ["c> REGISTER FAIL"])
        self.assertIsNone(self.home.identity("bob"))
        self.indexer.faults["REGISTER"] = b""  # closed before the reply: registered or not?
        self.assertEqual(self.send("REGISTER bob"), ["c> REGISTER FAIL"])
        sent = self.indexer.identities[-1]
        self.assertEqual(self.home.identity("bob").fingerprint, sent.fingerprint)
        self.assertIn("may have been claimed", self.output.notes[-1])
        del self.indexer.faults["REGISTER"]
        self.assertEqual(self.send("REGISTER bob"), ["c> REGISTER OK"])
        self.assertEqual(self.indexer.identities[-1].fingerprint, sent.fingerprint)

    def test_against_a_classic_indexer_nothing_is_kept(self) -> None:
        self.indexer.classic = True
        self.assertEqual(self.send("REGISTER alice"), ["c> REGISTER OK"])
        self.assertIsNone(self.home.identity("alice"))

    def test_unregister_forgets_the_identity_and_the_record(self) -> None:
        self.send("REGISTER alice")
        self.home.add_published("alice", self.share, "f.txt")
        self.indexer.faults["UNREGISTER"] = wire.encode_code(2)
        self.assertEqual(self.send("UNREGISTER alice"), ["c> UNREGISTER FAIL"])
        self.assertIsNotNone(self.home.identity("alice"))
        del self.indexer.faults["UNREGISTER"]
        self.assertEqual(self.send("UNREGISTER alice"), ["c> UNREGISTER OK"])
        self.assertIsNone(self.home.identity("alice"))
        self.assertEqual(self.home.published("alice", self.share), set())

    def test_publish_delete_recorded_and_served_in_a_later_session(self) -> None:
        self.connect()
        self.assertEqual(self.send("PUBLISH f.txt text"), ["c> PUBLISH OK"])
        self.assertEqual(self.home.published("alice", self.share), {"f.txt"})
        self.indexer.faults["PUBLISH"] = wire.encode_code(4)
        self.assertEqual(self.send("PUBLISH g.txt text"), ["c> PUBLISH FAIL"])
        self.indexer.faults["PUBLISH"] = wire.encode_code(wire.PUBLISH.own)
        self.send("PUBLISH h.txt already there")  # published by us before: recorded
        self.assertEqual(self.home.published("alice", self.share), {"f.txt", "h.txt"})
        self.send("DISCONNECT alice")
        self.connect()
        self.assertTrue(self.servers[-1].is_published("f.txt"))
        self.assertFalse(self.servers[-1].is_published("g.txt"))
        self.send("DELETE f.txt")
        self.assertFalse(self.servers[-1].is_published("f.txt"))

    def test_connect_gives_the_peer_server_the_identity(self) -> None:
        made = []

        def factory(share_dir, is_published, reactor=None, identity=None):
            made.append(identity)
            return FakeServer(share_dir, is_published)

        self.shell.server_factory = factory
        self.send("REGISTER alice")
        self.assertEqual(self.send("CONNECT alice"), ["c> CONNECT OK"])
        self.assertEqual(made[0].fingerprint, self.home.identity("alice").fingerprint)
        self.send("DISCONNECT alice")
        self.indexer.other("REGISTER", "bob")
        self.assertEqual(self.send("CONNECT bob"), ["c> CONNECT OK"])
        self.assertIsNone(made[1])


class MoveIdentityTests(TestCase):
    """``p2p-client --export-identity`` / ``--import-identity`` as real processes."""

    def client(self, home: Path, *args: str):
        argv = [sys.executable, "-m", "p2p.client", *args]
        return deadline(run_command(argv, env={"P2P_HOME": str(home)}))

    @defer.inlineCallbacks
    def test_export_then_import_moves_a_user(self) -> None:
        stack = Stack(self)
        yield stack.start_indexer()
        first = stack.shell("alice")
        yield first.check("REGISTER alice", "c> REGISTER OK")
        yield first.quit()
        identity_file = first.home / "identities" / "alice.pem"
        self.assertEqual(mode(identity_file), 0o600)

        moved = Path(self.mktemp()).resolve()
        out, err, code = yield self.client(first.home, "--export-identity", "alice", str(moved))
        self.assertEqual((out, code), (b"", 0), err)
        self.assertIn(b"PRIVATE KEY", err)
        self.assertEqual(mode(moved), 0o600)
        self.assertEqual(moved.read_bytes(), identity_file.read_bytes())
        out, err, code = yield self.client(first.home, "--export-identity", "alice", str(moved))
        self.assertEqual(code, 1)  # never over an existing file
        self.assertIn(str(moved).encode(), err)
        out, err, code = yield self.client(first.home, "--export-identity", "bob", "x.pem")
        self.assertEqual(code, 1)
        self.assertIn(b"no identity for 'bob'", err)

        second_home = fresh_home(self)
        out, err, code = yield self.client(second_home, "--import-identity", str(moved))
        self.assertEqual(code, 0, err)
        self.assertIn(b"imported the identity of alice", err)
        self.assertEqual(mode(second_home / "identities" / "alice.pem"), 0o600)
        # The second machine is alice now; a third, with a fresh home, is not.
        second = stack.shell("alice", home=second_home)
        yield second.check("CONNECT alice", "c> CONNECT OK")
        yield second.check("PUBLISH f.txt moved", "c> PUBLISH OK")
        yield second.check("DISCONNECT alice", "c> DISCONNECT OK")
        third = stack.shell("alice")
        yield third.check("CONNECT alice", "c> CONNECT FAIL")  # not alice's key: refused
        yield second.check("CONNECT alice", "c> CONNECT OK")  # still hers
        yield second.check("LIST_CONTENT alice", "c> LIST_CONTENT OK", '\tf.txt - "moved"')

        # Importing over another identity of alice is refused unless told.
        clash = fresh_home(self)
        Home(clash).create_identity("alice")
        out, err, code = yield self.client(clash, "--import-identity", str(moved))
        self.assertEqual(code, 1)
        self.assertIn(b"--replace-identity", err)
        out, err, code = yield self.client(
            clash, "--import-identity", str(moved), "--replace-identity"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            (clash / "identities" / "alice.pem").read_bytes(), identity_file.read_bytes()
        )

    @defer.inlineCallbacks
    def test_usage_errors(self) -> None:
        home = fresh_home(self)
        for args in (
            ["--export-identity", "alice"],
            ["--export-identity", "alice", "a", "b"],
            ["--indexer-fingerprint", "abc"],
            ["stray"],
        ):
            _out, err, code = yield self.client(home, *args)
            self.assertEqual(code, 2, (args, err))
        _out, err, code = yield self.client(home, "--import-identity", str(home / "none"))
        self.assertEqual(code, 1)
        self.assertIn(b"cannot read", err)
