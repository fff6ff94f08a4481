"""PUBLISH_FILE, LIST_FILES and SEARCH (protocol.md section 8) over in-memory transports:
every code and error path, the search semantics, and the schema upgrade of an older
database."""

from __future__ import annotations

import hashlib
import sqlite3

from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.indexer import store as store_module
from p2p.indexer.directory import Directory
from p2p.indexer.fulltext import fts5_match, query_words
from p2p.indexer.store import Store
from tests.test_indexer_protocol import DT, Harness

H1 = hashlib.sha256(b"hello world\n").hexdigest()
H2 = hashlib.sha256(b"other bytes\n").hexdigest()
H3 = hashlib.sha256(b"third\n").hexdigest()
KEY = "ab" * 32  # a client certificate's fingerprint


def rows(reply: bytes, width: int) -> list[tuple[str, ...]]:
    """The rows of a listing reply (code 0, count, then ``width`` fields per row)."""
    assert reply[:1] == b"\0", reply
    fields = reply[1:].split(b"\0")
    assert fields.pop() == b"", reply
    count = int(fields[0])
    assert len(fields) == 1 + width * count, reply
    values = [f.decode() for f in fields[1:]]
    return [tuple(values[i : i + width]) for i in range(0, len(values), width)]


class Base(TestCase):
    """alice, bob and dave connected; carol registered, offline."""

    audit = False

    def setUp(self) -> None:
        self.h = Harness(self, audit=self.audit)
        self.h.given(
            ("REGISTER", "alice"),
            ("REGISTER", "bob"),
            ("REGISTER", "carol"),
            ("REGISTER", "dave"),
            ("CONNECT", "alice", 5000),
            ("CONNECT", "bob", 5001),
            ("CONNECT", "dave", 5003),
        )

    def req(self, op: str, user: str, *args) -> bytes:
        return self.h.request(op, user, *args)

    def publish(self, user: str, name: str, description: str, size=12, sha=H1, mode="new"):
        return self.req("PUBLISH_FILE", user, name, description, size, sha, mode)

    def search(self, words: str, user: str = "bob", limit: int = 100) -> list[tuple[str, ...]]:
        return rows(self.req("SEARCH", user, words, limit), 6)

    def found(self, words: str, **kwargs) -> list[tuple[str, str]]:
        """(owner, file) of each hit, in order."""
        return [(r[0], r[1]) for r in self.search(words, **kwargs)]

    def snapshot(self) -> tuple:
        db = self.h.store.db
        return (
            {n: (r.address, dict(r.files)) for n, r in self.h.directory.users.items()},
            tuple(
                db.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                for t in ("users", "files", "online", "files_fts")
            ),
        )


