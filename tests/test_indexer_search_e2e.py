"""End-to-end: PUBLISH_FILE, LIST_FILES and SEARCH against a real ``twistd p2p-indexer``
(protocol.md section 8), hostile queries included, and the index across a restart."""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.test_indexer_e2e import live_port, start_indexer
from tests.test_indexer_search import rows

H1 = hashlib.sha256(b"hello world\n").hexdigest()
H2 = hashlib.sha256(b"other\n").hexdigest()

#: FTS5 query syntax, and other things a query string could try to smuggle in.
HOSTILE = [
    '"',
    '"""',
    "*",
    "cuna*",
    "NEAR(",
    "NEAR(cancion cuna, 1)",
    "cancion OR bob",
    "OR",
    "-cancion",
    "NOT cancion",
    "name:cancion",
    "{name description}:cuna",
    "^cancion",
    ":",
    "(",
    ")",
    "cancion AND (",
    "'; DROP TABLE files; --",
    "\\",
    "\t",
]


class SearchOverTheWire(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir(parents=True)
        self.ix = yield start_indexer(self, cwd=self.cwd)
        self.peers = {}
        for user in ("alice", "bob", "carol"):
            code = yield self.code("REGISTER", user)
            self.assertEqual(code, 0)
            self.peers[user] = live_port(self)  # a peer that answers the probe of a CONNECT
            code = yield self.code("CONNECT", user, self.peers[user])
            self.assertEqual(code, 0)

    @defer.inlineCallbacks
    def code(self, op: str, user: str, *args):
        reply = yield self.ix.request(op, user, *args)
        return reply[0] if reply else None

    @defer.inlineCallbacks
    def search(self, words: str, user: str = "bob", limit: int = 100):
        reply = yield self.ix.request("SEARCH", user, words, limit)
        return rows(reply, 6)

    @defer.inlineCallbacks
    def test_publish_list_search(self):
        for user, name, description, size, sha in [
            ("alice", "canción_de_cuna.txt", "nana para dormir", 12, H1),
            ("carol", "cuna.txt", "la misma nana", 12, H1),
            ("alice", "otra.mp3", "una canción más", 99, H2),
        ]:
            code = yield self.code("PUBLISH_FILE", user, name, description, size, sha, "new")
            self.assertEqual(code, 0)
        code = yield self.code("PUBLISH", "bob", "notes.txt", "no hash here")
        self.assertEqual(code, 0)
        code = yield self.code("PUBLISH_FILE", "alice", "otra.mp3", "d", 1, H2, "new")
        self.assertEqual(code, 3)
        code = yield self.code("PUBLISH_FILE", "alice", "otra.mp3", "d", -1, H2, "replace")
        self.assertEqual(code, 4)

        reply = yield self.ix.request("LIST_FILES", "bob", "alice")
        self.assertEqual(
            rows(reply, 4),
            [
                ("canción_de_cuna.txt", "nana para dormir", "12", H1),
                ("otra.mp3", "una canción más", "99", H2),
            ],
        )
        reply = yield self.ix.request("LIST_FILES", "alice", "bob")
        self.assertEqual(rows(reply, 4), [("notes.txt", "no hash here", "-", "-")])
        reply = yield self.ix.request("LIST_CONTENT", "bob", "alice")  # classic, unchanged
        self.assertEqual(
            reply,
            b"\x002\x00canci\xc3\xb3n_de_cuna.txt\x00nana para dormir"
            b"\x00otra.mp3\x00una canci\xc3\xb3n m\xc3\xa1s\x00",
        )

        hits = yield self.search("cancion cun")
        self.assertEqual(
            hits, [("alice", "canción_de_cuna.txt", "nana para dormir", "12", H1, "2")]
        )
        hits = yield self.search("CANCIÓN")
        self.assertEqual(
            [h[:2] for h in hits], [("alice", "canción_de_cuna.txt"), ("alice", "otra.mp3")]
        )
        code = yield self.code("SEARCH", "bob", '"*^', 100)
        self.assertEqual(code, 3)
        code = yield self.code("SEARCH", "bob", "cuna", 0)
        self.assertEqual(code, 3)
        code = yield self.code("SEARCH", "dave", "cuna", 10)
        self.assertEqual(code, 1)

        # An owner who leaves takes its files out of the results.
        code = yield self.code("DISCONNECT", "carol")
        self.assertEqual(code, 0)
        hits = yield self.search("nana")
        self.assertEqual(
            hits, [("alice", "canción_de_cuna.txt", "nana para dormir", "12", H1, "1")]
        )
        code = yield self.code("SEARCH", "carol", "nana", 10)
        self.assertEqual(code, 2)

    @defer.inlineCallbacks
    def test_hostile_queries(self):
        """FTS5 syntax neither errors the service nor changes what others find."""
        code = yield self.code(
            "PUBLISH_FILE", "alice", "canción_de_cuna.txt", "nana", 12, H1, "new"
        )
        self.assertEqual(code, 0)
        code = yield self.code("PUBLISH", "carol", "other.txt", "NEAR OR words")
        self.assertEqual(code, 0)
        before = yield self.search("cancion")
        self.assertEqual(len(before), 1)
        for hostile in HOSTILE:
            reply = yield self.ix.request("SEARCH", "carol", hostile, 100)
            self.assertIn(reply[:1], (b"\0", b"\3"), hostile)  # an answer, never a close
            if reply[:1] == b"\0":
                rows(reply, 6)  # well formed
            after = yield self.search("cancion")
            self.assertEqual(after, before, hostile)
        # The words of a hostile query are plain words: "OR" finds the file that says it.
        hits = yield self.search("near or")
        self.assertEqual([h[:2] for h in hits], [("carol", "other.txt")])
        hits = yield self.search('"; DROP TABLE files; --')
        self.assertEqual(hits, [])
        reply = yield self.ix.request("LIST_FILES", "bob", "alice")
        self.assertEqual(len(rows(reply, 4)), 1)

    @defer.inlineCallbacks
    def test_index_survives_a_restart(self):
        code = yield self.code("PUBLISH_FILE", "alice", "kept.txt", "across restarts", 5, H2, "new")
        self.assertEqual(code, 0)
        code = yield self.code("PUBLISH", "alice", "gone.txt", "across restarts")
        self.assertEqual(code, 0)
        code = yield self.code("DELETE", "alice", "gone.txt")
        self.assertEqual(code, 0)
        yield self.ix.process.stop()
        self.ix = yield start_indexer(self, cwd=self.cwd)
        hits = yield self.search("restarts")
        self.assertEqual(hits, [("alice", "kept.txt", "across restarts", "5", H2, "1")])
        reply = yield self.ix.request("LIST_FILES", "bob", "alice")
        self.assertEqual(rows(reply, 4), [("kept.txt", "across restarts", "5", H2)])


class SourcesOverTheWire(TestCase):
    """SOURCES (protocol.md 8.6) from a real indexer: owner order, the asker left out,
    offline owners and deleted files hidden, at most 64 rows."""

    @defer.inlineCallbacks
    def test_listing_rules(self):
        ix = yield start_indexer(self)
        owners = [f"o{i:02d}" for i in range(70)]
        for user in ["asker", "zoff", *reversed(owners)]:
            codes = yield ix.codes(
                ("REGISTER", user),
                ("CONNECT", user, 5000),
                ("PUBLISH_FILE", user, f"{user}.txt", "same bytes", 5, H1, "new"),
            )
            self.assertEqual(codes, [0, 0, 0])
        codes = yield ix.codes(("DISCONNECT", "zoff"), ("DELETE", "o00", "o00.txt"))
        self.assertEqual(codes, [0, 0])
        reply = yield ix.request("SOURCES", "asker", H1)
        expected = [(user, f"{user}.txt", "127.0.0.1", "5000") for user in owners[1:65]]
        self.assertEqual(rows(reply, 4), expected)
        reply = yield ix.request("SOURCES", "asker", H2)
        self.assertEqual(rows(reply, 4), [])
