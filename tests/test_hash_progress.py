"""PUBLISH of a large file shows its hashing: nothing for a quick one, a note after a
second and then every ten (or a bar where stdout shows progress), and a last figure.

The hashing thread is replaced by a Deferred the test fires, the clock by a fake
one: the notes come from the reactor while the hash is pending.
"""

from __future__ import annotations

import hashlib
import io

from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from p2p.client.hash_progress import HashProgress
from tests.test_client_shell import FakeOutput, ShellTestCase

MIB = 1024 * 1024


class _BarOutput(FakeOutput):
    def __init__(self) -> None:
        super().__init__()
        self.stream = io.StringIO()

    def progress_stream(self):
        return self.stream


class HashProgressTests(TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.output = FakeOutput()

    def test_a_quick_hash_shows_nothing(self) -> None:
        shown = HashProgress(self.output, "a.txt", 10, self.clock)
        self.clock.advance(0.9)
        shown.read(10)
        self.assertEqual(shown.end("result"), "result")
        self.clock.advance(5)
        self.assertEqual(self.output.notes, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_notes_then_the_figure(self) -> None:
        size = 4 * 1024**3
        shown = HashProgress(self.output, "big film.mkv", size, self.clock)
        self.clock.advance(1)
        self.assertEqual(len(self.output.notes), 1)
        self.assertIn('hashing "big film.mkv" (4.0 GiB)', self.output.notes[0])
        shown.read(size // 4)
        self.clock.pump([0.25] * 40)  # 10 s
        self.assertEqual(
            self.output.notes[1:], ['PUBLISH: hashing "big film.mkv": 25% (1.0 GiB of 4.0 GiB)']
        )
        shown.read(size)
        self.clock.advance(5)
        shown.end()
        self.assertEqual(
            self.output.notes[-1], 'PUBLISH: hashed "big film.mkv": 4.0 GiB in 0:16 (256.0 MiB/s)'
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_bar_where_stdout_shows_progress(self) -> None:
        output = _BarOutput()
        shown = HashProgress(output, "big", 1000, self.clock)
        self.clock.advance(1)
        shown.read(420)
        self.clock.advance(0.25)
        self.assertIn("hashing big", output.stream.getvalue())
        self.assertIn("42%", output.stream.getvalue())
        self.assertEqual(output.notes, [])
        shown.read(1000)
        shown.end()
        self.assertTrue(output.stream.getvalue().endswith("\r"), "the bar is erased")
        self.assertEqual(len(output.notes), 1)
        self.assertIn("hashed big: 1000 B in", output.notes[0])


class PublishShowsHashingTests(ShellTestCase):
    def test_publish_of_a_slow_file(self) -> None:
        (self.share / "film.bin").write_bytes(b"x" * 5000)
        self.connect()
        self.output.notes.clear()
        content = self.shell.session.content
        pending: list[tuple] = []

        def later(f, *args):
            d = defer.Deferred()
            pending.append((d, f, args))
            return d

        content.run_in_thread = later
        self.assertEqual(self.send("PUBLISH film.bin a film"), [])
        [(d, f, args)] = pending
        progress = args[-1]
        self.reactor.advance(1)
        self.assertEqual(len(self.output.notes), 1, self.output.notes)
        self.assertIn("hashing film.bin", self.output.notes[0])
        progress(2500)
        self.reactor.pump([0.25] * 40)
        self.assertIn("50%", self.output.notes[-1])
        d.callback(f(*args))
        self.assertIn("hashed film.bin: 4.9 KiB in 0:11", self.output.notes[-1])
        self.assertEqual(self.output.lines[-1], "c> PUBLISH OK")


class PiecesAtConnectTests(ShellTestCase):
    """CONNECT computes, in the thread, the piece digests its published files lack."""

    def test_missing_digests_are_computed_again_at_connect(self) -> None:
        data = bytes(range(256)) * 5000
        (self.share / "film.bin").write_bytes(data)
        (self.share / "changed.txt").write_bytes(b"one")
        self.connect()
        self.assertEqual(self.send("PUBLISH film.bin a film"), ["c> PUBLISH OK"])
        self.assertEqual(self.send("PUBLISH changed.txt text"), ["c> PUBLISH OK"])
        kept = self.home.pieces_dir / hashlib.sha256(data).hexdigest()
        other = self.home.pieces_dir / hashlib.sha256(b"one").hexdigest()
        pieces = hashlib.sha256(data[:MIB]).digest() + hashlib.sha256(data[MIB:]).digest()
        self.assertEqual(kept.read_bytes(), pieces)
        kept.unlink()
        other.unlink()
        (self.share / "changed.txt").write_bytes(b"two")  # no longer what was published
        self.assertEqual(self.send("DISCONNECT alice"), ["c> DISCONNECT OK"])
        self.assertEqual(self.send("CONNECT alice"), ["c> CONNECT OK"])
        self.successResultOf(self.shell.session.pieces_ready)
        self.assertEqual(kept.read_bytes(), pieces)
        self.assertFalse(other.exists(), "a changed file is not read for its old content")
