"""End-to-end: a real ``twistd p2p-indexer`` process, real sockets on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer.address import primary_address
from p2p.indexer.store import Store
from tests import postgres
from tests.support import deadline, hold_port, spawn_twistd

DT = "17/12/2014 13:20:35"


class RawClient(Protocol):
    """Collects every byte until the server closes; ``closed`` fires with them."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.data)


class Indexer:
    """One running indexer and ways to talk to it."""

    def __init__(self, testcase: TestCase, process, port: int) -> None:
        self.testcase = testcase
        self.process = process
        self.port = port

    @defer.inlineCallbacks
    def open(self):
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        yield connectProtocol(endpoint, client)
        return client

    @defer.inlineCallbacks
    def send(self, data: bytes, timeout: float = 10):
        """Open a connection, send ``data``, return everything until the server closes."""
        client = yield self.open()
        client.transport.write(data)
        reply = yield deadline(client.closed, timeout)
        return reply

    def request(self, op: str, user: str, *args):
        return self.send(wire.encode_request(op, DT, user, *args))

    @defer.inlineCallbacks
    def codes(self, *requests):
        """Run requests one after another; the list of their first reply bytes."""
        out = []
        for op, user, *args in requests:
            reply = yield self.request(op, user, *args)
            out.append(reply[0] if reply else None)
        return out


def indexer_db(testcase: TestCase, db: str) -> str:
    """The ``--db`` of a test's indexer: ``db`` (a file in its directory); in a test class
    with ``on_postgres`` set, the test's own database on the throwaway PostgreSQL server
    (tests/postgres.py), the same one each time the test starts an indexer."""
    if not getattr(testcase, "on_postgres", False):
        return db
    uri = getattr(testcase, "postgres_uri", None)
    if uri is None:
        uri = testcase.postgres_uri = postgres.database(testcase)
    return uri


@defer.inlineCallbacks
def start_indexer(testcase: TestCase, *options: str, cwd: Path | None = None, db: str = "ix.db"):
    """``twistd p2p-indexer`` on a kernel-chosen loopback port; wait for its init line."""
    if cwd is None:
        cwd = Path(testcase.mktemp())
        cwd.mkdir(parents=True)
    db = indexer_db(testcase, db)
    if not any(o.startswith("--listen") for o in options):
        options = ("--listen", "tcp:0:interface=127.0.0.1", *options)
    process = spawn_twistd(testcase, "p2p-indexer", "--db", db, *options, cwd=cwd)
    match = yield process.wait_for_line(r"^s> init server (\S+):(\d+)$")
    return Indexer(testcase, process, int(match.group(2)))


