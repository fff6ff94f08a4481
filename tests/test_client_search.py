"""The shell's side of content identity and search (protocol.md sections 5 and 8).

Against the real indexer in memory (``LoopbackIndexer``): PUBLISH sends the
file's size and SHA-256 (``PUBLISH_FILE``), LIST_CONTENT shows sizes
(``LIST_FILES``), SEARCH prints its hits, GET_FILE hands the published size and
hash to the download; each falls back when the indexer does not know the
extension. The peer side: a published file that changed is refused, hashed
again and published again (``Session.is_current``).
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.defer import Deferred

from p2p import wire
from p2p.client import commands
from p2p.client.commands import ParseError
from p2p.client.indexer_client import IndexerError, UnknownOperation
from p2p.peer.download import ContentMismatch, Expected
from tests.test_client_shell import ShellTestCase

LULLABY = "canción_de_cuna.txt"
BODY = b"a la nanita nana\n"
SHA = hashlib.sha256(BODY).hexdigest()


class SearchParseTests(ShellTestCase):
    def test_limit_and_words(self) -> None:
        parse = commands.parse
        self.assertEqual(parse("SEARCH cancion").args, ("100", "cancion"))
        self.assertEqual(parse("search  --limit 5  a   b ").args, ("5", "a b"))
        self.assertEqual(parse("SEARCH --limit=1000 x").args, ("1000", "x"))
        usage = "Syntax error. Usage: SEARCH [--limit N] <words...>"
        for line in ("SEARCH", "SEARCH --limit 5", "SEARCH --limit 0 x", "SEARCH --limit 1001 x"):
            with self.assertRaises(ParseError) as caught:
                parse(line)
            self.assertEqual(str(caught.exception), usage, line)
        self.assertEqual(self.send("SEARCH --limit ten x"), [usage])
        self.assertEqual(self.indexer.requests, [])
        self.assertIn("SEARCH [--limit N] <words...>", "\n".join(commands.help_text()))


class PublishTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.connect()
        (self.share / LULLABY).write_bytes(BODY)

    def test_publish_sends_size_and_hash_and_records_them(self) -> None:
        self.assertEqual(self.send(f"PUBLISH {LULLABY} nana para dormir"), ["c> PUBLISH OK"])
        self.assertEqual(
            self.indexer.requests,
            [("PUBLISH_FILE", "alice", LULLABY, "nana para dormir", len(BODY), SHA, "new")],
        )
        claim = self.home.claim("alice", self.share, LULLABY)
        self.assertEqual((claim.description, claim.content.size), ("nana para dormir", len(BODY)))
        self.assertEqual(claim.content.sha256, SHA)
        self.assertEqual(
            self.send("LIST_CONTENT alice"),
            ["c> LIST_CONTENT OK", f'\t{LULLABY} {len(BODY)} "nana para dormir"'],
        )
        # Published again (after DELETE): the cache answers, nothing is read again.
        self.assertEqual(self.send(f"DELETE {LULLABY}"), ["c> DELETE OK"])
        read = self.shell.session.content.hashed
        self.assertEqual(self.send(f"PUBLISH {LULLABY} otra vez"), ["c> PUBLISH OK"])
        self.assertEqual(self.shell.session.content.hashed, read)
        self.assertEqual(self.indexer.requests[-1][-3:], (len(BODY), SHA, "new"))

    def test_the_result_lines_are_publishs(self) -> None:
        self.check_codes_of_publish_file()

    def check_codes_of_publish_file(self) -> None:
        for code, line in (
            (1, "c> PUBLISH FAIL, USER DOES NOT EXIST"),
            (2, "c> PUBLISH FAIL, USER NOT CONNECTED"),
            (3, "c> PUBLISH FAIL, CONTENT ALREADY PUBLISHED"),
            (4, "c> PUBLISH FAIL"),
            (9, "c> PUBLISH FAIL"),
        ):
            self.indexer.faults["PUBLISH_FILE"] = wire.encode_code(code)
            self.assertEqual(self.send(f"PUBLISH {LULLABY} x"), [line], code)
        self.indexer.faults["PUBLISH_FILE"] = IndexerError("down")
        self.assertEqual(self.send(f"PUBLISH {LULLABY} x"), ["c> PUBLISH FAIL"])
        # Only code 0 records a claim (3 records the name: it was published before).
        self.assertIsNone(self.home.claim("alice", self.share, LULLABY))

    def test_a_classic_indexer_gets_publish_once_noted(self) -> None:
        self.indexer.faults["PUBLISH_FILE"] = UnknownOperation("what is PUBLISH_FILE?")
        (self.share / "b.txt").write_bytes(b"bee")
        self.assertEqual(self.send(f"PUBLISH {LULLABY} nana"), ["c> PUBLISH OK"])
        self.assertEqual(self.send("PUBLISH b.txt bees"), ["c> PUBLISH OK"])
        self.assertEqual(
            self.indexer.ops(), ["PUBLISH_FILE", "PUBLISH", "PUBLISH"]
        )  # not tried again
        said = [note for note in self.output.notes if "does not know PUBLISH_FILE" in note]
        self.assertEqual(len(said), 1)
        self.assertIsNone(self.home.claim("alice", self.share, LULLABY))  # nothing claimed
        self.assertIn(LULLABY, self.home.published("alice", self.share))

    def test_an_unreadable_file_is_published_classically(self) -> None:
        def unreadable(path):
            raise PermissionError(13, "Permission denied", str(path))

        self.shell.session.content.digest = unreadable
        self.assertEqual(self.send(f"PUBLISH {LULLABY} nana"), ["c> PUBLISH OK"])
        self.assertEqual(self.indexer.ops(), ["PUBLISH"])
        self.assertIn("cannot read", self.output.notes[-1])
        self.assertIn("Permission denied", self.output.notes[-1])


class ListingTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.connect()
        for user, port in (("bob", 7), ("carol", 8)):
            self.assertEqual(self.indexer.other("REGISTER", user), 0)
            self.assertEqual(self.indexer.other("CONNECT", user, port, peer="10.0.0.2"), 0)

    def publish(self, user: str, name: str, text: str, body: bytes | None) -> None:
        if body is None:
            self.assertEqual(self.indexer.other("PUBLISH", user, name, text), 0)
        else:
            sha = hashlib.sha256(body).hexdigest()
            args = (name, text, len(body), sha, "new")
            self.assertEqual(self.indexer.other("PUBLISH_FILE", user, *args), 0)

    def test_list_content_shows_sizes(self) -> None:
        self.publish("bob", LULLABY, "nana para dormir", BODY)
        self.publish("bob", "old.txt", "classic\tone", None)
        self.assertEqual(
            self.send("LIST_CONTENT bob"),
            [
                "c> LIST_CONTENT OK",
                f'\t{LULLABY} {len(BODY)} "nana para dormir"',
                '\told.txt - "classic\tone"',
            ],
        )

    def test_list_content_falls_back_to_list_content(self) -> None:
        self.publish("bob", LULLABY, "nana", BODY)
        self.indexer.faults["LIST_FILES"] = UnknownOperation("what is LIST_FILES?")
        for _ in range(2):
            self.assertEqual(
                self.send("LIST_CONTENT bob"), ["c> LIST_CONTENT OK", f'\t{LULLABY} - "nana"']
            )
        self.assertEqual(self.indexer.ops(), ["LIST_FILES", "LIST_CONTENT"] * 2)
        said = [note for note in self.output.notes if "does not know LIST_FILES" in note]
        self.assertEqual(len(said), 1)

    def test_search_hits_sizes_and_copies(self) -> None:
        self.publish("bob", LULLABY, "nana para dormir", BODY)
        self.publish("carol", "cuna.txt", "la misma nana", BODY)
        self.publish("carol", "cunas.txt", "sin hash", None)
        self.assertEqual(
            self.send("SEARCH cancion"),
            ["c> SEARCH OK", f'\tbob {LULLABY} {len(BODY)} "nana para dormir" (2 users have it)'],
        )
        self.assertEqual(self.indexer.requests[-1], ("SEARCH", "alice", "cancion", "100"))
        lines = self.send("SEARCH --limit 2 cun")
        self.assertEqual(len(lines), 3)
        self.assertEqual(self.indexer.requests[-1], ("SEARCH", "alice", "cun", "2"))
        self.assertEqual(self.send("SEARCH zzz"), ["c> SEARCH OK"])
        self.assertEqual(
            self.send("SEARCH sin hash"), ["c> SEARCH OK", '\tcarol cunas.txt - "sin hash"']
        )

    def test_search_rows_escape_control_characters(self) -> None:
        rows = [("m\x1b]0;x", "a\rb", "one\ntwo\tend", "12", "ab" * 32, "3")]
        self.indexer.faults["SEARCH"] = wire.encode_code(0) + wire.encode_listing(rows)
        self.assertEqual(
            self.send("SEARCH a"),
            ["c> SEARCH OK", '\tm\\x1b]0;x a\\rb 12 "one\\ntwo\tend" (3 users have it)'],
        )

    def test_search_codes(self) -> None:
        empty = wire.encode_listing([])
        for code, line in (
            (0, "c> SEARCH OK"),
            (1, "c> SEARCH FAIL, USER DOES NOT EXIST"),
            (2, "c> SEARCH FAIL, USER NOT CONNECTED"),
            (3, "c> SEARCH FAIL"),
            (9, "c> SEARCH FAIL"),
        ):
            reply = wire.encode_code(code) + (empty if code == 0 else b"")
            self.indexer.faults["SEARCH"] = reply
            self.assertEqual(self.send("SEARCH x"), [line], code)
        self.indexer.faults["SEARCH"] = IndexerError("down")
        self.assertEqual(self.send("SEARCH x"), ["c> SEARCH FAIL"])
        del self.indexer.faults["SEARCH"]
        # The real indexer: no searchable word is its code 3.
        self.assertEqual(self.send("SEARCH *:^-"), ["c> SEARCH FAIL"])
        self.assertIn("needs a word", self.output.notes[-1])
        # Too long to travel: refused here, the indexer not asked.
        before = len(self.indexer.requests)
        self.assertEqual(self.send("SEARCH " + "x" * 300), ["c> SEARCH FAIL"])
        self.assertEqual(len(self.indexer.requests), before)

    def test_search_against_a_classic_indexer(self) -> None:
        self.indexer.faults["SEARCH"] = UnknownOperation("what is SEARCH?")
        self.assertEqual(self.send("SEARCH cancion"), ["c> SEARCH FAIL"])
        self.assertIn("does not support search", self.output.notes[-1])

    def test_search_without_a_connected_user(self) -> None:
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        self.indexer.requests.clear()
        self.assertEqual(self.send("SEARCH cancion"), ["c> SEARCH FAIL, USER NOT CONNECTED"])
        self.assertEqual(self.indexer.requests, [])


class VerifiedGetFileTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.assertEqual(self.indexer.other("REGISTER", "bob"), 0)
        self.assertEqual(self.indexer.other("CONNECT", "bob", 5555, peer="10.0.0.2"), 0)
        args = (LULLABY, "nana", len(BODY), SHA, "new")
        self.assertEqual(self.indexer.other("PUBLISH_FILE", "bob", *args), 0)

    def test_the_published_size_and_hash_go_to_the_download(self) -> None:
        self.assertEqual(self.send(f"GET_FILE bob {LULLABY} out"), ["c> GET_FILE OK"])
        self.assertEqual(self.checked, [{"expected": Expected(len(BODY), SHA)}])
        self.assertFalse(any("unverified" in note for note in self.output.notes))

    def test_a_mismatch_fails_and_says_why(self) -> None:
        self.download_result = ContentMismatch("the SHA-256 differs; nothing was kept")
        before = len(self.output.notes)
        self.assertEqual(self.send(f"GET_FILE bob {LULLABY} out"), ["c> GET_FILE FAIL"])
        [note] = self.output.notes[before:]
        self.assertIn("is not what bob published", note)
        self.assertIn("nothing was kept", note)

    def test_without_list_files_unverified(self) -> None:
        self.indexer.faults["LIST_FILES"] = UnknownOperation("what is LIST_FILES?")
        before = len(self.output.notes)
        self.assertEqual(self.send(f"GET_FILE bob {LULLABY} out"), ["c> GET_FILE OK"])
        self.assertEqual(self.checked, [{}])
        said = [note for note in self.output.notes[before:] if "unverified" in note]
        self.assertEqual(len(said), 1, self.output.notes[before:])


class StaleClaimTests(ShellTestCase):
    """The peer side: ``is_current`` refuses a changed file and publishes it again."""

    def setUp(self) -> None:
        super().setUp()
        self.connect()
        self.path = self.share / LULLABY
        self.path.write_bytes(BODY)
        self.assertEqual(self.send(f"PUBLISH {LULLABY} nana"), ["c> PUBLISH OK"])
        self.session = self.shell.session
        self.indexer.requests.clear()

    def test_unchanged_is_served(self) -> None:
        self.assertTrue(self.session.is_current(LULLABY, self.path.stat()))
        self.assertEqual(self.indexer.requests, [])

    def test_same_size_other_bytes_refused_then_published_again(self) -> None:
        st = self.path.stat()
        self.path.write_bytes(b"A LA NANITA NANA\n")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        changed = self.path.stat()
        held = self.indexer.hold("PUBLISH_FILE")
        self.assertFalse(self.session.is_current(LULLABY, changed))
        self.assertFalse(self.session.is_current(LULLABY, changed))  # still refused meanwhile
        new_sha = hashlib.sha256(b"A LA NANITA NANA\n").hexdigest()
        held.callback(None)
        self.assertEqual(
            self.indexer.requests,
            [("PUBLISH_FILE", "alice", LULLABY, "nana", len(BODY), new_sha, "replace")],
        )  # once, however many requests came meanwhile
        self.assertTrue(self.session.is_current(LULLABY, changed))
        self.assertEqual(self.home.claim("alice", self.share, LULLABY).content.sha256, new_sha)
        self.assertEqual(
            self.send("LIST_CONTENT alice"),
            ["c> LIST_CONTENT OK", f'\t{LULLABY} {len(BODY)} "nana"'],
        )
        self.assertTrue(any("published again" in note for note in self.output.notes))

    def test_a_file_published_classically_is_served_as_is(self) -> None:
        self.indexer.other("PUBLISH", "alice", "old.txt", "x")
        self.home.add_published("alice", self.share, "old.txt")
        (self.share / "old.txt").write_bytes(b"anything")
        self.assertTrue(self.session.is_current("old.txt", (self.share / "old.txt").stat()))

    def test_refused_when_nobody_is_connected(self) -> None:
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        self.assertFalse(self.session.is_current(LULLABY, self.path.stat()))

    def test_the_peer_server_is_given_the_check(self) -> None:
        seen: list[Deferred] = []

        def factory(share_dir, is_published, reactor=None, is_current=None):
            seen.append(is_current)
            return self.servers[0].__class__(share_dir, is_published, reactor)

        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        self.shell.server_factory = factory
        self.assertEqual(self.send("CONNECT alice"), ["c> CONNECT OK"])
        self.assertEqual(seen, [self.session.is_current])
