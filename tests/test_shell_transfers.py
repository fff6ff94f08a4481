"""Downloads as transfers: in the background (a terminal's shell), DOWNLOADS with
progress, rate, time left or stalled, CANCEL, QUIT saying what it cancels; and the
meter behind the progress (a recent rate, stalled after a silence).

The shell runs over the real indexer in memory (``tests.test_client_shell``) with
a fake download whose progress and end the test drives, on a memory clock.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from p2p.client.progress import Meter
from tests.test_client_shell import ShellTestCase


class _Download:
    """One fake download: its progress callback and the Deferred the test fires."""

    def __init__(self, destination: Path, progress) -> None:
        self.destination = destination
        self.progress = progress
        self.cancelled = False
        self.result: Deferred = Deferred(self._cancel)

    def _cancel(self, _d: Deferred) -> None:
        self.cancelled = True


class TransferTestCase(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.running: list[_Download] = []

        def download(host, port, name, destination, progress=None, **_kw):
            self.running.append(_Download(Path(destination), progress))
            return self.running[-1].result

        self.shell.transfers.download = download
        self.connect()
        self.assertEqual(self.indexer.other("REGISTER", "bob"), 0)
        self.assertEqual(self.indexer.other("CONNECT", "bob", 5555, peer="10.0.0.2"), 0)


class BackgroundTests(TransferTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.shell.background = True

    def test_get_file_returns_at_once_and_prints_its_result_when_it_ends(self) -> None:
        self.assertEqual(self.send("GET_FILE bob a.bin a.bin"), [])
        self.assertFalse(self.shell.busy)
        # The next command answers while the download runs.
        self.assertEqual(self.send("LIST_USERS")[0], "c> LIST_USERS OK")
        self.running[0].progress(10, 10)
        self.running[0].result.callback(10)
        self.assertEqual(self.output.lines[-1], "c> GET_FILE OK")
        self.assertEqual(self.shell.transfers.running, {})

    def test_downloads_shows_progress_rate_time_left_then_stalled(self) -> None:
        self.send("GET_FILE bob a.bin a.bin", "GET_FILE bob b.bin b.bin")
        first, second = self.running
        first.progress(0, 4000)
        self.reactor.advance(1)
        first.progress(1000, 4000)
        self.assertEqual(
            self.send("DOWNLOADS"),
            [
                "c> DOWNLOADS OK",
                "\t[1] a.bin from bob   25%  1000 B / 3.9 KiB  1000 B/s  0:03 left",
                "\t[2] b.bin from bob  0 B  0 B/s",
            ],
        )
        # No byte for a while: stalled, and for how long, instead of a stale rate.
        self.reactor.advance(6)
        self.assertEqual(
            self.send("DOWNLOADS")[1], "\t[1] a.bin from bob   25%  1000 B / 3.9 KiB  stalled 0:06"
        )
        first.progress(2000, 4000)
        self.assertNotIn("stalled", self.send("DOWNLOADS")[1])
        self.assertEqual(second.destination, Path("b.bin"))

    def test_a_transfer_still_asking_the_indexer(self) -> None:
        held = self.indexer.hold("LIST_PEERS")
        self.send("GET_FILE bob a.bin a.bin")
        self.assertEqual(
            self.send("DOWNLOADS"), ["c> DOWNLOADS OK", "\t[1] a.bin from bob  asking the indexer"]
        )
        # Cancelled then: the question to the indexer is left to finish (cutting it
        # would cut the connection that holds the lease), the download never starts.
        self.assertEqual(self.send("CANCEL 1"), ["c> CANCEL OK"])
        self.assertFalse(held.called, "the question to the indexer was left to finish")
        held.callback(None)
        self.assertEqual(self.running, [])
        self.assertEqual(self.output.lines[-1], "c> GET_FILE FAIL")

    def test_cancel(self) -> None:
        self.send("GET_FILE bob a.bin a.bin", "GET_FILE bob b.bin b.bin")
        self.assertEqual(self.send("CANCEL 2"), ["c> GET_FILE FAIL", "c> CANCEL OK"])
        self.assertEqual([d.cancelled for d in self.running], [False, True])
        cancelled = (
            "GET_FILE: download 2 (b.bin from bob) cancelled; what arrived stays hidden beside "
            "the destination for the next GET_FILE of the same content to continue"
        )
        self.assertEqual(self.output.notes[-1], cancelled)
        self.assertFalse([note for note in self.output.notes if "CancelledError" in note])
        self.assertEqual(list(self.shell.transfers.running), [1])
        for gone in ("2", "3", "x", "-1"):
            self.assertEqual(self.send(f"CANCEL {gone}"), ["c> CANCEL FAIL, NO SUCH DOWNLOAD"])
        self.assertEqual(self.send("CANCEL"), ["Syntax error. Usage: CANCEL <n>"])
        self.running[0].result.callback(3)
        self.assertEqual(self.output.lines[-1], "c> GET_FILE OK")
        self.assertEqual(self.send("DOWNLOADS"), ["c> DOWNLOADS OK"])

    def test_a_finished_download_says_size_time_and_where(self) -> None:
        self.send("GET_FILE bob a.bin a.bin")
        self.reactor.advance(75)
        self.running[0].result.callback(3 * 1024 * 1024)
        saved = [note for note in self.output.notes if "saved as" in note]
        self.assertEqual(
            saved,
            [
                "GET_FILE: a.bin from bob: 3.0 MiB (3145728 bytes) in 1:15, saved as "
                f"{Path('a.bin').resolve()}"
            ],
        )

    def test_quit_says_how_many_run_and_cancels_them(self) -> None:
        self.send("GET_FILE bob a.bin a.bin", "GET_FILE bob b.bin b.bin")
        self.send("QUIT")
        self.assertIn("quitting with 2 downloads running: cancelled", self.output.notes)
        self.assertEqual([d.cancelled for d in self.running], [True, True])
        self.assertEqual(self.output.lines[-2:], ["c> GET_FILE FAIL"] * 2)
        self.assertTrue(self.shell.ended.called)


class ScriptTests(TransferTestCase):
    """Not in the background (stdin not a terminal): each GET_FILE ends first."""

    def test_the_next_line_waits_for_the_download(self) -> None:
        self.send("GET_FILE bob a.bin a.bin", "DOWNLOADS", "CANCEL 1")
        self.assertTrue(self.shell.busy)
        self.assertEqual(self.output.lines, ["c> CONNECT OK"])
        self.running[0].result.callback(3)
        self.assertEqual(
            self.output.lines[1:],
            ["c> GET_FILE OK", "c> DOWNLOADS OK", "c> CANCEL FAIL, NO SUCH DOWNLOAD"],
        )


class MeterTests(TestCase):
    def test_the_rate_is_recent(self) -> None:
        meter = Meter(0.0, 1000, window=5.0, stall_after=5.0)
        for second in range(1, 11):
            meter.update(second * 50, None, float(second))  # 50 B/s for 10 s
        meter.update(600, None, 11.0)  # 100 B in the last second
        # Over the last 5 s (6..11): 300 B in 5 s, not 600 B in 11 s.
        self.assertAlmostEqual(meter.rate(11.0), 60.0)
        self.assertAlmostEqual(meter.left(11.0), 400 / 60.0)

    def test_stalled_after_a_silence(self) -> None:
        meter = Meter(0.0, 100, stall_after=5.0)
        meter.update(40, None, 1.0)
        self.assertIsNone(meter.stalled_for(5.9))
        meter.update(40, None, 3.0)  # progress reported, but no new byte
        self.assertEqual(meter.stalled_for(6.0), 5.0)
        self.assertEqual(meter.rate(6.0), 0.0)
        self.assertIsNone(meter.left(6.0))
        self.assertEqual(meter.describe(6.0), [" 40%", "40 B / 100 B", "stalled 0:05"])
        meter.update(41, None, 7.0)
        self.assertIsNone(meter.stalled_for(7.0))


class OverwriteTests(TransferTestCase):
    """No existing file is replaced without a word."""

    def setUp(self) -> None:
        super().setUp()
        self.inbox = Path(self.mktemp()).resolve()
        self.inbox.mkdir()
        (self.inbox / "a.bin").write_bytes(b"precious")

    def test_a_script_needs_force(self) -> None:
        self.assertEqual(self.send(f"GET_FILE bob a.bin {self.inbox}"), ["c> GET_FILE FAIL"])
        self.assertIn(
            f"GET_FILE: {self.inbox / 'a.bin'} exists; add --force", self.output.notes[-1]
        )
        self.assertEqual(self.running, [])
        self.assertEqual(self.indexer.requests, [], "refused before asking anyone")
        self.send(f"GET_FILE --force bob a.bin {self.inbox}")
        self.assertEqual(self.running[0].destination, self.inbox / "a.bin")

    def test_a_terminal_asks(self) -> None:
        questions: list[str] = []
        answers: list[Deferred] = []

        def confirm(question: str) -> Deferred:
            questions.append(question)
            answers.append(Deferred())
            return answers[-1]

        self.shell.confirm = confirm
        self.shell.background = True
        self.send(f"GET_FILE bob a.bin {self.inbox / 'a.bin'}")
        self.assertEqual(questions, [f"{self.inbox / 'a.bin'} exists. Replace it? [y/N] "])
        self.assertTrue(self.shell.busy, "the prompt waits for the answer")
        answers[0].callback("")
        self.assertEqual(self.output.lines[-1], "c> GET_FILE FAIL")
        self.assertEqual(self.running, [])
        self.send(f"GET_FILE bob a.bin {self.inbox}")
        answers[1].callback(" Yes ")
        self.assertFalse(self.shell.busy)
        self.assertEqual(self.running[0].destination, self.inbox / "a.bin")

    def test_a_file_being_downloaded_there_counts_as_existing(self) -> None:
        """Two GET_FILEs to one local name: the second is asked about (here refused,
        in a script), not left to replace the first's file silently."""
        self.shell.background = True
        self.send(f"GET_FILE bob b.bin {self.inbox / 'b.bin'}")
        self.shell.background = False
        self.assertEqual(
            self.send(f"GET_FILE bob c.bin {self.inbox / 'b.bin'}"), ["c> GET_FILE FAIL"]
        )
        self.assertIn("exists; add --force", self.output.notes[-1])
        self.assertEqual(len(self.running), 1)

    def test_without_a_local_name_the_remote_base_name(self) -> None:
        self.send("GET_FILE bob dir/b.bin")
        self.assertEqual(self.running[0].destination, Path("b.bin"))
