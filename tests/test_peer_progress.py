"""The download progress bar: what it shows, how often it redraws, how it clears."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from p2p.client.progress import ProgressBar, human_bytes, human_duration


class ProgressBarTests(TestCase):
    def setUp(self) -> None:
        self.stream = io.StringIO()
        self.clock = Clock()
        self.clock.advance(100)

    def bar(self, total: int | None) -> ProgressBar:
        return ProgressBar(self.stream, total, "file.bin", clock=self.clock.seconds)

    def test_known_total(self) -> None:
        bar = self.bar(100 * 1024 * 1024)
        self.clock.advance(2)
        bar.update(50 * 1024 * 1024)
        line = self.stream.getvalue()
        self.assertTrue(line.startswith("\rfile.bin"))
        self.assertIn("50%", line)
        self.assertIn("50.0 MiB / 100.0 MiB", line)
        self.assertIn("25.0 MiB/s", line)
        self.assertIn("0:02 left", line)
        self.assertNotIn("\n", line)

    def test_unknown_total(self) -> None:
        bar = self.bar(None)
        self.clock.advance(1)
        bar.update(2048)
        line = self.stream.getvalue()
        self.assertIn("2.0 KiB", line)
        self.assertIn("2.0 KiB/s", line)
        self.assertNotIn("left", line)
        self.assertNotIn("%", line)

    def test_at_most_ten_redraws_a_second(self) -> None:
        bar = self.bar(1000)
        for i in range(100):
            self.clock.advance(0.01)  # 100 updates over one second
            bar.update(i * 10)
        self.assertLessEqual(self.stream.getvalue().count("\r"), 11)
        self.assertGreaterEqual(self.stream.getvalue().count("\r"), 9)

    def test_finish_clears_the_line(self) -> None:
        bar = self.bar(10)
        bar.update(5)
        drawn = self.stream.getvalue()
        bar.finish()
        cleared = self.stream.getvalue()[len(drawn) :]
        self.assertEqual(cleared, "\r" + " " * (len(drawn) - 1) + "\r")

    def test_finish_without_drawing_writes_nothing(self) -> None:
        self.bar(10).finish()
        self.assertEqual(self.stream.getvalue(), "")

    def test_shorter_line_overwrites_longer(self) -> None:
        bar = self.bar(None)
        self.clock.advance(1)
        bar.update(1024**3)
        first = self.stream.getvalue()
        bar.label = "x"
        self.clock.advance(1)
        bar.update(1024**3)
        second = self.stream.getvalue()[len(first) :]
        self.assertEqual(len(second), len(first))  # padded with spaces

    def test_human_units(self) -> None:
        self.assertEqual(human_bytes(0), "0 B")
        self.assertEqual(human_bytes(1536), "1.5 KiB")
        self.assertEqual(human_bytes(3 * 1024**3), "3.0 GiB")
        self.assertEqual(human_duration(75), "1:15")
        self.assertEqual(human_duration(3725), "1:02:05")
