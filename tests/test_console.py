"""Operator lines reach the real stdout as UTF-8, whatever the locale says."""

import io
import sys

from twisted.trial.unittest import TestCase

from p2p.console import say


class SayTests(TestCase):
    def test_utf8_whatever_the_encoding(self):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii")
        self.patch(sys, "__stdout__", stream)
        say("s> REGISTER FROM zoë")
        self.assertEqual(raw.getvalue(), "s> REGISTER FROM zoë\n".encode())

    def test_surrogates_do_not_lose_the_line(self):
        raw = io.BytesIO()
        self.patch(sys, "__stdout__", io.TextIOWrapper(raw, encoding="utf-8"))
        say("s> bad \udcff name")
        self.assertEqual(raw.getvalue(), b"s> bad \\udcff name\n")

    def test_closed_stdout_is_ignored(self):
        stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        stream.close()
        self.patch(sys, "__stdout__", stream)
        say("s> nobody listens")  # no exception