class PublishFile(Base):
    def test_exact_bytes(self) -> None:
        """The example of protocol.md 8.1 and 8.2, byte for byte."""
        request = (
            b"PUBLISH_FILE\x0017/12/2014 13:20:35\x00alice\x00canci\xc3\xb3n_de_cuna.txt\x00"
            b"nana para dormir\x0012\x00" + H1.encode() + b"\x00new\x00"
        )
        self.assertEqual(self.h.send(request)[0], b"\x00")
        self.assertEqual(self.h.send(request)[0], b"\x03")
        self.assertEqual(self.req("PUBLISH", "alice", "notes.txt", "my notes"), b"\0")
        self.assertEqual(
            self.req("LIST_FILES", "bob", "alice"),
            b"\x002\x00canci\xc3\xb3n_de_cuna.txt\x00nana para dormir\x0012\x00"
            + H1.encode()
            + b"\x00notes.txt\x00my notes\x00-\x00-\x00",
        )

    def test_codes(self) -> None:
        self.assertEqual(self.publish("nobody", "f", "d"), b"\1")
        self.assertEqual(self.publish("carol", "f", "d"), b"\2")
        self.assertEqual(self.publish("alice", "f", "d"), b"\0")
        self.assertEqual(self.publish("alice", "f", "d"), b"\3")
        self.assertEqual(self.req("PUBLISH", "alice", "f", "d"), b"\3")  # however published
        self.assertEqual(self.publish("bob", "f", "d"), b"\0")  # names are per user

    def test_bad_fields_change_nothing(self) -> None:
        self.assertEqual(self.publish("alice", "keep.txt", "d"), b"\0")
        before = self.snapshot()
        bad = [
            ("f", "d", -1, H1, "new"),
            ("f", "d", "+1", H1, "new"),
            ("f", "d", "1.0", H1, "new"),
            ("f", "d", 2**63, H1, "new"),
            ("f", "d", "1" * 21, H1, "new"),
            ("f", "d", "", H1, "new"),
            ("f", "d", 12, H1.upper(), "new"),
            ("f", "d", 12, H1[:-1], "new"),
            ("f", "d", 12, "g" * 64, "new"),
            ("f", "d", 12, "-", "new"),
            ("f", "d", 12, H1, "NEW"),
            ("f", "d", 12, H1, "add"),
            ("f", "d", 12, H1, ""),
            ("two\twords", "d", 12, H1, "new"),
            ("f", "", 12, H1, "new"),
            ("keep.txt", "d", -1, H1, "replace"),
        ]
        for args in bad:
            self.assertEqual(self.req("PUBLISH_FILE", "alice", *args), b"\4", args)
            self.assertEqual(self.req("PUBLISH_FILE", "nobody", *args), b"\4", args)
        self.assertEqual(self.snapshot(), before)

    def test_size_limits(self) -> None:
        self.assertEqual(self.publish("alice", "empty", "d", size=0), b"\0")
        self.assertEqual(self.publish("alice", "huge", "d", size=2**63 - 1), b"\0")
        listed = {r[0]: r[2] for r in rows(self.req("LIST_FILES", "bob", "alice"), 4)}
        self.assertEqual(listed, {"empty": "0", "huge": str(2**63 - 1)})

    def test_replace_updates_in_place(self) -> None:
        self.assertEqual(self.req("PUBLISH", "alice", "a.txt", "first"), b"\0")
        self.assertEqual(self.publish("alice", "b.txt", "second", size=1, sha=H2), b"\0")
        self.assertEqual(self.req("PUBLISH", "alice", "c.txt", "third"), b"\0")
        content = self.req("LIST_CONTENT", "bob", "alice")  # cached now
        self.assertEqual(
            self.publish("alice", "a.txt", "first, again", size=5, sha=H3, mode="replace"), b"\0"
        )
        self.assertEqual(
            self.publish("alice", "d.txt", "new one", size=7, sha=H1, mode="replace"), b"\0"
        )
        self.assertEqual(
            rows(self.req("LIST_FILES", "bob", "alice"), 4),
            [
                ("a.txt", "first, again", "5", H3),
                ("b.txt", "second", "1", H2),
                ("c.txt", "third", "-", "-"),
                ("d.txt", "new one", "7", H1),
            ],
        )
        # LIST_CONTENT is the classic listing, its cache dropped by the change.
        self.assertNotEqual(self.req("LIST_CONTENT", "bob", "alice"), content)
        self.assertEqual(
            rows(self.req("LIST_CONTENT", "bob", "alice"), 2),
            [
                ("a.txt", "first, again"),
                ("b.txt", "second"),
                ("c.txt", "third"),
                ("d.txt", "new one"),
            ],
        )
        # The search index follows: the old description is gone, the new one found.
        self.assertEqual(self.found("again"), [("alice", "a.txt")])
        self.assertEqual(self.found("first"), [("alice", "a.txt")])
        self.assertEqual(self.publish("alice", "a.txt", "renamed", mode="replace"), b"\0")
        self.assertEqual(self.found("again"), [])
        self.assertEqual(self.found("renamed"), [("alice", "a.txt")])

    def test_survives_reload(self) -> None:
        self.assertEqual(self.publish("alice", "a.txt", "kept", size=3, sha=H2), b"\0")
        self.h.store.commit()
        self.h.directory.load()
        self.assertEqual(
            rows(self.req("LIST_FILES", "bob", "alice"), 4), [("a.txt", "kept", "3", H2)]
        )
        self.assertEqual(self.found("kept"), [("alice", "a.txt")])


