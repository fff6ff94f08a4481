"""Content identity of published files: ``p2p.client.content`` and its record in the home.

The cache answers from ``$P2P_HOME/content_hashes.json`` while a file's size,
mtime, inode and change time stay the same, reads it again when any of them
moves, and does its reading in the reactor's thread pool, never on the reactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from twisted.internet import defer
from twisted.python import threadable
from twisted.trial.unittest import TestCase

from p2p.client import content
from p2p.client.content import Claim, Content, ContentCache, FileChanging, Stamp, digest_file
from p2p.client.home import Home
from tests.support import deadline


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


class DigestTests(TestCase):
    def test_size_and_sha256(self) -> None:
        path = Path(self.mktemp())
        data = os.urandom(3 * content.READ_SIZE + 17)
        path.write_bytes(data)
        found = digest_file(path)
        self.assertEqual(found.size, len(data))
        self.assertEqual(found.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual(found.stamp, Stamp.of(path.stat()))

    def test_empty_file(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"")
        self.assertEqual(digest_file(path).sha256, hashlib.sha256(b"").hexdigest())

    def test_a_file_that_keeps_changing_while_read(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"x" * (2 * content.READ_SIZE))
        real_read = os.read
        writes = []

        def read_and_touch(fd, n):  # another program writes while we read
            data = real_read(fd, n)
            if not data:
                with open(path, "r+b") as f:
                    f.write(b"y")
                st = os.fstat(fd)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
                writes.append(1)
            return data

        self.patch(os, "read", read_and_touch)
        self.assertRaises(FileChanging, digest_file, path)
        self.assertGreaterEqual(len(writes), content.ATTEMPTS)


class CacheTests(TestCase):
    def setUp(self) -> None:
        self.home = Home(Path(self.mktemp()) / "p2p")
        self.file = Path(self.mktemp()).resolve()
        self.file.write_bytes(b"hello world\n")
        self.cache = ContentCache(self.home.content_cache_file, inline)

    def identify(self, cache: ContentCache | None = None) -> Content:
        return self.successResultOf((cache or self.cache).identify(self.file))

    def test_hit_reads_nothing(self) -> None:
        first = self.identify()
        self.assertEqual(first.size, 12)
        self.assertEqual(
            first.sha256, "a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447"
        )
        self.assertEqual(self.cache.hashed, 1)
        self.assertEqual(self.identify(), first)
        self.assertEqual(self.cache.hashed, 1)
        # Kept on disk, owner-only: a new client (another session) does not read it again.
        self.assertEqual(self.home.content_cache_file.stat().st_mode & 0o777, 0o600)
        again = ContentCache(self.home.content_cache_file, inline)
        self.assertEqual(self.identify(again), first)
        self.assertEqual(again.hashed, 0)

    def test_a_new_size_is_hashed_again(self) -> None:
        self.identify()
        self.file.write_bytes(b"hello world!\n")
        found = self.identify()
        self.assertEqual((found.size, self.cache.hashed), (13, 2))
        self.assertEqual(found.sha256, hashlib.sha256(b"hello world!\n").hexdigest())

    def test_same_size_new_mtime_is_hashed_again(self) -> None:
        first = self.identify()
        self.file.write_bytes(b"HELLO WORLD\n")
        st = self.file.stat()
        os.utime(self.file, ns=(st.st_atime_ns, first.stamp.mtime_ns + 1_000_000))
        found = self.identify()
        self.assertEqual(self.cache.hashed, 2)
        self.assertEqual(found.sha256, hashlib.sha256(b"HELLO WORLD\n").hexdigest())

    def test_mtime_set_back_still_hashed_again(self) -> None:
        # Same size, other bytes, the mtime put back as it was (cp -p, rsync -t):
        # the change time, which no program can set, still tells.
        first = self.identify()
        self.file.write_bytes(b"HELLO WORLD\n")
        os.utime(self.file, ns=(first.stamp.mtime_ns, first.stamp.mtime_ns))
        self.assertEqual(self.file.stat().st_mtime_ns, first.stamp.mtime_ns)
        found = self.identify()
        if found.stamp.ctime_ns == first.stamp.ctime_ns:
            self.skipTest("the change time did not move within this file system's resolution")
        self.assertEqual(found.sha256, hashlib.sha256(b"HELLO WORLD\n").hexdigest())

    def test_a_replaced_file_is_hashed_again(self) -> None:
        first = self.identify()
        other = self.file.with_name("other")
        other.write_bytes(b"HELLO WORLD\n")
        os.utime(other, ns=(first.stamp.mtime_ns, first.stamp.mtime_ns))
        os.replace(other, self.file)  # a new inode under the same name
        found = self.identify()
        self.assertEqual(self.cache.hashed, 2)
        self.assertNotEqual(found.sha256, first.sha256)

    def test_unreadable_and_missing(self) -> None:
        self.failureResultOf(self.cache.identify(self.file.with_name("nope")), OSError)
        self.failureResultOf(self.cache.identify(self.file.parent), OSError)  # a directory

    def test_stopped_hashing_gives_up_and_keeps_nothing(self) -> None:
        self.cache.stop()  # the client is ending
        self.failureResultOf(self.cache.identify(self.file), content.Interrupted)
        self.assertFalse(self.home.content_cache_file.exists())

    def test_a_damaged_cache_file_is_started_over(self) -> None:
        self.home.content_cache_file.parent.mkdir(parents=True)
        self.home.content_cache_file.write_text("{not json")
        self.assertEqual(self.identify().size, 12)
        self.assertEqual(self.cache.hashed, 1)
        self.assertIn(str(self.file), json.loads(self.home.content_cache_file.read_text()))

    def test_oldest_entries_go_past_the_bound(self) -> None:
        self.patch(content, "MAX_ENTRIES", 2)
        paths = []
        for index in range(3):
            path = self.file.with_name(f"f{index}")
            path.write_bytes(b"%d" % index)
            paths.append(path)
            self.successResultOf(self.cache.identify(path))
        kept = json.loads(self.home.content_cache_file.read_text())
        self.assertEqual(sorted(kept), sorted(str(p) for p in paths[1:]))


class OffTheReactorTests(TestCase):
    """With the real reactor, hashing and the cache's file run in its thread pool."""

    @defer.inlineCallbacks
    def test_hashing_runs_in_a_thread(self) -> None:
        from twisted.internet import reactor

        home = Home(Path(self.mktemp()) / "p2p")
        path = Path(self.mktemp()).resolve()
        path.write_bytes(os.urandom(100_000))
        seen: list[tuple[bool, str]] = []

        def digest(where):
            seen.append((threadable.isInIOThread(), threading.current_thread().name))
            return digest_file(where)

        cache = content.for_reactor(home.content_cache_file, reactor)
        cache.digest = digest
        started = cache.identify(path)
        self.assertNoResult(started)  # nothing done on the reactor's turn
        found = yield deadline(started)
        self.assertEqual(found.sha256, hashlib.sha256(path.read_bytes()).hexdigest())
        self.assertEqual(len(seen), 1)
        self.assertFalse(seen[0][0], seen)
        # The hit answers from the cache, in the thread too, without reading the file.
        again = yield deadline(cache.identify(path))
        self.assertEqual((again, len(seen)), (found, 1))


