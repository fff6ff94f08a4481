"""Resumable and multi-source downloads (``p2p.peer.partial``, ``p2p.peer.swarm``)
against small fake peers on 127.0.0.1 that speak FETCH, RANGE and PIECES as
protocol.md 2.2, 2.4 and 2.5 say, some of them misbehaving (tests/fake_peers.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import threading
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import TestCase

from p2p.peer import download as single
from p2p.peer import swarm
from p2p.peer.download import (
    ContentMismatch,
    DownloadFailed,
    Expected,
    Limits,
    NoSuchFile,
    Source,
    download,
)
from p2p.peer.partial import Key, State, open_partial, paths
from tests.fake_peers import Behaviour, FakePeers, digests
from tests.support import deadline, poll_until

MiB = 1 << 20


def body_of(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB, varied
    out = bytearray()
    while len(out) < size:
        out += block[len(out) % 7 :]
    return bytes(out[:size])


class Case(TestCase):
    def setUp(self) -> None:
        self.peers = FakePeers()
        self.addCleanup(self.peers.stop)
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.dest = self.dir / "out.bin"
        self.notes: list[str] = []

    def files(self) -> list[str]:
        return sorted(os.listdir(self.dir))

    def fetch(self, port: int, expected: Expected | None, owner: str = "alice", **how):
        d = download(
            "127.0.0.1",
            port,
            "f.bin",
            self.dest,
            reactor=reactor,
            timeout=5.0,
            expected=expected,
            resume=True,
            owner=owner,
            notice=self.notes.append,
            **how,
        )
        return d

    def source(self, owner: str, how: Behaviour) -> Source:
        return Source(owner, how.name, "127.0.0.1", self.peers.add(how))

    def resumed_at(self) -> list[int]:
        return [int(n.split(" at ")[1].split()[0]) for n in self.notes if "resuming" in n]


class PartialStateTests(Case):
    def test_state_round_trip_and_held_bytes(self) -> None:
        key = Key("ab" * 32, 10 * MiB, "alice", "f.bin")
        state = State(key, prefix=MiB + 5, piece_size=MiB, pieces={1, 2, 4})
        again = State.from_json(json.loads(json.dumps(state.to_json())))
        self.assertEqual(again, state)
        self.assertEqual(state.held(), 3 * MiB)  # the prefix, then pieces 1 and 2; 3 missing

    def test_other_content_is_discarded_and_the_same_kept(self) -> None:
        key = Key("ab" * 32, 100, "alice", "f.bin")
        partial = open_partial(self.dest, key)
        os.write(partial.fd, b"x" * 60)
        partial.state.prefix = 60
        partial.save()
        partial.close()
        # The same content from another owner: kept.
        partial = open_partial(self.dest, Key("ab" * 32, 100, "bob", "g.bin"))
        self.assertEqual(partial.state.held(), 60)
        partial.close()
        # Other content: nothing held, the file emptied.
        partial = open_partial(self.dest, Key("cd" * 32, 100, "alice", "f.bin"))
        self.assertEqual(partial.state.held(), 0)
        self.assertEqual(os.fstat(partial.fd).st_size, 0)
        partial.close()
        # Without a hash: owner, name and size are the content.
        for key, held in (
            (Key(None, 100, "alice", "f.bin"), 0),  # (the hashed state was discarded)
        ):
            partial = open_partial(self.dest, key)
            self.assertEqual(partial.state.held(), held)
            os.write(partial.fd, b"y" * 30)
            partial.state.prefix = 30
            partial.save()
            partial.close()
        partial = open_partial(self.dest, Key(None, 100, "alice", "f.bin"))
        self.assertEqual(partial.state.held(), 30)
        partial.close()
        partial = open_partial(self.dest, Key(None, 100, "bob", "f.bin"))
        self.assertEqual(partial.state.held(), 0)
        partial.close()

    def test_bytes_the_file_lacks_are_not_held(self) -> None:
        key = Key("ab" * 32, 100, "alice", "f.bin")
        partial = open_partial(self.dest, key)
        os.write(partial.fd, b"x" * 10)
        partial.state.prefix = 50  # (as if the data file had been cut)
        partial.save()
        partial.close()
        partial = open_partial(self.dest, key)
        self.assertEqual(partial.state.held(), 10)
        partial.close()

    def assert_state_discarded(self) -> None:
        key = Key("ab" * 32, 100, "alice", "f.bin")
        partial = open_partial(self.dest, key)
        self.addCleanup(partial.close)
        self.assertEqual(partial.state, State(key))
        self.assertEqual(State.from_json(json.loads(partial.json_path.read_text())), State(key))

    def test_a_deeply_nested_state_is_not_ours(self) -> None:
        paths(self.dest)[1].write_text("[" * 200000)
        self.assert_state_discarded()

    def test_a_fifo_at_the_state_is_not_read(self) -> None:
        os.mkfifo(paths(self.dest)[1])
        self.assert_state_discarded()

    def test_an_endless_file_at_the_state_is_not_read(self) -> None:
        paths(self.dest)[1].symlink_to("/dev/zero")
        self.assert_state_discarded()

    def test_an_oversized_state_is_not_ours(self) -> None:
        # (held bytes its JSON names, past the bound: not read, so not held)
        data, json_path = paths(self.dest)
        data.write_bytes(b"x" * 60)
        state = State(Key("ab" * 32, 100, "alice", "f.bin"), prefix=50).to_json()
        json_path.write_text(json.dumps(state) + " " * (2 << 20))
        self.assert_state_discarded()

    def test_a_second_download_to_the_same_destination_is_refused(self) -> None:
        key = Key("ab" * 32, 100, "alice", "f.bin")
        first = open_partial(self.dest, key)
        self.addCleanup(first.close)
        with self.assertRaises(OSError):
            open_partial(self.dest, key)


class PlantedNamesTests(Case):
    """Names planted beside the destination (a shared directory) are never
    followed: the file they point to stays as it was."""

    def victim(self) -> Path:
        victim = Path(self.mktemp())
        victim.write_bytes(b"precious")
        return victim

    @defer.inlineCallbacks
    def download_checked(self, victim: Path):
        body = body_of(MiB + 3)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        got = yield deadline(self.fetch(self.peers.add(Behaviour("f.bin", body)), expected))
        self.assertEqual(got, len(body))
        self.assertFalse(self.dest.is_symlink())
        self.assertEqual(self.dest.read_bytes(), body)
        self.assertEqual(victim.read_bytes(), b"precious")

    def test_a_symlink_at_the_data_file(self):
        victim = self.victim()
        paths(self.dest)[0].symlink_to(victim)
        return self.download_checked(victim)

    def test_a_symlink_at_the_state_files_temporary(self):
        victim = self.victim()
        json_path = paths(self.dest)[1]
        json_path.with_name(json_path.name + ".tmp").symlink_to(victim)
        return self.download_checked(victim)

    def test_a_hard_link_at_the_data_file(self):
        victim = self.victim()
        os.link(victim, paths(self.dest)[0])
        return self.download_checked(victim)

    def test_a_name_swapped_for_a_symlink_is_not_reopened(self):
        victim = self.victim()
        key = Key("ab" * 32, 100, "alice", "f.bin")
        partial = open_partial(self.dest, key)
        self.addCleanup(partial.close)
        partial.data_path.unlink()
        partial.data_path.symlink_to(victim)
        with self.assertRaises(OSError):
            partial.finish(0, 0o644)
        self.assertFalse(self.dest.exists())
        self.assertEqual(victim.read_bytes(), b"precious")


class StreamResumeTests(Case):
    """One source: FETCH from the bytes held."""

    @defer.inlineCallbacks
    def test_cut_then_resumed_from_another_owner(self):
        body = body_of(5 * MiB + 17)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        dying = Behaviour("f.bin", body, die_after=2 * MiB)
        with self.assertRaises(DownloadFailed):
            yield deadline(self.fetch(self.peers.add(dying), expected))
        self.assertFalse(self.dest.exists())
        self.assertEqual(self.files(), [".out.bin.p2p-part", ".out.bin.p2p-part.json"])
        state = json.loads(paths(self.dest)[1].read_text())
        self.assertEqual(state["sha256"], expected.sha256)
        self.assertEqual(state["prefix"], 2 * MiB)
        other = Behaviour("f.bin", body)
        got = yield deadline(self.fetch(self.peers.add(other), expected, owner="bob"))
        self.assertEqual(got, len(body))
        self.assertEqual(self.dest.read_bytes(), body)
        self.assertEqual(other.requests, [("FETCH", "f.bin", str(2 * MiB))])
        self.assertEqual(self.resumed_at(), [2 * MiB])
        self.assertEqual(self.files(), ["out.bin"])

    @defer.inlineCallbacks
    def held_after_a_cut(self, body: bytes, expected: Expected):
        """Cut a first download after 2 MiB; the bytes held, checked."""
        dying = Behaviour("f.bin", body, die_after=2 * MiB)
        port = self.peers.add(dying)
        with self.assertRaises(DownloadFailed):
            yield deadline(self.fetch(port, expected))
        self.assert_held(body, 2 * MiB)
        return port

    def assert_held(self, body: bytes, prefix: int) -> None:
        data, state = paths(self.dest)
        self.assertEqual(json.loads(state.read_text())["prefix"], prefix)
        self.assertEqual(data.read_bytes()[:prefix], body[:prefix])

    @defer.inlineCallbacks
    def test_a_peer_dropping_every_connection_leaves_the_bytes_held(self):
        # FETCH cut before its reply, then GET_FILE cut too: nothing was sent, nothing goes.
        body = body_of(5 * MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        port = yield self.held_after_a_cut(body, expected)
        with self.assertRaises(DownloadFailed):
            yield deadline(self.fetch(port, expected))
        self.assert_held(body, 2 * MiB)
        got = yield deadline(self.fetch(self.peers.add(Behaviour("f.bin", body)), expected))
        self.assertEqual(got, len(body))
        self.assertEqual(self.resumed_at(), [2 * MiB, 2 * MiB])
        self.assertEqual(self.dest.read_bytes(), body)

    @defer.inlineCallbacks
    def test_a_peer_with_a_shorter_file_leaves_the_bytes_held(self):
        # Code 3 to the FETCH from 2 MiB, then a size not the one published.
        body = body_of(5 * MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        yield self.held_after_a_cut(body, expected)
        short = Behaviour("f.bin", body[:MiB])
        with self.assertRaises(DownloadFailed):
            yield deadline(self.fetch(self.peers.add(short), expected))
        self.assertEqual(
            short.requests, [("FETCH", "f.bin", str(2 * MiB)), ("FETCH", "f.bin", "0")]
        )
        self.assert_held(body, 2 * MiB)

    @defer.inlineCallbacks
    def test_cancel_keeps_the_bytes(self):
        body = body_of(3 * MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        stalled = Behaviour("f.bin", body, stall_after=MiB)
        d = self.fetch(self.peers.add(stalled), expected)
        part = paths(self.dest)[0]

        def written() -> bool:  # (not the file's size: disk is reserved ahead of the bytes)
            with contextlib.suppress(OSError), part.open("rb") as f:
                f.seek(MiB - 16)
                return f.read(16) == body[MiB - 16 : MiB]
            return False

        yield poll_until(written, what="the first MiB written")
        d.cancel()
        with self.assertRaises(CancelledError):
            yield d
        kept = json.loads(paths(self.dest)[1].read_text())["prefix"]
        self.assertEqual(kept, MiB)
        other = Behaviour("f.bin", body)
        got = yield deadline(self.fetch(self.peers.add(other), expected))
        self.assertEqual(got, len(body))
        self.assertEqual(self.dest.read_bytes(), body)
        self.assertEqual(self.resumed_at(), [kept])
        self.assertEqual(other.requests, [("FETCH", "f.bin", str(kept))])

    @defer.inlineCallbacks
    def test_a_peer_offering_another_size_leaves_the_bytes_held(self):
        body = body_of(3 * MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        with self.assertRaises(DownloadFailed):
            yield deadline(
                self.fetch(self.peers.add(Behaviour("f.bin", body, die_after=MiB)), expected)
            )
        other = Behaviour("f.bin", body + b"more")
        with self.assertRaises(ContentMismatch):
            yield deadline(self.fetch(self.peers.add(other), expected))
        self.assertEqual(json.loads(paths(self.dest)[1].read_text())["prefix"], MiB)
        yield deadline(self.fetch(self.peers.add(Behaviour("f.bin", body)), expected))
        self.assertEqual(self.dest.read_bytes(), body)
        self.assertEqual(self.resumed_at(), [MiB, MiB])

    @defer.inlineCallbacks
    def test_a_stream_counts_only_its_prefix(self):
        body = body_of(5 * MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        key = Key(expected.sha256, len(body), "alice", "f.bin")
        partial = open_partial(self.dest, key)  # as a multi-source attempt left it
        os.pwrite(partial.fd, body[: 4 * MiB], 0)
        partial.state.piece_size, partial.state.pieces = MiB, {0, 1, 3}
        partial.save()
        partial.close()
        cut = Behaviour("f.bin", body, die_after=MiB // 2)
        with self.assertRaises(DownloadFailed):
            yield deadline(self.fetch(self.peers.add(cut), expected))
        self.assertEqual(cut.requests, [("FETCH", "f.bin", str(2 * MiB))])
        state = json.loads(paths(self.dest)[1].read_text())
        self.assertEqual((state["prefix"], state["pieces"]), (2 * MiB + MiB // 2, []))

    @defer.inlineCallbacks
    def test_nothing_received_nothing_hidden_left(self):
        body = body_of(MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        with self.assertRaises(NoSuchFile):
            yield deadline(self.fetch(self.peers.add(Behaviour("other.bin", body)), expected))
        d = self.fetch(self.peers.add(Behaviour("f.bin", body, stall_after=0)), expected)
        d.cancel()
        with self.assertRaises(CancelledError):
            yield d
        self.assertEqual(self.files(), [])

    @defer.inlineCallbacks
    def test_changed_content_is_not_mixed(self):
        old = body_of(3 * MiB, seed=1)
        new = body_of(3 * MiB, seed=2)
        dying = Behaviour("f.bin", old, die_after=MiB)
        old_expected = Expected(len(old), hashlib.sha256(old).hexdigest())
        with self.assertRaises(DownloadFailed):
            yield deadline(self.fetch(self.peers.add(dying), old_expected))
        fresh = Behaviour("f.bin", new)
        new_expected = Expected(len(new), hashlib.sha256(new).hexdigest())
        yield deadline(self.fetch(self.peers.add(fresh), new_expected))
        self.assertEqual(self.dest.read_bytes(), new)
        self.assertEqual(fresh.requests, [("FETCH", "f.bin", "0")])
        self.assertEqual(self.resumed_at(), [])

    @defer.inlineCallbacks
    def test_held_bytes_that_are_wrong_fail_the_hash_and_go(self):
        body = body_of(2 * MiB)
        expected = Expected(len(body), hashlib.sha256(body).hexdigest())
        with self.assertRaises(DownloadFailed):
            yield deadline(
                self.fetch(self.peers.add(Behaviour("f.bin", body, die_after=MiB)), expected)
            )
        data = paths(self.dest)[0]
        with data.open("r+b") as f:  # someone scribbled on the partial file
            f.write(b"garbage")
        with self.assertRaises(ContentMismatch):
            yield deadline(self.fetch(self.peers.add(Behaviour("f.bin", body)), expected))
        self.assertEqual(self.files(), [])  # nothing wrong is kept, not even hidden

    @defer.inlineCallbacks
    def test_without_a_hash_same_owner_name_and_size(self):
        body = body_of(3 * MiB)
        with self.assertRaises(DownloadFailed):
            yield deadline(
                self.fetch(self.peers.add(Behaviour("f.bin", body, die_after=MiB)), None)
            )
        again = Behaviour("f.bin", body)
        yield deadline(self.fetch(self.peers.add(again), None))
        self.assertEqual(again.requests, [("FETCH", "f.bin", str(MiB))])
        self.assertEqual(self.dest.read_bytes(), body)
        # Another size at the same owner and name: other content, fetched from 0.
        self.dest.unlink()
        with self.assertRaises(DownloadFailed):
            yield deadline(
                self.fetch(self.peers.add(Behaviour("f.bin", body, die_after=MiB)), None)
            )
        longer = Behaviour("f.bin", body + b"more")
        yield deadline(self.fetch(self.peers.add(longer), None))
        self.assertEqual(longer.requests, [("FETCH", "f.bin", str(MiB)), ("FETCH", "f.bin", "0")])
        self.assertEqual(self.dest.read_bytes(), body + b"more")


class HungUpConnectionTests(TestCase):
    """A request's connection hung up while it was still connecting."""

    def test_it_says_nothing_and_closes_once_connected(self):
        from twisted.internet.testing import StringTransport

        clock = task.Clock()
        told: list[str] = []

        class Events:
            def connected(self) -> None:
                told.append("connected")

        client = single._PeerClient(Events(), b"RANGE\x00f.bin\x000\x001\x00", 1.0, clock)
        client.hang_up()  # (the download ended; the attempt's cancel came too late)
        transport = StringTransport()
        client.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])  # no silence timer left running
        self.assertEqual(told, [])


