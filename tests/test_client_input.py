"""Odd input to a piped shell: every syntax error, line endings, spacing, bytes
that are not UTF-8, over-long lines, Unicode names. The whole script goes in at
once and the complete stdout is compared, so nothing unexpected slips in.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p.client import commands
from p2p.client.frontends import PipeInput
from tests.support import deadline
from tests.test_client_interop import InteropTestCase


class ScriptTests(InteropTestCase):
    @defer.inlineCallbacks
    def run_script(self, script: bytes, name: str = "alice"):
        """Feed ``script`` on stdin, close it, fire with (stdout lines, stderr lines)."""
        shell = self.shell(name)
        shell.proc.write(script)
        shell.proc.close_stdin()
        code = yield deadline(shell.proc.ended)
        self.assertEqual(code, 0, shell.proc.output())
        return shell.proc.lines, shell.proc.errlines

    @defer.inlineCallbacks
    def test_syntax_errors_too_few_and_too_many(self):
        script, expected = [], []
        for spec in commands.COMMANDS.values():
            usage = f"Syntax error. Usage: {spec.usage}"
            if spec.reads is not None:  # its own reader (SEARCH: options, any number of words)
                script.append(spec.name)
                expected.append(usage)
                continue
            if spec.params:  # too few
                script.append(" ".join([spec.name, *("a" * (len(spec.params) - 1))]))
                expected.append(usage)
            if not spec.rest:  # too many (PUBLISH's description takes the rest)
                script.append(" ".join([spec.name, *("a" * len(spec.params)), "extra"]))
                expected.append(usage)
        lines, _err = yield self.run_script("\n".join(script).encode() + b"\n")
        self.assertEqual(lines, expected)
        self.assertEqual(self.indexer.requests, [])  # nothing was sent

    @defer.inlineCallbacks
    def test_spacing_line_endings_and_case(self):
        script = (
            b"\n"  # an empty line: nothing
            b"   \t  \r\n"  # only blanks: nothing
            b"rEgIsTeR alice\r\n"  # Windows line ending, mixed case
            b"  CONNECT\talice  \r\n"  # tab between words, spaces around
            b"\tpublish  f.txt \t a  description\twith tabs  \r\n"
            b"LIST_CONTENT alice\r\n"
            b"DELETE f.txt"  # last line without a newline still runs
        )
        lines, _err = yield self.run_script(script)
        self.assertEqual(
            lines,
            [
                "c> REGISTER OK",
                "c> CONNECT OK",
                "c> PUBLISH OK",
                "c> LIST_CONTENT OK",
                '\tf.txt - "a  description\twith tabs"',
                "c> DELETE OK",
            ],
        )
        publish = [r for r in self.indexer.requests if r.startswith(b"PUBLISH")]
        self.assertTrue(publish[0].endswith(b"\0alice\0f.txt\0a  description\twith tabs\0"))

    @defer.inlineCallbacks
    def test_unicode_and_bytes_that_are_not_utf8(self):
        script = (
            "REGISTER zoë\nCONNECT zoë\nPUBLISH fïlé-☃.txt déjà vu\nLIST_CONTENT zoë\n".encode()
            + b"REGISTER bad\xff\xfename\n"  # not UTF-8: refused before sending
            + b"\xffQUIT\n"  # not a command
            + b"PUBLISH g.txt caf\xe9\n"  # a Latin-1 description: refused too
        )
        lines, err = yield self.run_script(script, "zoe")
        self.assertEqual(
            lines,
            [
                "c> REGISTER OK",
                "c> CONNECT OK",
                "c> PUBLISH OK",
                "c> LIST_CONTENT OK",
                '\tfïlé-☃.txt - "déjà vu"',
                "c> REGISTER FAIL",
                "Unknown command: \ufffdQUIT (type HELP for the list of commands)",
                "c> PUBLISH FAIL",
            ],
        )
        [publish] = [r for r in self.indexer.requests if r.startswith(b"PUBLISH")]
        self.assertIn("zoë\0fïlé-☃.txt\0déjà vu\0".encode(), publish)
        self.assertFalse(any(b"bad" in r for r in self.indexer.requests))
        self.assertEqual(sum("cannot be sent" in line for line in err), 2, err)

    @defer.inlineCallbacks
    def test_an_over_long_line_is_dropped_whole(self):
        # Longer than the limit, and its tail looks like a command: none of it may run.
        long_line = b"REGISTER " + b"x" * (200 * 1024) + b" REGISTER mallory"
        script = b"REGISTER alice\n" + long_line + b"\nREGISTER bob\n"
        lines, err = yield self.run_script(script)
        self.assertEqual(lines, ["c> REGISTER OK", "c> REGISTER OK"])
        self.assertEqual(sorted(self.indexer.users), ["alice", "bob"])
        self.assertEqual(sum("longer than" in line for line in err), 1, err)


class PipeInputTests(TestCase):
    """The line splitter alone, fed in awkward pieces."""

    def feed(self, *chunks: bytes, limit: int = 8):
        got, notes, ended = [], [], []
        proto = PipeInput(got.append, lambda: ended.append(True), notes.append)
        proto.MAX_LENGTH = limit
        for chunk in chunks:
            proto.dataReceived(chunk)
        proto.readConnectionLost()
        return got, notes, ended

    def test_over_long_lines_in_pieces(self):
        got, notes, ended = self.feed(
            b"ok\n0123", b"456789", b"ABC\nQUIT", b"\nlong long", b" tail"
        )
        self.assertEqual(got, ["ok", "QUIT"])
        self.assertEqual(len(notes), 2)
        self.assertEqual(ended, [True])

    def test_over_long_line_then_lines_in_one_piece(self):
        got, notes, _ = self.feed(b"0123456789ABC\na\r\nb\n\nc")
        self.assertEqual(got, ["a", "b", "", "c"])
        self.assertEqual(len(notes), 1)