def live_port(testcase: TestCase) -> int:
    """A port where something accepts connections (a peer that answers the indexer's
    probe, docs/protocol.md section 7), until the test ends."""
    port = reactor.listenTCP(0, ServerFactory.forProtocol(Protocol), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


class EveryCode(TestCase):
    @defer.inlineCallbacks
    def test_every_code_over_the_wire(self):
        ix = yield start_indexer(self)
        peer = live_port(self)  # alice's peer answers: a second CONNECT is refused (2)
        table = [  # (request, expected code)
            (("REGISTER", "alice"), 0),
            (("REGISTER", "alice"), 1),
            (("REGISTER", ""), 2),
            (("REGISTER", "bob"), 0),
            (("CONNECT", "carol", 5000), 1),
            (("CONNECT", "alice", peer), 0),
            (("CONNECT", "alice", 5001), 2),
            (("CONNECT", "bob", "port"), 3),
            (("PUBLISH", "carol", "f", "d"), 1),
            (("PUBLISH", "bob", "f", "d"), 2),
            (("PUBLISH", "alice", "f", "d"), 0),
            (("PUBLISH", "alice", "f", "d"), 3),
            (("PUBLISH", "alice", "g", ""), 4),
            (("DELETE", "carol", "f"), 1),
            (("DELETE", "bob", "f"), 2),
            (("DELETE", "alice", "nope"), 3),
            (("DELETE", "alice", ""), 4),
            (("LIST_USERS", "carol"), 1),
            (("LIST_USERS", "bob"), 2),
            (("LIST_USERS", ""), 3),
            (("LIST_CONTENT", "carol", "alice"), 1),
            (("LIST_CONTENT", "bob", "alice"), 2),
            (("LIST_CONTENT", "alice", "carol"), 3),
            (("LIST_CONTENT", "alice", ""), 4),
            (("UNREGISTER", "carol"), 1),
            (("UNREGISTER", "alice"), 2),
            (("UNREGISTER", ""), 2),
            (("DISCONNECT", "carol"), 1),
            (("DISCONNECT", "bob"), 2),
            (("DISCONNECT", ""), 3),
            (("DELETE", "alice", "f"), 0),
            (("DISCONNECT", "alice"), 0),
            (("UNREGISTER", "alice"), 0),
        ]
        got = yield ix.codes(*(request for request, _ in table))
        self.assertEqual(got, [code for _, code in table])
        self.assertIn("s> REGISTER FROM alice", ix.process.lines)
        self.assertIn("s> LIST_CONTENT FROM bob", ix.process.lines)

    @defer.inlineCallbacks
    def test_concurrent_registers_one_winner(self):
        ix = yield start_indexer(self)
        replies = yield defer.gatherResults([ix.request("REGISTER", "same") for _ in range(20)])
        self.assertEqual(sorted(replies), [b"\0"] + [b"\1"] * 19)

    @defer.inlineCallbacks
    def test_listings_over_the_wire(self):
        ix = yield start_indexer(self)
        yield ix.codes(
            ("REGISTER", "alice"),
            ("CONNECT", "alice", 5000),
            ("PUBLISH", "alice", "a.txt", "first file"),
            ("PUBLISH", "alice", "b.txt", "second"),
        )
        users = yield ix.request("LIST_USERS", "alice")
        self.assertEqual(users, b"\0" + wire.encode_fields(1, "alice", "127.0.0.1", 5000))
        content = yield ix.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(
            content, b"\0" + wire.encode_fields(2, "a.txt", "first file", "b.txt", "second")
        )

    @defer.inlineCallbacks
    def test_loopback_recorded_as_primary_address_on_all_interfaces(self):
        ix = yield start_indexer(self, "--listen", "tcp:0")
        yield ix.codes(("REGISTER", "alice"), ("CONNECT", "alice", 5000))
        users = yield ix.request("LIST_USERS", "alice")
        self.assertEqual(users, b"\0" + wire.encode_fields(1, "alice", primary_address(), 5000))


class StartFailure(TestCase):
    @defer.inlineCallbacks
    def test_port_taken_ends_the_process(self):
        ix = yield start_indexer(self)
        other = spawn_twistd(
            self, "p2p-indexer", "--listen", f"tcp:{ix.port}:interface=127.0.0.1", "--db=:memory:"
        )
        code = yield deadline(other.ended, 20)
        self.assertIn("Couldn't listen", other.output())
        said = f"s> indexer cannot listen on tcp:{ix.port}:interface=127.0.0.1: "
        self.assertTrue(any(line.startswith(said) for line in other.lines), other.output())
        self.assertFalse(any(line.startswith("s> init server") for line in other.lines))
        self.assertNotEqual(code, 0)  # a service manager sees the failure


class Persistence(TestCase):
    @defer.inlineCallbacks
    def test_kill_9_then_restart(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        ix = yield start_indexer(self, cwd=cwd)
        peer = live_port(self)  # alice's peer still answers after the restart
        codes = yield ix.codes(
            ("REGISTER", "alice"),
            ("REGISTER", "bob"),
            ("REGISTER", "gone"),
            ("UNREGISTER", "gone"),
            ("CONNECT", "alice", peer),
            ("PUBLISH", "alice", "a.txt", "kept"),
            ("PUBLISH", "alice", "b.txt", "deleted"),
            ("DELETE", "alice", "b.txt"),
            ("CONNECT", "bob", 6000),
            ("PUBLISH", "bob", "x", "bob's"),
            ("DISCONNECT", "bob"),
        )
        self.assertEqual(codes, [0] * 11)
        yield ix.process.kill()
        self.assertTrue(ix.process.exited)

        ix = yield start_indexer(self, cwd=cwd)
        users = yield ix.request("LIST_USERS", "alice")
        self.assertEqual(users, b"\0" + wire.encode_fields(1, "alice", "127.0.0.1", peer))
        content = yield ix.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(content, b"\0" + wire.encode_fields(1, "a.txt", "kept"))
        content = yield ix.request("LIST_CONTENT", "alice", "bob")
        self.assertEqual(content, b"\0" + wire.encode_fields(1, "x", "bob's"))
        codes = yield ix.codes(
            ("REGISTER", "gone"), ("CONNECT", "alice", 1), ("CONNECT", "bob", 6000)
        )
        self.assertEqual(codes, [0, 2, 0])


class Audit(TestCase):
    @defer.inlineCallbacks
    def test_outbox_filled_while_logger_is_down(self):
        """With a logger configured, each request leaves one record, even while it is down."""
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        dead = f"tcp:host=127.0.0.1:port={hold_port(self)}"  # refuses connections
        ix = yield start_indexer(self, "--logger", dead, cwd=cwd)
        codes = yield ix.codes(
            ("REGISTER", "alice"), ("REGISTER", "alice"), ("CONNECT", "alice", 5000)
        )
        codes += yield ix.codes(("PUBLISH", "alice", "f.txt", "d"), ("LIST_USERS", "alice"))
        self.assertEqual(codes, [0, 1, 0, 0, 0])
        yield ix.process.kill()
        store = Store(str(cwd / "ix.db"))
        self.addCleanup(store.close)
        self.assertEqual(
            [record for _, record in store.outbox_pending(0, 100)],
            [
                f"alice REGISTER {DT}",
                f"alice REGISTER {DT}",
                f"alice CONNECT {DT}",
                f"alice PUBLISH f.txt {DT}",
                f"alice LIST_USERS {DT}",
            ],
        )

    @defer.inlineCallbacks
    def test_no_outbox_without_logger(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        ix = yield start_indexer(self, cwd=cwd)
        yield ix.codes(("REGISTER", "alice"))
        yield ix.process.stop()
        store = Store(str(cwd / "ix.db"))
        self.addCleanup(store.close)
        self.assertEqual(store.outbox_count(), 0)
        self.assertEqual([name for name, _, _ in store.iter_users()], ["alice"])


class PersistenceUnderLoad(TestCase):
    @defer.inlineCallbacks
    def test_every_acknowledged_register_survives_kill_9(self):
        cwd = Path(self.mktemp())
        cwd.mkdir(parents=True)
        # 200 clients at once, all on 127.0.0.1: more than one address may hold by default
        ix = yield start_indexer(self, "--max-per-source", "200", cwd=cwd)
        names = [f"u{i}" for i in range(200)]
        replies = yield defer.gatherResults([ix.request("REGISTER", n) for n in names])
        acknowledged = [n for n, r in zip(names, replies, strict=True) if r == b"\0"]
        self.assertEqual(acknowledged, names)
        yield ix.process.kill()  # at once after the last reply
        ix = yield start_indexer(self, cwd=cwd)
        again = yield ix.codes(*(("REGISTER", n) for n in acknowledged))
        self.assertEqual(again, [1] * len(acknowledged))


class BadInput(TestCase):
    """Each bad input: refused as protocol.md says, others served, state unchanged."""

    @defer.inlineCallbacks
    def setUp(self):
        self.ix = yield start_indexer(self, "--timeout", "0.5", "--max-connections", "8")
        codes = yield self.ix.codes(
            ("REGISTER", "alice"), ("CONNECT", "alice", 5000), ("PUBLISH", "alice", "a", "d")
        )
        self.assertEqual(codes, [0, 0, 0])
        self.users = yield self.ix.request("LIST_USERS", "alice")
        self.content = yield self.ix.request("LIST_CONTENT", "alice", "alice")

    @defer.inlineCallbacks
    def assert_unchanged_and_serving(self):
        """A well-behaved client is served, and the listings are as before."""
        users = yield self.ix.request("LIST_USERS", "alice")
        self.assertEqual(users, self.users)
        content = yield self.ix.request("LIST_CONTENT", "alice", "alice")
        self.assertEqual(content, self.content)

    @defer.inlineCallbacks
    def test_oversized_field(self):
        bad = yield self.ix.open()
        bad.transport.write(wire.encode_fields("PUBLISH", DT, "alice") + b"f" * 300)
        yield self.assert_unchanged_and_serving()
        reply = yield deadline(bad.closed, 5)
        self.assertEqual(reply, bytes([wire.PUBLISH.error]))
        yield self.assert_unchanged_and_serving()

    @defer.inlineCallbacks
    def test_huge_flood_of_bytes(self):
        reply = yield self.ix.send(wire.encode_fields("REGISTER", DT) + b"u" * 1_000_000)
        self.assertEqual(reply, bytes([wire.REGISTER.error]))
        yield self.assert_unchanged_and_serving()

    @defer.inlineCallbacks
    def test_truncated_then_silent(self):
        bad = yield self.ix.open()
        bad.transport.write(wire.encode_fields("PUBLISH", DT, "alice", "newfile") + b"half")
        yield self.assert_unchanged_and_serving()
        reply = yield deadline(bad.closed, 4)  # cut after the 0.5 s timeout, not much later
        self.assertEqual(reply, b"")  # no reply
        yield self.assert_unchanged_and_serving()

    @defer.inlineCallbacks
    def test_not_utf8(self):
        reply = yield self.ix.send(wire.encode_fields("REGISTER", DT) + b"\xff\xfeuser\0")
        self.assertEqual(reply, bytes([wire.REGISTER.error]))
        reply = yield self.ix.send(wire.encode_fields("PUBLISH", DT, "alice", "f") + b"\xc3\x28\0")
        self.assertEqual(reply, bytes([wire.PUBLISH.error]))
        yield self.assert_unchanged_and_serving()

    @defer.inlineCallbacks
    def test_empty_names(self):
        codes = yield self.ix.codes(
            ("REGISTER", ""),
            ("PUBLISH", "alice", "", "d"),
            ("DELETE", "alice", ""),
            ("LIST_CONTENT", "alice", ""),
        )
        self.assertEqual(codes, [2, 4, 4, 4])
        yield self.assert_unchanged_and_serving()

    @defer.inlineCallbacks
    def test_unknown_op(self):
        reply = yield self.ix.send(wire.encode_request("SHUTDOWN", DT, "alice"))
        self.assertEqual(reply, b"")
        reply = yield self.ix.send(b"X" * 100)
        self.assertEqual(reply, b"")
        yield self.assert_unchanged_and_serving()

    @defer.inlineCallbacks
    def test_connection_flood(self):
        good = yield self.ix.open()  # an existing client, connected before the flood
        flood = []
        for _ in range(30):
            client = yield self.ix.open()
            flood.append(client)
        # beyond the cap (8), new connections are closed at once, without a byte
        yield deadline(defer.DeferredList([c.closed for c in flood[-5:]]), 5)
        self.assertEqual([c.data for c in flood[-5:]], [b""] * 5)
        good.transport.write(wire.encode_request("LIST_CONTENT", DT, "alice", "alice"))
        reply = yield deadline(good.closed, 5)
        self.assertEqual(reply, self.content)
        # the idle ones time out (0.5 s), then everyone is served again
        yield deadline(defer.DeferredList([c.closed for c in flood]), 10)
        yield self.assert_unchanged_and_serving()