class SwarmTests(Case):
    """Several sources: PIECES, then RANGEs in parallel, every piece checked."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(swarm, "STALL", 1.0)
        self.body = body_of(24 * MiB + 12345)
        self.expected = Expected(len(self.body), hashlib.sha256(self.body).hexdigest())

    def many(self, named: Behaviour, *others: tuple[str, Behaviour]):
        return self.fetch(
            self.peers.add(named),
            self.expected,
            sources=[self.source(owner, how) for owner, how in others],
        )

    def ranges(self, how: Behaviour) -> int:
        return sum(1 for r in how.requests if r[0] == "RANGE")

    @defer.inlineCallbacks
    def test_three_sources_share_the_work(self):
        a, b, c = (Behaviour("f.bin", self.body) for _ in range(3))
        got = yield deadline(self.many(a, ("bob", b), ("carol", c)))
        self.assertEqual(got, len(self.body))
        self.assertEqual(self.dest.read_bytes(), self.body)
        for how in (a, b, c):
            self.assertEqual(how.requests[0], ("PIECES", "f.bin"))
            self.assertGreater(self.ranges(how), 0)
        self.assertEqual(self.files(), ["out.bin"])

    @defer.inlineCallbacks
    def no_descriptor_after(self, flags: int, allowed: int):
        """A download whose thread descriptors opened with ``flags`` fail after
        ``allowed`` of them (too many open files): it fails, it does not hang."""
        opened = [0]
        another = single._PartFile.another

        def failing(part, how: int = os.O_RDONLY) -> int:
            if how == flags:
                opened[0] += 1
                if opened[0] > allowed:
                    raise OSError(errno.EMFILE, "Too many open files")
            return another(part, how)

        self.patch(single._PartFile, "another", failing)
        a, b = (Behaviour("f.bin", self.body) for _ in range(2))
        with self.assertRaises(DownloadFailed) as failed:
            yield deadline(self.many(a, ("bob", b)))
        self.assertIn("Too many open files", str(failed.exception))
        self.assertGreater(opened[0], allowed)

    def test_no_descriptor_to_check_the_pieces_held(self):
        return self.no_descriptor_after(os.O_RDONLY, 0)

    def test_no_descriptor_to_write_a_piece(self):
        return self.no_descriptor_after(os.O_WRONLY, 2)

    def test_no_descriptor_to_hash_the_pieces(self):
        return self.no_descriptor_after(os.O_RDONLY, 1)

    @defer.inlineCallbacks
    def test_a_second_end_while_a_piece_is_written_keeps_the_first(self):
        # The download fails (no descriptor for a second piece) while the first
        # piece's write is held in its thread; then it is cancelled too. Once the
        # write ends, the first end still runs: pieces saved, the file let go.
        write_held = threading.Event()
        check_and_write = swarm._check_and_write

        def held_write(*args):
            write_held.wait(30)
            return check_and_write(*args)

        self.patch(swarm, "_check_and_write", held_write)
        self.addCleanup(write_held.set)
        opened = [0]
        another = single._PartFile.another

        def failing(part, how: int = os.O_RDONLY) -> int:
            if how == os.O_WRONLY:
                opened[0] += 1
                if opened[0] > 1:
                    raise OSError(errno.EMFILE, "Too many open files")
            return another(part, how)

        self.patch(single._PartFile, "another", failing)
        a, b = (Behaviour("f.bin", self.body) for _ in range(2))
        d = self.many(a, ("bob", b))
        d.addErrback(lambda _: None)
        yield poll_until(lambda: opened[0] > 1, what="a second piece refused")
        d.cancel()
        write_held.set()

        def let_go() -> bool:
            try:
                partial = open_partial(
                    self.dest, Key(self.expected.sha256, len(self.body), "a", "f")
                )
            except OSError:
                return False
            partial.close()
            return True

        yield poll_until(let_go, what="the partial file let go")

    @defer.inlineCallbacks
    def test_the_disk_is_reserved_a_step_at_a_time(self):
        # (not the whole 24 MiB at once on the reactor: posix_fallocate may write every block)
        grown: list[int] = []
        fallocate = os.posix_fallocate

        def counted(fd: int, offset: int, length: int) -> None:
            grown.append(length)
            fallocate(fd, offset, length)

        self.patch(os, "posix_fallocate", counted)
        a, b = (Behaviour("f.bin", self.body) for _ in range(2))
        limits = Limits(reserve_step=2 * MiB)
        got = yield deadline(
            self.fetch(
                self.peers.add(a), self.expected, sources=[self.source("bob", b)], limits=limits
            )
        )
        self.assertEqual(got, len(self.body))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertGreater(len(grown), 1)
        # A step at a time past the furthest piece received: ranges go out lowest first,
        # so that piece is at most the ranges in flight (2 sources x PER_SOURCE x
        # CHUNK_PIECES pieces) past the reservation; never the whole file in one call.
        window = 2 * swarm.PER_SOURCE * swarm.CHUNK_PIECES * MiB
        self.assertLessEqual(max(grown), limits.reserve_step + window)
        self.assertLess(limits.reserve_step + window, len(self.body))  # (so this can fail)

    @defer.inlineCallbacks
    def test_pieces_waiting_for_their_check_are_bounded(self):
        # A check (or disk) slower than the network: the pieces' checks go to a
        # "thread pool" this test runs only when told. However fast the sources
        # send, at most MAX_CHECKING pieces (their bytes) wait: no new range goes
        # out and every connection stops reading. A paused source is not silent
        # (its timer stops): its clock runs on meanwhile, and no source is dropped.
        held: list[tuple[object, tuple, Deferred]] = []
        waiting = {"now": 0, "most": 0}
        released = [False]
        in_thread = swarm.in_thread

        def controlled(reactor_, f, *args) -> Deferred:
            if f is not swarm._check_and_write:
                return in_thread(reactor_, f, *args)
            waiting["now"] += 1
            waiting["most"] = max(waiting["most"], waiting["now"])
            d: Deferred = Deferred()

            def done(result):
                waiting["now"] -= 1
                return result

            d.addBoth(done)
            if released[0]:
                in_thread(reactor_, f, *args).chainDeferred(d)
            else:
                held.append((f, args, d))
            return d

        self.patch(swarm, "in_thread", controlled)
        a, b = (Behaviour("f.bin", self.body) for _ in range(2))
        sources = [self.source("alice", a), self.source("bob", b)]
        s = swarm._Swarm(
            sources, self.dest, self.expected, None, reactor, 5.0, None, self.notes.append
        )
        s.clock = task.Clock()
        done = s.start()

        def settled() -> bool:
            """Past the bound, or stopped at it: every request paused."""
            if waiting["now"] > swarm.MAX_CHECKING:
                return True
            fetches = [f for p in s.peers for f in p.fetches]
            return (
                waiting["now"] == swarm.MAX_CHECKING
                and bool(fetches)
                and all(getattr(f, "paused", False) for f in fetches)
            )

        yield poll_until(settled, what="the swarm held at its bound")
        self.assertEqual(waiting["most"], swarm.MAX_CHECKING)
        self.assertLess(swarm.MAX_CHECKING, s.count)  # (so this can fail)
        s.clock.advance(swarm.STALL * 10)
        self.assertEqual([p.source.owner for p in s.peers if p.dropped], [])
        released[0] = True
        for f, args, d in held:
            in_thread(reactor, f, *args).chainDeferred(d)
        got = yield deadline(done)
        self.assertEqual(got, len(self.body))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertEqual(waiting["most"], swarm.MAX_CHECKING)
        self.assertEqual(self.files(), ["out.bin"])
        self.assertEqual([n for n in self.notes if "sent nothing" in n], [])

    @defer.inlineCallbacks
    def test_a_dying_and_a_lying_source(self):
        altered = bytearray(self.body)
        for i in range(0, len(altered), 4 * MiB):
            altered[i + 100] ^= 0xFF
        honest = Behaviour("f.bin", self.body)
        dying = Behaviour("f.bin", self.body, die_after=3 * MiB)
        lying = Behaviour("f.bin", self.body, served=bytes(altered))
        got = yield deadline(self.many(honest, ("bob", dying), ("carol", lying)))
        self.assertEqual(got, len(self.body))
        self.assertEqual(self.dest.read_bytes(), self.body)
        said = "\n".join(self.notes)
        self.assertIn("source carol", said)
        self.assertIn("wrong digest", said)
        self.assertIn("source bob", said)

    @defer.inlineCallbacks
    def test_a_stalled_source_loses_its_ranges(self):
        honest = Behaviour("f.bin", self.body)
        stalled = Behaviour("f.bin", self.body, stall_after=1000)
        got = yield deadline(
            self.many(honest, ("bob", stalled), ("carol", Behaviour("f.bin", self.body)))
        )
        self.assertEqual(got, len(self.body))
        self.assertEqual(self.dest.read_bytes(), self.body)
        # Its ranges came from the others: dropped as stalled, or asked again at the end.
        self.assertGreater(self.ranges(stalled), 0)

    @defer.inlineCallbacks
    def test_a_busy_answer_means_fewer_requests_at_once_not_a_dropped_source(self):
        a = Behaviour("f.bin", self.body)
        one_at_a_time = Behaviour("f.bin", self.body, max_uploads=1)
        yield deadline(self.many(a, ("bob", one_at_a_time)))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertGreater(one_at_a_time.busy, 0)  # it did answer 4
        self.assertNotIn("source bob", "\n".join(self.notes))
        self.assertGreater(self.ranges(one_at_a_time) - one_at_a_time.busy, 1)

    @defer.inlineCallbacks
    def test_a_source_with_another_piece_list_is_not_used(self):
        wrong = bytearray(digests(self.body))
        wrong[5] ^= 1
        other = Behaviour("f.bin", self.body, pieces=bytes(wrong))
        a, c = Behaviour("f.bin", self.body), Behaviour("f.bin", self.body)
        yield deadline(self.many(a, ("bob", other), ("carol", c)))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertEqual(self.ranges(other), 0)
        self.assertIn("other piece digests", "\n".join(self.notes))

    @defer.inlineCallbacks
    def test_a_source_announcing_another_piece_size_is_not_used(self):
        # A piece size of 1 would have us take 32 bytes of "digests" per byte of file:
        # refused from the header, before any digest is held.
        tiny = Behaviour("f.bin", self.body, piece=1, pieces=bytes(64 * 1024))
        a, c = Behaviour("f.bin", self.body), Behaviour("f.bin", self.body)
        yield deadline(self.many(a, ("bob", tiny), ("carol", c)))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertEqual(self.ranges(tiny), 0)
        self.assertIn("lists pieces of 1 bytes", "\n".join(self.notes))

    @defer.inlineCallbacks
    def test_old_peers_without_ranges_mean_one_stream(self):
        a = Behaviour("f.bin", self.body)
        old = Behaviour("f.bin", self.body, classic=True)
        yield deadline(self.many(a, ("bob", old)))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertEqual([r[0] for r in a.requests], ["PIECES", "FETCH"])

    @defer.inlineCallbacks
    def test_every_source_dying_keeps_the_checked_pieces_for_the_next_attempt(self):
        first = [Behaviour("f.bin", self.body, die_after=5 * MiB) for _ in range(3)]
        with self.assertRaises(DownloadFailed):
            yield deadline(self.many(first[0], ("bob", first[1]), ("carol", first[2])))
        self.assertFalse(self.dest.exists())
        state = json.loads(paths(self.dest)[1].read_text())
        self.assertGreater(len(state["pieces"]), 0)
        held = sum(min(MiB, len(self.body) - i * MiB) for i in state["pieces"])
        second = [Behaviour("f.bin", self.body) for _ in range(3)]
        yield deadline(self.many(second[0], ("bob", second[1]), ("carol", second[2])))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertEqual(self.resumed_at(), [held])
        asked = sum(int(r[3]) for how in second for r in how.requests if r[0] == "RANGE")
        self.assertLessEqual(asked, len(self.body) - held + 4 * MiB)  # (end game: a range twice)

    @defer.inlineCallbacks
    def test_a_streamed_prefix_is_checked_then_used(self):
        with self.assertRaises(DownloadFailed):
            yield deadline(
                self.fetch(
                    self.peers.add(Behaviour("f.bin", self.body, die_after=6 * MiB + 5)),
                    self.expected,
                )
            )
        a, b = Behaviour("f.bin", self.body), Behaviour("f.bin", self.body)
        yield deadline(self.many(a, ("bob", b)))
        self.assertEqual(self.dest.read_bytes(), self.body)
        self.assertEqual(self.resumed_at(), [6 * MiB])
        offsets = [int(r[2]) for how in (a, b) for r in how.requests if r[0] == "RANGE"]
        self.assertGreaterEqual(min(offsets), 6 * MiB)
