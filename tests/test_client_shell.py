"""The shell's behaviour against the real indexer, in memory, with a fake peer
server and a fake downloader.

Every output line of protocol.md section 5, the "no connected user" rule, the
plain FAIL line for an unreachable indexer, local refusal of arguments the
protocol cannot carry, and the peer server's lifecycle. The indexer is the real
one (its protocol, directory and an in-memory store) asked through the real
client's request and reply code; only what a real indexer cannot do on demand
(an unknown code, a cut reply, being unreachable or slow) is injected.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from p2p import tls, wire
from p2p.client.home import Home
from p2p.client.indexer_client import (
    LISTING_COLUMNS,
    IndexerError,
    UnknownOperation,
    _RequestProtocol,
)
from p2p.client.shell import Shell
from p2p.peer.download import WrongPeer
from tests.test_indexer_protocol import DT, Harness


class FakeOutput:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.notes: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def progress_stream(self):
        return None


class LoopbackIndexer:
    """The real indexer in memory, asked the way ``IndexerClient`` asks it.

    Each request is sent by the client's own request protocol, read by a real
    ``IndexerProtocol`` of an ``IndexerFactory`` over ``Directory(Store(":memory:"))``,
    and its reply parsed by the client's protocol again, on string transports,
    within the call: answers are synchronous, as the shell tests need.

    ``faults[op]`` stands in for what a real indexer does not do on demand:
    reply bytes (read by the client's parser: an unknown code, a cut reply) or
    an exception (the indexer unreachable). ``hold(op)`` keeps the next ``op``
    unanswered until the returned Deferred is fired.
    """

    def __init__(self, testcase: TestCase) -> None:
        self.harness = Harness(testcase)  # the indexer's own test bench
        self.directory = self.harness.directory
        self.factory = self.harness.factory
        self.requests: list[tuple] = []
        self.identities: list = []  # the identity= of each request
        self.faults: dict[str, bytes | Exception] = {}
        self._held: dict[str, Deferred] = {}

    #: It answers as our indexer over TLS would (REGISTER keeps a new identity).
    classic = False

    def request(self, op: str, user: str, *args, identity=None):
        """What the shell calls: fires with ``(code, rows or None)``."""
        self.requests.append((op, user, *args))
        self.identities.append(identity)
        held = self._held.pop(op, None)
        if held is not None:
            return held.addCallback(lambda _: self._ask(op, user, *args))
        return self._ask(op, user, *args)

    def hold(self, op: str) -> Deferred:
        """The next ``op`` waits, unanswered, until the returned Deferred fires."""
        self._held[op] = Deferred()
        return self._held[op]

    def _ask(self, op: str, user: str, *args) -> Deferred:
        fault = self.faults.get(op)
        if isinstance(fault, Exception):
            return defer.fail(fault)
        client = _RequestProtocol(wire.encode_request(op, DT, user, *args), LISTING_COLUMNS.get(op))
        sent = StringTransport()
        client.makeConnection(sent)
        reply = fault if fault is not None else self.harness.send(sent.value())[0]
        if reply:
            client.dataReceived(reply)
        client.connectionLost(Failure(ConnectionDone()))
        return client.finished

    def other(self, op: str, user: str, *args, peer: str = "127.0.0.1") -> int:
        """A request from another client, behind the shell's back; its reply code."""
        return self.harness.request(op, user, *args, peer=peer)[0]

    def ops(self) -> list[str]:
        return [r[0] for r in self.requests]


class FakeServer:
    instances: list[FakeServer]

    def __init__(self, share_dir, is_published, reactor=None) -> None:
        self.share_dir = share_dir
        self.is_published = is_published
        self.listening = False
        self.stopped = False
        self.fail_listen = False

    def listen(self, endpoint: str):
        if self.fail_listen:
            return defer.fail(OSError("address in use"))
        self.listening = True
        self.endpoint = endpoint
        return defer.succeed(4242)

    def stop(self):
        self.listening = False
        self.stopped = True
        return defer.succeed(None)


class NoSuchFile(Exception):
    pass


class ShellTestCase(TestCase):
    def setUp(self) -> None:
        self.output = FakeOutput()
        self.indexer = LoopbackIndexer(self)
        self.servers: list[FakeServer] = []
        self.downloads: list[tuple] = []
        self.checked: list[dict] = []  # the keywords beyond the classic ones, per download
        self.resumable: list[tuple] = []  # (resume, owner, notice) per download
        self.download_result: object = 7
        self.share = Path(self.mktemp())
        self.share.mkdir()
        self.reactor = MemoryReactorClock()
        self.home = Home(self.mktemp())

        def server_factory(share_dir, is_published, reactor=None):
            server = FakeServer(share_dir, is_published, reactor)
            self.servers.append(server)
            return server

        def download(
            host, port, name, destination, progress=None, reactor=None, timeout=None, **checked
        ):
            self.downloads.append((host, port, name, destination))
            # Every GET_FILE download is resumable: kept apart from what is checked.
            self.resumable.append(
                (
                    checked.pop("resume", False),
                    checked.pop("owner", None),
                    checked.pop("notice", None),
                )
            )
            self.checked.append(checked)
            if isinstance(self.download_result, Exception):
                return defer.fail(self.download_result)
            if isinstance(self.download_result, Deferred):
                return self.download_result
            return defer.succeed(self.download_result)

        self.shell = Shell(
            self.indexer,
            self.output,
            self.share,
            peer_listen="tcp:0",
            reactor=self.reactor,
            server_factory=server_factory,
            download=download,
            no_such_file=NoSuchFile,
            home=self.home,
        )

    def send(self, *lines: str) -> list[str]:
        """Submit lines; return the result lines they printed."""
        before = len(self.output.lines)
        for line in lines:
            self.shell.submit(line)
        return self.output.lines[before:]

    def connect(self, user: str = "alice") -> None:
        """``user`` registered (by anyone) and connected through the shell."""
        self.indexer.other("REGISTER", user)
        self.assertEqual(self.send(f"CONNECT {user}"), ["c> CONNECT OK"])
        self.indexer.requests.clear()


class SimpleCommandTests(ShellTestCase):
    def check_codes(self, command: str, op: str, expected: dict[int, str], fail: str) -> None:
        """Every code of ``op``, as reply bytes read by the client, gets its line; an
        unknown code, an unreachable indexer and a reply cut short get ``fail``."""
        empty = wire.encode_listing([]) if op in LISTING_COLUMNS else b""
        for code, line in expected.items():
            self.indexer.faults[op] = wire.encode_code(code) + (empty if code == wire.OK else b"")
            self.assertEqual(self.send(command), [line], (command, code))
        self.indexer.faults[op] = wire.encode_code(99)
        self.assertEqual(self.send(command), [fail])
        self.indexer.faults[op] = IndexerError("refused")
        self.assertEqual(self.send(command), [fail])
        self.indexer.faults[op] = b""  # closed before the first reply byte
        self.assertEqual(self.send(command), [fail])

    def test_register(self) -> None:
        self.check_codes(
            "REGISTER alice",
            "REGISTER",
            {0: "c> REGISTER OK", 1: "c> USERNAME IN USE", 2: "c> REGISTER FAIL"},
            "c> REGISTER FAIL",
        )
        self.assertEqual(self.indexer.requests[0], ("REGISTER", "alice"))

    def test_unregister(self) -> None:
        self.check_codes(
            "unregister alice",
            "UNREGISTER",
            {0: "c> UNREGISTER OK", 1: "c> USER DOES NOT EXIST", 2: "c> UNREGISTER FAIL"},
            "c> UNREGISTER FAIL",
        )

    def test_publish(self) -> None:
        self.connect()
        self.check_codes(
            "PUBLISH f.txt a description",
            "PUBLISH",
            {
                0: "c> PUBLISH OK",
                1: "c> PUBLISH FAIL, USER DOES NOT EXIST",
                2: "c> PUBLISH FAIL, USER NOT CONNECTED",
                3: "c> PUBLISH FAIL, CONTENT ALREADY PUBLISHED",
                4: "c> PUBLISH FAIL",
            },
            "c> PUBLISH FAIL",
        )
        self.assertEqual(self.indexer.requests[0], ("PUBLISH", "alice", "f.txt", "a description"))

    def test_delete(self) -> None:
        self.connect()
        self.check_codes(
            "DELETE f.txt",
            "DELETE",
            {
                0: "c> DELETE OK",
                1: "c> DELETE FAIL, USER DOES NOT EXIST",
                2: "c> DELETE FAIL, USER NOT CONNECTED",
                3: "c> DELETE FAIL, CONTENT NOT PUBLISHED",
                4: "c> DELETE FAIL",
            },
            "c> DELETE FAIL",
        )

    def test_list_users_failures(self) -> None:
        self.connect()
        self.check_codes(
            "LIST_USERS",
            "LIST_USERS",
            {
                0: "c> LIST_USERS OK",
                1: "c> LIST_USERS FAIL, USER DOES NOT EXIST",
                2: "c> LIST_USERS FAIL, USER NOT CONNECTED",
                3: "c> LIST_USERS FAIL",
            },
            "c> LIST_USERS FAIL",
        )

    def test_list_content_failures(self) -> None:
        self.connect()
        self.check_codes(
            "LIST_CONTENT bob",
            "LIST_FILES",
            {
                0: "c> LIST_CONTENT OK",
                1: "c> LIST_CONTENT FAIL, USER DOES NOT EXIST",
                2: "c> LIST_CONTENT FAIL, USER NOT CONNECTED",
                3: "c> LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST",
                4: "c> LIST_CONTENT FAIL",
            },
            "c> LIST_CONTENT FAIL",
        )
        self.assertEqual(self.indexer.requests[0], ("LIST_FILES", "alice", "bob"))

    def test_listings_are_tab_indented(self) -> None:
        self.connect()
        for op, *args in (
            ("REGISTER",),
            ("CONNECT", 7),
            ("PUBLISH", "a.txt", "first file"),
            ("PUBLISH", "b", "x"),
        ):
            self.assertEqual(self.indexer.other(op, "bob", *args, peer="10.0.0.2"), 0)
        self.assertEqual(
            self.send("LIST_USERS"),
            ["c> LIST_USERS OK", "\talice 127.0.0.1 4242", "\tbob 10.0.0.2 7"],
        )
        self.assertEqual(
            self.send("LIST_CONTENT bob"),
            ["c> LIST_CONTENT OK", '\ta.txt - "first file"', '\tb - "x"'],
        )

    def test_syntax_error_and_unknown_command_ask_nothing(self) -> None:
        self.assertEqual(self.send("REGISTER"), ["Syntax error. Usage: REGISTER <user>"])
        self.assertEqual(len(self.send("NOPE")), 1)
        self.assertEqual(self.send(""), [])
        self.assertEqual(self.indexer.requests, [])

    def test_help(self) -> None:
        lines = self.send("help")
        self.assertTrue(any(line.startswith("GET_FILE [--force] <user>") for line in lines))
        self.assertEqual(self.indexer.requests, [])


class RealAnswerTests(ShellTestCase):
    """The codes the real indexer gives in each state, and the line each becomes."""

    def test_register_and_unregister(self) -> None:
        self.assertEqual(self.send("REGISTER alice"), ["c> REGISTER OK"])
        self.assertEqual(self.send("REGISTER alice"), ["c> USERNAME IN USE"])
        self.assertEqual(self.send("UNREGISTER bob"), ["c> USER DOES NOT EXIST"])
        self.assertEqual(self.send("CONNECT alice"), ["c> CONNECT OK"])
        self.assertEqual(self.send("UNREGISTER alice"), ["c> UNREGISTER FAIL"])  # connected
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        self.assertEqual(self.send("UNREGISTER alice"), ["c> UNREGISTER OK"])
        self.assertEqual(self.indexer.directory.users, {})

    def test_publish_delete_and_the_listings(self) -> None:
        self.connect()
        self.assertEqual(self.send("PUBLISH f.txt a description"), ["c> PUBLISH OK"])
        self.assertEqual(
            self.send("PUBLISH f.txt again"), ["c> PUBLISH FAIL, CONTENT ALREADY PUBLISHED"]
        )
        self.assertEqual(self.send("DELETE g.txt"), ["c> DELETE FAIL, CONTENT NOT PUBLISHED"])
        self.assertEqual(
            self.send("LIST_CONTENT bob"), ["c> LIST_CONTENT FAIL, REMOTE USER DOES NOT EXIST"]
        )
        self.assertEqual(
            self.send("LIST_CONTENT alice"), ["c> LIST_CONTENT OK", '\tf.txt - "a description"']
        )
        self.assertEqual(self.send("DELETE f.txt"), ["c> DELETE OK"])
        self.assertEqual(self.send("LIST_CONTENT alice"), ["c> LIST_CONTENT OK"])
        self.assertEqual(self.send("LIST_USERS"), ["c> LIST_USERS OK", "\talice 127.0.0.1 4242"])

    def test_user_disconnected_then_gone_behind_the_shells_back(self) -> None:
        self.connect()
        self.assertEqual(self.indexer.other("DISCONNECT", "alice"), 0)
        for command, line in (
            ("PUBLISH f x", "c> PUBLISH FAIL, USER NOT CONNECTED"),
            ("DELETE f", "c> DELETE FAIL, USER NOT CONNECTED"),
            ("LIST_USERS", "c> LIST_USERS FAIL, USER NOT CONNECTED"),
            ("LIST_CONTENT alice", "c> LIST_CONTENT FAIL, USER NOT CONNECTED"),
        ):
            self.assertEqual(self.send(command), [line], command)
        self.assertEqual(self.indexer.other("UNREGISTER", "alice"), 0)
        for command, line in (
            ("PUBLISH f x", "c> PUBLISH FAIL, USER DOES NOT EXIST"),
            ("DELETE f", "c> DELETE FAIL, USER DOES NOT EXIST"),
            ("LIST_USERS", "c> LIST_USERS FAIL, USER DOES NOT EXIST"),
            ("LIST_CONTENT alice", "c> LIST_CONTENT FAIL, USER DOES NOT EXIST"),
        ):
            self.assertEqual(self.send(command), [line], command)
        # Each line is the indexer's answer, not a local refusal.
        ops = ["PUBLISH", "DELETE", "LIST_USERS", "LIST_FILES"]
        self.assertEqual(self.indexer.ops(), ops + ops)

    def test_an_indexer_in_error_gets_the_plain_fail_lines(self) -> None:
        self.connect()
        self.indexer.factory.stop()  # from now on every request gets its error code
        for command, line in (
            ("REGISTER bob", "c> REGISTER FAIL"),
            ("UNREGISTER bob", "c> UNREGISTER FAIL"),
            ("PUBLISH f x", "c> PUBLISH FAIL"),
            ("DELETE f", "c> DELETE FAIL"),
            ("LIST_USERS", "c> LIST_USERS FAIL"),
            ("LIST_CONTENT alice", "c> LIST_CONTENT FAIL"),
            ("DISCONNECT alice", "c> DISCONNECT FAIL"),
        ):
            self.assertEqual(self.send(command), [line], command)
        self.assertEqual(len(self.indexer.requests), 7)


class NotConnectedTests(ShellTestCase):
    def test_commands_needing_a_user_do_not_ask_the_indexer(self) -> None:
        cases = {
            "PUBLISH f.txt text": "c> PUBLISH FAIL, USER NOT CONNECTED",
            "DELETE f.txt": "c> DELETE FAIL, USER NOT CONNECTED",
            "LIST_USERS": "c> LIST_USERS FAIL, USER NOT CONNECTED",
            "LIST_CONTENT bob": "c> LIST_CONTENT FAIL, USER NOT CONNECTED",
            "DISCONNECT alice": "c> DISCONNECT FAIL / USER NOT CONNECTED",
            "GET_FILE bob a b": "c> GET_FILE FAIL",
        }
        for command, line in cases.items():
            self.assertEqual(self.send(command), [line], command)
        self.assertEqual(self.indexer.requests, [])
        self.assertEqual(len(self.output.notes), len(cases))  # each says why on stderr


class BadArgumentTests(ShellTestCase):
    def test_arguments_the_protocol_cannot_carry(self) -> None:
        long_name = "x" * (wire.MAX_NAME + 1)
        self.assertEqual(self.send(f"REGISTER {long_name}"), ["c> REGISTER FAIL"])
        self.assertEqual(self.send("REGISTER bell\x07"), ["c> REGISTER FAIL"])
        self.assertEqual(self.send(f"CONNECT {long_name}"), ["c> CONNECT FAIL"])
        self.assertEqual(self.servers, [])
        self.connect()
        self.assertEqual(self.send(f"PUBLISH {long_name} d"), ["c> PUBLISH FAIL"])
        self.assertEqual(self.send(f"PUBLISH f {'d' * 300}"), ["c> PUBLISH FAIL"])
        self.assertEqual(self.send(f"DELETE {long_name}"), ["c> DELETE FAIL"])
        self.assertEqual(self.send(f"LIST_CONTENT {long_name}"), ["c> LIST_CONTENT FAIL"])
        self.assertEqual(self.send(f"GET_FILE bob {long_name} x"), ["c> GET_FILE FAIL"])
        self.assertEqual(self.indexer.requests, [])
        self.assertEqual(len(self.output.notes), 9)


class ConnectTests(ShellTestCase):
    def test_connect_starts_the_server_first_and_sends_its_port(self) -> None:
        # Someone published in alice's name at the indexer (the private-key attack);
        # this client published mine.txt from this share directory in an earlier session,
        # and theirs.txt from another directory.
        for op, *args in (
            ("REGISTER",),
            ("CONNECT", 1),
            ("PUBLISH", "old.txt", "from before"),
            ("DISCONNECT",),
        ):
            self.assertEqual(self.indexer.other(op, "alice", *args), 0)
        self.home.add_published("alice", self.share, "mine.txt")
        self.home.add_published("alice", self.mktemp(), "theirs.txt")
        self.assertEqual(self.send("connect alice"), ["c> CONNECT OK"])
        [server] = self.servers
        self.assertTrue(server.listening)
        self.assertEqual(server.endpoint, "tcp:0")
        # Only CONNECT: what the indexer lists never decides what is served.
        self.assertEqual(self.indexer.requests, [("CONNECT", "alice", 4242)])
        self.assertEqual(self.shell.user, "alice")
        self.assertTrue(server.is_published("mine.txt"))
        self.assertFalse(server.is_published("old.txt"))
        self.assertFalse(server.is_published("theirs.txt"))
        self.assertFalse(server.is_published("other.txt"))

    def test_failed_connect_stops_the_server(self) -> None:
        def cannot_connect(line: str) -> None:
            self.assertEqual(self.send("CONNECT alice"), [line])
            self.assertTrue(self.servers[-1].stopped)
            self.assertIsNone(self.shell.user)

        cannot_connect("c> CONNECT FAIL, USER DOES NOT EXIST")  # 1
        self.indexer.other("REGISTER", "alice")
        self.indexer.other("CONNECT", "alice", 9)
        cannot_connect("c> USER ALREADY CONNECTED")  # 2
        self.indexer.factory.stop()  # answers every request with its error code
        cannot_connect("c> CONNECT FAIL")  # 3
        self.assertEqual(self.indexer.ops(), ["CONNECT"] * 3)
        self.indexer.faults["CONNECT"] = IndexerError("down")
        self.assertEqual(self.send("CONNECT alice"), ["c> CONNECT FAIL"])
        self.assertTrue(self.servers[-1].stopped)

    def test_server_that_cannot_listen(self) -> None:
        def factory(share_dir, is_published, reactor=None):
            server = FakeServer(share_dir, is_published)
            server.fail_listen = True
            return server

        self.shell.server_factory = factory
        self.assertEqual(self.send("CONNECT alice"), ["c> CONNECT FAIL"])
        self.assertEqual(self.indexer.requests, [])

    def test_one_connected_user_per_shell(self) -> None:
        self.connect("alice")
        self.assertEqual(self.send("CONNECT alice"), ["c> USER ALREADY CONNECTED"])
        self.assertEqual(self.send("CONNECT bob"), ["c> CONNECT FAIL"])
        self.assertEqual(self.indexer.requests, [])
        self.assertEqual(len(self.servers), 1)

    def test_publish_and_delete_update_what_is_served(self) -> None:
        self.connect()
        server = self.servers[0]
        self.send("PUBLISH f.txt text")
        self.assertTrue(server.is_published("f.txt"))
        self.send("DELETE f.txt")
        self.assertFalse(server.is_published("f.txt"))

    def test_publish_outside_the_share_directory_warns(self) -> None:
        self.connect()
        (self.share / "here.txt").write_bytes(b"x")
        self.assertEqual(self.send("PUBLISH here.txt ok"), ["c> PUBLISH OK"])
        self.assertIn("serving", self.output.notes[-1])  # no warning for a shared file
        self.assertEqual(self.send("PUBLISH ../up.txt out"), ["c> PUBLISH OK"])
        self.assertIn("not inside the share directory", self.output.notes[-1])
        self.assertEqual(self.send("PUBLISH /etc/passwd abs"), ["c> PUBLISH OK"])
        self.assertIn("not inside the share directory", self.output.notes[-1])
        self.assertEqual(self.send("PUBLISH missing.txt later"), ["c> PUBLISH OK"])
        self.assertIn("no file missing.txt", self.output.notes[-1])
        # The shared file with its size and hash; the others, which cannot be read, without.
        self.assertEqual(self.indexer.ops(), ["PUBLISH_FILE"] + ["PUBLISH"] * 3)

    def test_disconnect_stops_the_server(self) -> None:
        self.connect()
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        self.assertTrue(self.servers[0].stopped)
        self.assertIsNone(self.shell.user)
        self.assertFalse(self.servers[0].is_published("anything"))

    def test_disconnect_failures(self) -> None:
        self.connect()
        self.indexer.faults["DISCONNECT"] = wire.encode_code(3)  # any other error
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT FAIL"])
        self.assertEqual(self.shell.user, "alice")
        del self.indexer.faults["DISCONNECT"]
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        # Gone behind the shell's back: disconnected and unregistered by another client.
        self.connect()
        self.assertEqual(self.indexer.other("DISCONNECT", "alice"), 0)
        self.assertEqual(self.indexer.other("UNREGISTER", "alice"), 0)
        self.assertEqual(
            self.send("DISCONNECT alice"), ["c> DISCONNECT FAIL / USER DOES NOT EXIST"]
        )
        self.assertIsNone(self.shell.user)
        # Only disconnected behind its back.
        self.connect()
        self.assertEqual(self.indexer.other("DISCONNECT", "alice"), 0)
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT FAIL / USER NOT CONNECTED"])
        self.indexer.faults["DISCONNECT"] = IndexerError("down")
        self.connect()
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT FAIL"])
        self.assertEqual(self.shell.user, "alice")


class GetFileTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.connect()
        for user, peer, port in (("bobby", "10.0.0.9", 1), ("bob", "10.0.0.2", 5555)):
            self.assertEqual(self.indexer.other("REGISTER", user), 0)
            self.assertEqual(self.indexer.other("CONNECT", user, port, peer=peer), 0)

    def test_ok(self) -> None:
        """bob registered classically: unclaimed (``-``), so a plaintext download."""
        self.assertEqual(self.send("GET_FILE bob r.bin l.bin"), ["c> GET_FILE OK"])
        self.assertEqual(self.downloads, [("10.0.0.2", 5555, "r.bin", Path("l.bin"))])
        self.assertEqual(self.checked, [{}])  # nothing published of r.bin: unverified
        self.assertEqual(self.resumable, [(True, "bob", self.output.note)])
        self.assertEqual(
            self.indexer.requests, [("LIST_PEERS", "alice"), ("LIST_FILES", "alice", "bob")]
        )
        self.assertIn("unverified", self.output.notes[-1])

    def list_peers(self, *rows: tuple[str, str, int, str]) -> None:
        """The next LIST_PEERS answers these rows."""
        self.indexer.faults["LIST_PEERS"] = wire.encode_code(wire.OK) + wire.encode_listing(rows)

    def test_a_claimed_owner_is_downloaded_from_with_its_key_checked(self) -> None:
        key = "ab" * 32
        self.list_peers(("bob", "10.0.0.2", 5555, key))
        self.assertEqual(self.send("GET_FILE bob r.bin l.bin"), ["c> GET_FILE OK"])
        self.assertEqual(self.downloads, [("10.0.0.2", 5555, "r.bin", Path("l.bin"))])
        self.assertEqual(self.checked, [{"expected_fingerprint": key}])

    def test_a_peer_with_another_key_fails_and_says_who_it_is_not(self) -> None:
        self.list_peers(("bob", "10.0.0.2", 5555, "ab" * 32))
        self.download_result = WrongPeer(
            "10.0.0.2:5555", tls.FingerprintMismatch("ab" * 32, "cd" * 32)
        )
        before = len(self.output.notes)
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE FAIL"])
        [note] = self.output.notes[before:]  # one line on stderr
        self.assertIn("the peer at 10.0.0.2:5555 is not bob", note)
        self.assertIn("its key differs from the one the indexer lists", note)

    def test_a_bad_fingerprint_in_the_listing_is_no_address(self) -> None:
        self.list_peers(("bob", "10.0.0.2", 5555, "not-a-key"))
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE FAIL"])
        self.assertEqual(self.downloads, [])

    def test_a_classic_indexer_is_asked_with_list_users(self) -> None:
        # It does not know LIST_PEERS (closes without a reply byte): asked again classically.
        self.indexer.faults["LIST_PEERS"] = UnknownOperation("what is LIST_PEERS?")
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE OK"])
        self.assertEqual(self.indexer.ops(), ["LIST_PEERS", "LIST_USERS", "LIST_FILES"])
        self.assertEqual(self.checked, [{}])
        # Known to be classic: LIST_USERS at once.
        self.indexer.requests.clear()
        self.indexer.classic = True
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE OK"])
        self.assertEqual(self.indexer.ops(), ["LIST_USERS", "LIST_FILES"])
        self.assertEqual(self.checked, [{}, {}])

    def test_no_such_file(self) -> None:
        self.download_result = NoSuchFile()
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE FAIL / FILE NOT EXIST"])

    def test_download_failure(self) -> None:
        self.download_result = OSError("connection refused")
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE FAIL"])
        self.assertIn("connection refused", self.output.notes[-1])

    def test_owner_not_connected_or_listing_refused(self) -> None:
        self.assertEqual(self.send("GET_FILE bo r l"), ["c> GET_FILE FAIL"])
        self.indexer.faults["LIST_PEERS"] = IndexerError("down")
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE FAIL"])
        del self.indexer.faults["LIST_PEERS"]
        self.assertEqual(self.indexer.other("DISCONNECT", "alice"), 0)  # LIST_PEERS answers 2
        self.assertEqual(self.send("GET_FILE bob r l"), ["c> GET_FILE FAIL"])
        self.assertEqual(self.indexer.ops(), ["LIST_PEERS"] * 3)
        self.assertEqual(self.downloads, [])

    def test_commands_wait_for_a_running_download(self) -> None:
        pending: Deferred = Deferred()
        self.download_result = pending
        self.assertEqual(self.send("GET_FILE bob r l", "LIST_USERS"), [])
        self.assertTrue(self.shell.busy)
        pending.callback(3)
        self.assertEqual(
            self.output.lines[-5:],
            [
                "c> GET_FILE OK",
                "c> LIST_USERS OK",
                "\talice 127.0.0.1 4242",
                "\tbobby 10.0.0.9 1",
                "\tbob 10.0.0.2 5555",
            ],
        )

    def test_quit_cancels_a_running_download_and_disconnects(self) -> None:
        cancelled = []
        pending: Deferred = Deferred(lambda d: cancelled.append(True))
        self.download_result = pending
        self.send("GET_FILE bob r l")
        d = self.shell.shutdown()
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.output.lines[-1], "c> GET_FILE FAIL")
        self.assertTrue(d.called)
        self.assertIn(("DISCONNECT", "alice"), self.indexer.requests)


