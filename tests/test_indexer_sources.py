"""SOURCES (protocol.md 8.6) over in-memory transports: every code, the listing (owner
order, the asking user left out, offline owners hidden, at most 64), the policies and
the audit record; and the client's side (``ask_sources``) against it."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client.indexer_client import (
    IndexerClient,
    Source,
    SourcesRefused,
    UnknownOperation,
    _ReplyParser,
    ask_sources,
    reply_shape,
)
from p2p.indexer.directory import Directory
from tests import test_indexer_search
from tests.support import deadline
from tests.test_indexer_protocol import DT, Harness
from tests.test_indexer_search import H1, H2, KEY, rows


class Sources(TestCase):
    """alice (5000), bob (5001), dave (5003) connected; carol offline."""

    harness = Harness

    def setUp(self) -> None:
        self.h = self.harness(self)
        self.h.given(
            ("REGISTER", "alice"),
            ("REGISTER", "bob"),
            ("REGISTER", "carol"),
            ("REGISTER", "dave"),
            ("CONNECT", "alice", 5000),
            ("CONNECT", "bob", 5001),
            ("CONNECT", "carol", 5002),
            ("CONNECT", "dave", 5003),
        )

    def publish(self, user: str, name: str, sha: str = H1) -> None:
        reply = self.h.request("PUBLISH_FILE", user, name, "same bytes", 12, sha, "new")
        self.assertEqual(reply, b"\0")

    def sources(self, user: str = "bob", sha: str = H1) -> list[tuple[str, ...]]:
        return rows(self.h.request("SOURCES", user, sha), 4)

    def test_exact_bytes(self) -> None:
        """The example of protocol.md 8.6, byte for byte."""
        self.publish("dave", "cuna.txt")
        self.publish("alice", "canci\u00f3n_de_cuna.txt")
        self.publish("bob", "mine.txt")
        reply = self.h.request("SOURCES", "bob", H1)
        self.assertEqual(
            reply,
            b"\x002\x00alice\x00canci\xc3\xb3n_de_cuna.txt\x00127.0.0.1\x005000\x00"
            b"dave\x00cuna.txt\x00127.0.0.1\x005003\x00",
        )

    def test_order_by_owner_then_name_in_code_points(self) -> None:
        for user, name in [
            ("dave", "b"),
            ("alice", "z"),
            ("dave", "a"),
            ("alice", "\u00e9"),
            ("alice", "Z"),
        ]:
            self.publish(user, name)
        self.assertEqual(
            [(r[0], r[1]) for r in self.sources()],
            [("alice", "Z"), ("alice", "z"), ("alice", "\u00e9"), ("dave", "a"), ("dave", "b")],
        )

    def test_asking_user_left_out_and_other_content_too(self) -> None:
        self.publish("bob", "one")
        self.publish("bob", "two")
        self.publish("alice", "other", sha=H2)
        self.assertEqual(self.sources("bob"), [])
        self.assertEqual(
            self.sources("alice"),
            [("bob", "one", "127.0.0.1", "5001"), ("bob", "two", "127.0.0.1", "5001")],
        )

    def test_offline_owners_hidden_and_back_when_connected(self) -> None:
        self.publish("carol", "c.txt")
        self.publish("dave", "d.txt")
        self.assertEqual(self.h.request("DISCONNECT", "carol"), b"\0")
        self.assertEqual([r[0] for r in self.sources()], ["dave"])
        self.assertEqual(self.h.request("CONNECT", "carol", 6000), b"\0")
        self.assertEqual(
            self.sources(),
            [("carol", "c.txt", "127.0.0.1", "6000"), ("dave", "d.txt", "127.0.0.1", "5003")],
        )

    def test_a_deleted_file_is_no_source(self) -> None:
        self.publish("dave", "d.txt")
        self.assertEqual(self.h.request("DELETE", "dave", "d.txt"), b"\0")
        self.assertEqual(self.sources(), [])

    def test_files_published_without_a_hash_are_never_sources(self) -> None:
        self.assertEqual(self.h.request("PUBLISH", "dave", "d.txt", "classic"), b"\0")
        self.assertEqual(self.sources(), [])

    def test_at_most_64(self) -> None:
        for i in range(70):
            self.publish("dave", f"copy{i:03d}")
        found = self.sources()
        self.assertEqual(len(found), wire.MAX_SOURCES)
        self.assertEqual(found[-1][1], "copy063")

    def test_at_most_64_after_leaving_the_asker_out(self) -> None:
        """The asker's own copies do not eat into the 64."""
        for i in range(70):
            self.publish("alice", f"a{i:03d}")
        self.publish("dave", "d.txt")
        found = self.sources("alice")
        self.assertEqual(len(found), 1)
        self.assertEqual(len(self.sources("dave")), 64)

    def test_codes(self) -> None:
        self.assertEqual(self.h.request("SOURCES", "nobody", H1), b"\x01")
        self.assertEqual(self.h.request("DISCONNECT", "carol"), b"\0")
        self.assertEqual(self.h.request("SOURCES", "carol", H1), b"\x02")
        for bad in (H1.upper(), H1[:-1], H1 + "0", "g" * 64, "-"):
            with self.subTest(bad=bad):
                self.assertEqual(self.h.request("SOURCES", "bob", bad), b"\x03")
        # An empty hash field is refused as soon as it arrives, as every bad field.
        reply, _ = self.h.send(b"SOURCES\0" + DT.encode() + b"\0bob\0\0")
        self.assertEqual(reply, b"\x03")

    def test_operator_line(self) -> None:
        self.h.lines.clear()
        self.sources()
        self.assertEqual(self.h.lines, ["s> SOURCES FROM bob"])