class ListFiles(Base):
    def test_codes(self) -> None:
        self.assertEqual(self.req("LIST_FILES", "nobody", "alice"), b"\1")
        self.assertEqual(self.req("LIST_FILES", "carol", "alice"), b"\2")
        self.assertEqual(self.req("LIST_FILES", "bob", "nobody"), b"\3")
        self.assertEqual(self.req("LIST_FILES", "bob", "two words"), b"\4")
        self.assertEqual(self.req("LIST_FILES", "bob", ""), b"\4")
        self.assertEqual(self.req("LIST_FILES", "bob", "carol"), b"\x000\x00")  # offline: listed

    def test_cache_follows_every_change(self) -> None:
        self.assertEqual(self.publish("alice", "a.txt", "d", size=1), b"\0")
        first = self.req("LIST_FILES", "bob", "alice")
        self.assertIs(
            self.h.directory._file_listings["alice"], self.h.directory._file_listings["alice"]
        )
        self.assertEqual(self.req("LIST_FILES", "dave", "alice"), first)
        for change in (
            ("PUBLISH_FILE", "alice", "a.txt", "d", 2, H1, "replace"),
            ("PUBLISH", "alice", "b.txt", "d"),
            ("DELETE", "alice", "a.txt"),
        ):
            before = self.req("LIST_FILES", "bob", "alice")
            self.assertEqual(self.req(*change), b"\0")
            self.assertNotEqual(self.req("LIST_FILES", "bob", "alice"), before, change)
        self.assertEqual(
            rows(self.req("LIST_FILES", "bob", "alice"), 4), [("b.txt", "d", "-", "-")]
        )
        self.assertEqual(self.req("DISCONNECT", "alice"), b"\0")
        self.assertEqual(self.req("UNREGISTER", "alice"), b"\0")
        self.assertEqual(self.req("LIST_FILES", "bob", "alice"), b"\3")


class SearchCodes(Base):
    def test_codes(self) -> None:
        self.assertEqual(self.publish("alice", "a.txt", "d"), b"\0")
        self.assertEqual(self.req("SEARCH", "nobody", "a", 10), b"\1")
        self.assertEqual(self.req("SEARCH", "carol", "a", 10), b"\2")
        self.assertEqual(self.req("SEARCH", "bob", "a", 10)[:1], b"\0")
        self.assertEqual(self.req("SEARCH", "bob", "zzz", 10), b"\x000\x00")

    def test_bad_queries_and_limits(self) -> None:
        """3 for bob; for a user that does not exist, 3 too when a field is bad (refused
        as it arrives), but 1 for a query without a word (the operation's own check comes
        after the user's)."""
        for words, limit, nobody in [
            ("", 10, 3),  # empty: refused at the field
            ("w" * 257, 10, 3),
            ("a\nb", 10, 3),
            ('"*:^-', 10, 1),  # no word in it
            ("- - -", 10, 1),
            ("\t", 10, 1),
            ("a b c d e f g h i", 10, 1),  # nine different words: one too many
            ("a b c d e f g h i j k l m n o p q r s t u v w x y z" * 3, 10, 1),
            ("a", 0, 3),
            ("a", 1001, 3),
            ("a", "ten", 3),
            ("a", "", 3),
            ("a", "-1", 3),
            ("a", "01000", 3),
        ]:
            self.assertEqual(self.req("SEARCH", "bob", words, limit), b"\3", (words, limit))
            self.assertEqual(
                self.req("SEARCH", "nobody", words, limit), bytes([nobody]), (words, limit)
            )

    def test_exact_bytes(self) -> None:
        """The example of protocol.md 8.3."""
        self.assertEqual(self.publish("alice", "canción_de_cuna.txt", "nana para dormir"), b"\0")
        self.assertEqual(self.publish("dave", "cuna.txt", "la misma", sha=H1), b"\0")
        reply = self.h.send(b"SEARCH\x0017/12/2014 13:20:35\x00bob\x00cancion cun\x00100\x00")[0]
        self.assertEqual(
            reply,
            b"\x001\x00alice\x00canci\xc3\xb3n_de_cuna.txt\x00nana para dormir\x0012\x00"
            + H1.encode()
            + b"\x002\x00",
        )