class EndingTests(ShellTestCase):
    def test_quit_disconnects_first_and_ends(self) -> None:
        self.connect()
        self.assertEqual(self.send("QUIT", "REGISTER later"), [])
        self.assertEqual(self.indexer.requests, [("DISCONNECT", "alice")])
        self.assertTrue(self.servers[0].stopped)
        self.assertTrue(self.shell.ended.called)

    def test_quit_without_a_user_asks_nothing(self) -> None:
        self.send("quit")
        self.assertEqual(self.indexer.requests, [])
        self.assertTrue(self.shell.ended.called)

    def test_end_of_input_runs_queued_lines_then_quits(self) -> None:
        slow = self.indexer.hold("REGISTER")
        self.send("REGISTER alice", "CONNECT alice")
        self.shell.end_of_input()
        self.assertFalse(self.shell.ended.called)
        slow.callback(None)
        self.assertEqual(self.output.lines, ["c> REGISTER OK", "c> CONNECT OK"])
        self.assertEqual(self.indexer.ops()[-1], "DISCONNECT")
        self.assertTrue(self.shell.ended.called)

    def test_shutdown_is_idempotent_and_survives_a_dead_indexer(self) -> None:
        self.connect()
        self.indexer.faults["DISCONNECT"] = IndexerError("down")
        first = self.shell.shutdown()
        second = self.shell.shutdown()
        self.assertTrue(first.called and second.called)
        self.assertEqual(self.indexer.ops(), ["DISCONNECT"])
        self.assertTrue(self.servers[0].stopped)
        self.assertIn("could not disconnect alice", self.output.notes[-1])

    def test_prompt_is_redrawn_when_idle(self) -> None:
        prompts = []
        self.shell.on_idle = lambda: prompts.append(True)
        self.send("HELP")
        self.assertEqual(len(prompts), 1)
        slow = self.indexer.hold("REGISTER")
        self.send("REGISTER a", "REGISTER b")
        self.assertEqual(len(prompts), 1)
        slow.callback(None)
        self.assertEqual(len(prompts), 2)