class Policies(TestCase):
    """Claimed names, --classic read-only and the audit hold for SOURCES as for SEARCH."""

    def directory(self, classic: str = "allow") -> Directory:
        """SEARCH's policy fixture (alice claimed, bob unclaimed, both connected), and
        bob's file published with a hash."""
        directory = test_indexer_search.Policies.directory(self, classic)
        directory.store.publish_file("bob", "b.txt", "bob's", 12, H1)
        directory.store.commit()
        return directory

    def handle(self, directory: Directory, user: str, identity=None):
        return directory.handle(wire.SOURCES, DT, user, [H1], None, identity)

    def test_claimed_name_without_its_key(self) -> None:
        d = self.directory()
        for identity in (None, "cd" * 32):
            self.assertEqual(self.handle(d, "alice", identity), (3, b""))
        code, body = self.handle(d, "alice", KEY)
        self.assertEqual(rows(b"\0" + body, 4), [("bob", "b.txt", "127.0.0.1", "5001")])
        self.assertEqual(code, 0)

    def test_served_read_only(self) -> None:
        d = self.directory("read-only")
        code, body = self.handle(d, "bob")
        self.assertEqual((code, body), (0, b"0\0"))

    def test_audited_as_search_is(self) -> None:
        d = self.directory()
        self.handle(d, "bob")
        records = [r for (r,) in d.store.db.execute("SELECT record FROM outbox ORDER BY seq")]
        self.assertEqual(records, [f"bob SOURCES {DT}"])

    def test_store_uses_the_hash_index(self) -> None:
        """Store.sources looks the hash up in its index, whatever else it reads."""
        d = self.directory()
        db = d.store.db
        ran: list[str] = []
        db.set_trace_callback(ran.append)
        self.addCleanup(db.set_trace_callback, None)
        self.assertEqual(d.store.sources(H1, 64, exclude="alice"), [("bob", "b.txt")])
        db.set_trace_callback(None)
        [query] = [q for q in ran if q.lstrip().upper().startswith("SELECT")]
        plan = " ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + query))
        self.assertIn("files_sha256", plan)


class _FakeIndexer:
    """Answers ``request`` with what the Directory of a Harness answers."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.asked: list[tuple] = []

    def request(self, op: str, user: str, *args):
        self.asked.append((op, user, *args))
        parser = _ReplyParser(*reply_shape(op))
        return defer.succeed(parser.feed(self.reply))


class ClientSide(TestCase):
    def test_rows_become_sources(self) -> None:
        reply = (
            b"\x002\x00alice\x00a b.txt\x00127.0.0.1\x005000\x00"
            b"dave\x00d.txt\x00::1\x00notaport\x00"
        )
        indexer = _FakeIndexer(reply)
        found = self.successResultOf(ask_sources(indexer, "bob", H1))
        self.assertEqual(found, [Source("alice", "a b.txt", "127.0.0.1", 5000)])
        self.assertEqual(indexer.asked, [("SOURCES", "bob", H1)])

    def test_an_error_code_fails(self) -> None:
        failure = self.failureResultOf(ask_sources(_FakeIndexer(b"\x02"), "bob", H1))
        failure.trap(SourcesRefused)
        self.assertEqual(failure.value.code, 2)

    @defer.inlineCallbacks
    def test_a_classic_indexer_is_unknown_operation(self):
        """A classic indexer closes on SOURCES without a reply byte: UnknownOperation,
        and it is not asked again in the session."""
        seen: list[bytes] = []

        class Classic(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                seen.append(data)
                self.transport.loseConnection()

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Classic), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = IndexerClient(
            "127.0.0.1", port.getHost().port, lambda: defer.succeed(DT), use_tls=False
        )
        self.addCleanup(client.close)
        with self.assertRaises(UnknownOperation):
            yield deadline(ask_sources(client, "bob", H1))
        with self.assertRaises(UnknownOperation):
            yield ask_sources(client, "bob", H1)
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0].startswith(b"SOURCES\0"))