class SearchSemantics(Base):
    def setUp(self) -> None:
        super().setUp()
        for user, name, description, sha in [
            ("alice", "canción_de_cuna.txt", "Nana para dormir al bebé", H1),
            ("alice", "ÇA_VA.mp3", "une chanson française", H2),
            ("bob", "report.pdf", "quarterly numbers", H3),
            ("dave", "lullaby.txt", "the same bytes as alice's canción", H1),
        ]:
            self.assertEqual(self.publish(user, name, description, sha=sha), b"\0")
        self.assertEqual(self.req("PUBLISH", "dave", "plain.txt", "no hash canción"), b"\0")

    def test_accents_and_case(self) -> None:
        for words in ("cancion", "CANCIÓN", "Canción", "cancio\u0301n"):
            self.assertIn(("alice", "canción_de_cuna.txt"), self.found(words), words)
        self.assertEqual(self.found("ca va"), [("alice", "ÇA_VA.mp3")])
        self.assertEqual(self.found("francaise"), [("alice", "ÇA_VA.mp3")])
        self.assertEqual(self.found("BEBE"), [("alice", "canción_de_cuna.txt")])

    def test_prefixes(self) -> None:
        self.assertEqual(self.found("cun"), [("alice", "canción_de_cuna.txt")])
        self.assertEqual(self.found("una"), [])  # the start of a word, not its middle
        self.assertEqual(self.found("rep"), [("bob", "report.pdf")])
        self.assertEqual(self.found("q"), [("bob", "report.pdf")])

    def test_every_word_must_match(self) -> None:
        self.assertEqual(self.found("cancion dormir"), [("alice", "canción_de_cuna.txt")])
        self.assertEqual(self.found("cancion lullaby"), [("dave", "lullaby.txt")])
        self.assertEqual(self.found("cancion quarterly"), [])

    def test_only_connected_owners(self) -> None:
        self.assertIn(("alice", "canción_de_cuna.txt"), self.found("cancion"))
        self.assertEqual(self.req("DISCONNECT", "alice"), b"\0")
        self.assertNotIn("alice", [owner for owner, _ in self.found("cancion")])
        self.assertEqual(self.found("ca va"), [])
        self.assertEqual(self.req("CONNECT", "alice", 5000), b"\0")
        self.assertEqual(self.found("ca va"), [("alice", "ÇA_VA.mp3")])
        # A user dropped by liveness is gone from the results as well.
        self.h.factory.expire("alice")
        self.assertEqual(self.found("ca va"), [])

    def test_copies(self) -> None:
        copies = {(r[0], r[1]): r[5] for r in self.search("cancion")}
        self.assertEqual(copies[("alice", "canción_de_cuna.txt")], "2")  # alice and dave
        self.assertEqual(copies[("dave", "lullaby.txt")], "2")
        self.assertEqual(copies[("dave", "plain.txt")], "1")  # no hash: 1
        hit = next(r for r in self.search("plain") if r[1] == "plain.txt")
        self.assertEqual(hit[3:], ("-", "-", "1"))
        # the same user twice is one user; an offline one is not counted
        self.assertEqual(self.publish("alice", "copy.txt", "x", sha=H1), b"\0")
        self.assertEqual(self.search("lullaby")[0][5], "2")
        self.assertEqual(self.req("DISCONNECT", "dave"), b"\0")
        self.assertEqual(self.search("cuna")[0][5], "1")

    def test_name_ranks_above_description(self) -> None:
        self.assertEqual(self.publish("bob", "notes.txt", "about a lullaby I like"), b"\0")
        self.assertEqual(self.publish("alice", "zzz.txt", "one more lullaby"), b"\0")
        found = self.found("lullaby")
        self.assertEqual(found[0], ("dave", "lullaby.txt"))
        self.assertEqual(set(found[1:]), {("bob", "notes.txt"), ("alice", "zzz.txt")})

    def test_ties_by_owner_then_name(self) -> None:
        for user, name in [("dave", "b_tie.txt"), ("alice", "b_tie.txt"), ("alice", "a_tie.txt")]:
            self.assertEqual(self.publish(user, name, "same words"), b"\0")
        self.assertEqual(
            self.found("tie"),
            [("alice", "a_tie.txt"), ("alice", "b_tie.txt"), ("dave", "b_tie.txt")],
        )

    def test_eight_words(self) -> None:
        self.assertEqual(self.publish("bob", "a_b_c_d.txt", "e f g h"), b"\0")
        self.assertEqual(self.found("a b c d e f g h"), [("bob", "a_b_c_d.txt")])
        self.assertEqual(self.found("a b c d e f g h a b"), [("bob", "a_b_c_d.txt")])  # 8 distinct

    def test_words_hidden_in_one_word_are_capped_too(self) -> None:
        """A mark the tokenizer splits at (U+0305) makes one query word of many: the cap
        on the words of a search holds for those parts too, while a few of them are
        still searched as their parts."""
        parts = [f"{a}{b}" for a in "abcdefgh" for b in "xy"]  # 16 words
        self.assertEqual(self.publish("bob", "parts.txt", " ".join(parts)), b"\0")
        self.assertEqual(self.found("\u0305".join(parts[:3])), [("bob", "parts.txt")])
        self.assertEqual(self.found(" ".join(parts[:8])), [("bob", "parts.txt")])
        self.assertEqual(self.found("\u0305".join(parts)), [])  # 16 > 8: refused as no hit

    def test_limit(self) -> None:
        for i in range(12):
            self.assertEqual(self.publish("bob", f"many_{i:02d}.txt", "d"), b"\0")
        self.assertEqual(len(self.search("many", limit=5)), 5)
        self.assertEqual(len(self.search("many", limit=1)), 1)
        self.assertEqual(len(self.search("many", limit=1000)), 12)

    def test_deleted_files_are_not_found(self) -> None:
        self.assertEqual(self.req("DELETE", "bob", "report.pdf"), b"\0")
        self.assertEqual(self.found("report"), [])
        self.assertEqual(self.req("PUBLISH", "bob", "report.pdf", "again"), b"\0")
        self.assertEqual(self.found("report"), [("bob", "report.pdf")])

    def test_common_long_words(self) -> None:
        """A common word longer than the prefix indexes is looked for by its first
        letters and each file checked against the whole word; with too few found
        within the bound, FTS5 is asked for the whole word: the same hits either way."""
        for i in range(6):
            self.assertEqual(self.publish("bob", f"ragazo_{i}.txt", "x"), b"\0")
            self.assertEqual(self.publish("dave", f"ragtime_{i}.txt", "x"), b"\0")
        self.assertEqual(self.publish("alice", "old_raga.txt", "x"), b"\0")
        for i in range(6):  # newer files that share only the first letters
            self.assertEqual(self.publish("bob", f"rag_{i}.txt", "raga"[:3]), b"\0")
        plain = sorted(self.found("ragaz"))
        self.assertEqual(len(plain), 6)
        raga = sorted(self.found("raga"))
        self.assertEqual(raga, sorted([*plain, ("alice", "old_raga.txt")]))
        self.patch(store_module, "COMMON", 0)  # every word is common now
        self.assertEqual(sorted(self.found("ragaz")), plain)
        self.assertEqual(sorted(self.found("ragaz x")), plain)
        self.assertEqual(sorted(self.found("raga")), raga)
        self.assertEqual(self.found("ragt cuna"), [])
        self.patch(store_module, "PREFIX_SCAN", 3)  # the bound is reached with too few
        self.assertEqual(sorted(self.found("ragaz")), plain)
        self.assertEqual(len(self.search("ragaz", limit=2)), 2)

    def test_reused_id_is_indexed(self) -> None:
        """SQLite gives a new file the id of the newest one deleted: the index follows."""
        self.assertEqual(self.publish("bob", "newest.txt", "zebra"), b"\0")
        self.assertEqual(self.found("zebra"), [("bob", "newest.txt")])  # indexed now
        self.assertEqual(self.req("DELETE", "bob", "newest.txt"), b"\0")
        self.assertEqual(self.publish("bob", "again.txt", "yak"), b"\0")
        ids = [
            r[0] for r in self.h.store.db.execute("SELECT id FROM files WHERE name = 'again.txt'")
        ]
        self.assertEqual(self.found("zebra"), [])
        self.assertEqual(self.found("yak"), [("bob", "again.txt")])
        self.assertEqual(len(ids), 1)

    def test_index_waits_in_the_database(self) -> None:
        """Changes not yet in the index survive a close: the next search applies them."""
        store = Store(self.mktemp())
        store.open()
        store.add_user("u")
        store.set_address("u", ("10.0.0.1", 5000))
        for i in range(3):
            store.add_file("u", f"walrus_{i}.txt", "d")
        store.commit()
        store.search(["walrus"], 10)  # the three are indexed
        store.remove_file("u", "walrus_0.txt")
        store.publish_file("u", "walrus_1.txt", "now a narwhal", 1, H1)
        store.add_file("u", "walrus_3.txt", "d")
        store.commit()
        store.close()  # three changes wait in the database, none in the index
        store.open()
        self.addCleanup(store.close)
        self.assertEqual(
            sorted(h.name for h in store.search(["walrus"], 10)),
            ["walrus_1.txt", "walrus_2.txt", "walrus_3.txt"],
        )
        self.assertEqual([h.name for h in store.search(["narwhal"], 10)], ["walrus_1.txt"])
        self.assertEqual(store.search(["d", "walrus_0"], 10), [])

    def test_hostile_queries_are_words(self) -> None:
        """FTS5 syntax in a query means nothing: the same hits as its plain words."""
        plain = self.search("cancion")
        for hostile in (
            'cancion"',
            '"cancion',
            "cancion*",
            "cancion OR",
            "NEAR(cancion",
            "-cancion",
            "name:cancion",
            "^cancion",
            "cancion)",
            "cancion AND",
            "{name}:cancion",
            'cancion" OR "x',
        ):
            reply = self.req("SEARCH", "bob", hostile, 100)
            self.assertEqual(reply[:1], b"\0", hostile)
        self.assertEqual(self.search('cancion"*^:-()'), plain)
        for hostile in ("NOT", "OR", "AND", "NEAR"):  # words like any other: nothing matches
            self.assertEqual(self.search(hostile), [], hostile)
        self.assertEqual(self.search("cancion"), plain)  # nothing changed for others

    def test_query_building(self) -> None:
        self.assertEqual(query_words('a"b*c:d^e-f(g) h_i'), list("abcdefghi"))
        self.assertEqual(query_words("Café  café"), ["Café", "café"])
        self.assertEqual(query_words("x x"), ["x"])
        self.assertEqual(query_words(" -*\"' "), [])
        self.assertEqual(fts5_match(["a", 'b"c']), '"a"* "b""c"*')


