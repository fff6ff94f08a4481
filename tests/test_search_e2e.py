"""Search and verified downloads with real processes: a real ``twistd p2p-indexer``
and real ``p2p-client`` shells on 127.0.0.1 (protocol.md sections 5 and 8).

alice publishes a file with an accented name and a description of several
words; bob finds it by words without accents and by the start of a word, with
its size; alice overwrites it with other bytes of the same size and bob's
GET_FILE never leaves wrong bytes; a peer that sends other bytes than the ones
published fails bob's check and leaves nothing; publishing an unchanged file
again reads nothing (the hash cache).
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from p2p import wire
from tests.support import poll_until
from tests.test_client_e2e import Stack
from tests.test_client_interop import ClassicPeer

LULLABY = "canción_de_cuna.txt"
TEXT = "Nana de la abuela: canción para dormir al niño"
BODY = b"Duerme, mi ni\xc3\xb1o, duerme ya.\n" * 40
OTHER = bytes(reversed(BODY))  # the same size, other bytes


class SearchEndToEndTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        yield self.stack.start_indexer()
        self.alice = self.stack.shell("alice")
        self.bob = self.stack.shell("bob")
        for shell, user in ((self.alice, "alice"), (self.bob, "bob")):
            yield shell.check(f"REGISTER {user}", "c> REGISTER OK")
            yield shell.check(f"CONNECT {user}", "c> CONNECT OK")
        (self.alice.share / LULLABY).write_bytes(BODY)
        yield self.alice.check(f"PUBLISH {LULLABY} {TEXT}", "c> PUBLISH OK")

    @defer.inlineCallbacks
    def test_found_by_words_without_accents_and_by_prefixes(self):
        hit = f'\talice {LULLABY} {len(BODY)} "{TEXT}"'
        for query in ("cancion", "cun", "CANCIÓN", "abuela dormir", "nin cun", "--limit 1 can"):
            yield self.bob.check(f"SEARCH {query}", "c> SEARCH OK", hit)
        yield self.bob.check("SEARCH una", "c> SEARCH OK")  # not the start of a word
        yield self.bob.check("SEARCH cancion gato", "c> SEARCH OK")  # every word must match
        yield self.bob.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", f'\t{LULLABY} {len(BODY)} "{TEXT}"'
        )
        # Carol publishes the same bytes: one content, two users have it.
        carol = self.stack.shell("carol")
        yield carol.check("REGISTER carol", "c> REGISTER OK")
        yield carol.check("CONNECT carol", "c> CONNECT OK")
        (carol.share / "cuna.txt").write_bytes(BODY)
        yield carol.check("PUBLISH cuna.txt la misma", "c> PUBLISH OK")
        yield self.bob.check("SEARCH cancion", "c> SEARCH OK", f"{hit} (2 users have it)")
        # An owner who is not connected is not a hit.
        yield self.alice.check("DISCONNECT alice", "c> DISCONNECT OK")
        yield self.bob.check(
            "SEARCH cuna", "c> SEARCH OK", f'\tcarol cuna.txt {len(BODY)} "la misma"'
        )
        yield self.bob.check("SEARCH", "Syntax error. Usage: SEARCH [--limit N] <words...>")

    @defer.inlineCallbacks
    def test_a_verified_download_and_an_overwritten_file(self):
        destination = self.bob.cwd / "got.txt"
        yield self.bob.check(f"GET_FILE alice {LULLABY} got.txt", "c> GET_FILE OK")
        self.assertEqual(destination.read_bytes(), BODY)
        self.assertFalse(any("unverified" in line for line in self.bob.proc.errlines))
        destination.unlink()
        # alice overwrites the published file in place: the same size, other bytes.
        with (self.alice.share / LULLABY).open("r+b") as f:
            f.write(OTHER)
        outcomes = []
        for _attempt in range(20):
            [line] = yield self.bob.run(f"GET_FILE alice {LULLABY} got.txt")
            outcomes.append(line)
            if destination.exists():  # never anything but what alice's file holds now
                self.assertEqual(destination.read_bytes(), OTHER, outcomes)
            else:
                self.assertNotEqual(line, "c> GET_FILE OK", outcomes)
            if line == "c> GET_FILE OK":
                break
            yield poll_until(
                lambda: any("published again" in e for e in self.alice.proc.errlines),
                what="alice publishing her changed file again",
            )
        self.assertEqual(outcomes[-1], "c> GET_FILE OK", self.bob.proc.output())
        # Her peer refused the stale claim (FILE NOT EXIST) until it was published again.
        self.assertEqual(outcomes[0], "c> GET_FILE FAIL / FILE NOT EXIST", outcomes)
        self.assertTrue(
            any("changed since alice published it" in e for e in self.alice.proc.errlines),
            self.alice.proc.output(),
        )
        new_sha = hashlib.sha256(OTHER).hexdigest()
        code, rows = yield self.stack.raw("LIST_FILES", "bob", "alice", home=self.bob.home)
        self.assertEqual((code, rows), (0, [(LULLABY, TEXT, str(len(OTHER)), new_sha)]))
        self.assertEqual(sorted(os.listdir(self.bob.cwd)), ["got.txt"])

    @defer.inlineCallbacks
    def test_a_peer_sending_other_bytes_fails_verification(self):
        # mallory, a classic program, publishes the hash of BODY but serves other bytes.
        peer = ClassicPeer({"lie.txt": OTHER})
        listening = reactor.listenTCP(0, peer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        sha = hashlib.sha256(BODY).hexdigest()
        for op, *args in (
            ("REGISTER",),
            ("CONNECT", listening.getHost().port),
            ("PUBLISH_FILE", "lie.txt", "trust me", len(BODY), sha, "new"),
        ):
            code, _rows = yield self.stack.raw(op, "mallory", *args)
            self.assertEqual(code, wire.OK, op)
        yield self.bob.check("GET_FILE mallory lie.txt got.txt", "c> GET_FILE FAIL")
        said = [e for e in self.bob.proc.errlines if "is not what mallory published" in e]
        self.assertEqual(len(said), 1, self.bob.proc.output())
        self.assertIn(sha, said[0])
        self.assertEqual(os.listdir(self.bob.cwd), [])  # nothing kept, no part file
        self.assertEqual(peer.requests, [b"GET_FILE\0lie.txt\0"])  # FETCH unknown there

    @defer.inlineCallbacks
    def test_publishing_an_unchanged_file_again_reads_nothing(self):
        cache = self.alice.home / "content_hashes.json"
        before = cache.stat()
        yield self.alice.check(f"DELETE {LULLABY}", "c> DELETE OK")
        yield self.alice.check(f"PUBLISH {LULLABY} {TEXT}", "c> PUBLISH OK")
        # A new session on the same home: still nothing read.
        yield self.alice.quit()
        again = self.stack.shell("alice", home=self.alice.home, share=self.alice.share)
        yield again.check("CONNECT alice", "c> CONNECT OK")
        yield again.check(f"DELETE {LULLABY}", "c> DELETE OK")
        yield again.check(f"PUBLISH {LULLABY} {TEXT}", "c> PUBLISH OK")
        after = cache.stat()
        self.assertEqual((after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns))
        yield self.bob.check(
            "LIST_CONTENT alice", "c> LIST_CONTENT OK", f'\t{LULLABY} {len(BODY)} "{TEXT}"'
        )
        # A changed file is read again: the cache is rewritten.
        (self.alice.share / LULLABY).write_bytes(BODY + b"!")
        yield again.check(f"DELETE {LULLABY}", "c> DELETE OK")
        yield again.check(f"PUBLISH {LULLABY} {TEXT}", "c> PUBLISH OK")
        self.assertNotEqual(cache.stat().st_ino, before.st_ino)