class ClaimRecordTests(TestCase):
    """What was published, and what the indexer was told of it, in ``published/<user>.json``."""

    def setUp(self) -> None:
        self.home = Home(Path(self.mktemp()) / "p2p")
        self.share = Path(self.mktemp())
        self.share.mkdir()

    def test_a_claim_is_kept_and_replaced(self) -> None:
        claim = Claim("nana", Content(12, "ab" * 32, Stamp(12, 5, 6, 7)))
        self.home.add_published("alice", self.share, "a.txt", claim)
        self.home.add_published("alice", self.share, "b.txt")
        self.assertEqual(self.home.published("alice", self.share), {"a.txt", "b.txt"})
        self.assertEqual(Home(self.home.path).claim("alice", self.share, "a.txt"), claim)
        self.assertIsNone(self.home.claim("alice", self.share, "b.txt"))
        self.assertIsNone(self.home.claim("alice", self.share, "c.txt"))
        newer = Claim("nana", Content(13, "cd" * 32, Stamp(13, 8, 6, 9)))
        self.home.add_published("alice", self.share, "a.txt", newer)
        self.assertEqual(self.home.claim("alice", self.share, "a.txt"), newer)
        self.home.remove_published("alice", self.share, "a.txt")
        self.assertIsNone(self.home.claim("alice", self.share, "a.txt"))

    def test_the_record_of_older_clients_is_read(self) -> None:
        # Before claims were kept: a list of names per share directory.
        path = self.home.published_file("alice")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({str(self.share.resolve()): ["old.txt"]}))
        self.assertEqual(self.home.published("alice", self.share), {"old.txt"})
        self.assertIsNone(self.home.claim("alice", self.share, "old.txt"))
        self.home.add_published("alice", self.share, "new.txt")
        self.assertEqual(self.home.published("alice", self.share), {"old.txt", "new.txt"})