class Policies(TestCase):
    """Claimed names and --classic read-only hold for the new operations."""

    def directory(self, classic: str = "allow") -> Directory:
        store = Store()
        store.open()
        self.addCleanup(store.close)
        store.add_user("alice", KEY)
        store.set_address("alice", ("127.0.0.1", 5000))
        store.add_user("bob")
        store.set_address("bob", ("127.0.0.1", 5001))
        store.add_file("alice", "a.txt", "alice's file")
        store.commit()
        directory = Directory(store, audit=True, classic=classic)
        directory.load()
        return directory

    def handle(self, directory: Directory, op: str, user: str, *args, identity=None):
        return directory.handle(wire.OPS[op], DT, user, list(args), None, identity)

    def test_claimed_name_from_a_wrong_key(self) -> None:
        d = self.directory()
        publish = ("a.txt", "x", 1, H1, "replace")
        for identity in (None, "cd" * 32):
            self.assertEqual(
                self.handle(d, "PUBLISH_FILE", "alice", *publish, identity=identity), (4, b"")
            )
            self.assertEqual(
                self.handle(d, "LIST_FILES", "alice", "bob", identity=identity), (4, b"")
            )
            self.assertEqual(
                self.handle(d, "SEARCH", "alice", "file", 10, identity=identity), (3, b"")
            )
        self.assertEqual(d.store.list_files("alice"), [("a.txt", "alice's file", None, None)])
        self.assertEqual(self.handle(d, "PUBLISH_FILE", "alice", *publish, identity=KEY), (0, b""))
        self.assertEqual(self.handle(d, "SEARCH", "alice", "x", 10, identity=KEY)[0], 0)

    def test_read_only(self) -> None:
        d = self.directory("read-only")
        self.assertEqual(self.handle(d, "PUBLISH_FILE", "bob", "b", "d", 1, H1, "new"), (4, b""))
        self.assertEqual(d.store.list_files("bob"), [])
        self.assertEqual(self.handle(d, "LIST_FILES", "bob", "alice")[0], 0)
        code, body = self.handle(d, "SEARCH", "bob", "alice", 10)
        self.assertEqual((code, rows(b"\0" + body, 6)[0][:2]), (0, ("alice", "a.txt")))

    def test_audit_records(self) -> None:
        d = self.directory()
        self.handle(d, "PUBLISH_FILE", "bob", "b.txt", "d", 1, H1, "new")
        self.handle(d, "LIST_FILES", "bob", "alice")
        self.handle(d, "SEARCH", "bob", "secret words", 10)
        records = [r for _, r in d.store.db.execute("SELECT seq, record FROM outbox ORDER BY seq")]
        self.assertEqual(
            records,
            [f"bob PUBLISH_FILE b.txt {DT}", f"bob LIST_FILES {DT}", f"bob SEARCH {DT}"],
        )


#: The schema of an indexer from before content identity and search.
OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE users (name TEXT PRIMARY KEY, ip TEXT, port INTEGER, identity TEXT);
CREATE TABLE files (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, name TEXT NOT NULL,
    description TEXT NOT NULL, UNIQUE (user, name)
);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL);
INSERT INTO users (name, ip, port) VALUES ('alice', '10.0.0.1', 5000), ('bob', NULL, NULL);
INSERT INTO files (user, name, description) VALUES
    ('alice', 'canción.txt', 'una nana'), ('bob', 'cancion_bob.txt', 'offline'),
    ('alice', 'b.txt', 'second');
"""


class Upgrade(TestCase):
    def test_old_database_is_upgraded_in_place(self) -> None:
        path = self.mktemp()
        old = sqlite3.connect(path)
        old.executescript(OLD_SCHEMA)
        old.commit()
        old.close()
        store = Store(path)
        store.open()
        self.addCleanup(store.close)
        columns = [r[1] for r in store.db.execute("PRAGMA table_info(files)")]
        self.assertEqual(columns[-2:], ["size", "sha256"])
        # The files it held are listed, sizes and hashes unknown, and searchable.
        self.assertEqual(
            store.list_files("alice"),
            [("canción.txt", "una nana", None, None), ("b.txt", "second", None, None)],
        )
        hits = store.search(["cancion"], 10)
        self.assertEqual([(h.owner, h.name, h.copies) for h in hits], [("alice", "canción.txt", 1)])
        # Later changes go on as in a new database, and a second open changes nothing.
        store.publish_file("bob", "cancion_bob.txt", "now with a hash", 3, H1)
        store.set_address("bob", ("10.0.0.2", 5001))
        store.commit()
        store.close()
        store.open()
        hits = store.search(["cancion"], 10)
        self.assertEqual(
            [(h.owner, h.name, h.size, h.sha256) for h in hits],
            [("alice", "canción.txt", None, None), ("bob", "cancion_bob.txt", 3, H1)],
        )
        users = store.load()
        self.assertEqual(list(users["alice"].files), ["canción.txt", "b.txt"])
