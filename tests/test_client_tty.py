"""The shell in a terminal (a pseudo-terminal here): the download progress bar,
and line editing over non-ASCII text.
"""

from __future__ import annotations

import fcntl
import io
import re
import struct
import sys
import termios
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from p2p.client.progress import ProgressBar, columns_of
from tests.support import deadline, poll_until, spawn
from tests.test_client_interop import ClassicIndexer

#: The prompt as drawn in the terminal (insert mode on, then ``c> ``).
PROMPT = b"\x1b[4hc> "
#: Replace mode (insert mode off).
INSERT_OFF = b"\x1b[4l"
#: One redraw of the bar: label, bar, percentage, bytes, rate and time left.
BAR = re.compile(
    r"f\.bin from slow  \[#+ *\] +\d+%  [\d.]+ KiB / 64\.0 KiB  [\d.]+ K?i?B/s  \d+:\d\d left"
)


class _TricklingPeer(protocol.Protocol):
    """Answers FETCH with 64 KiB in 16 pieces, one every 50 ms (a slow peer)."""

    SIZE = 64 * 1024
    PIECES = 16

    def dataReceived(self, data: bytes) -> None:
        if not data.startswith(b"FETCH\0") or hasattr(self, "sent"):
            return
        self.sent = 0
        self.transport.write(b"\x00%d\x00" % self.SIZE)
        self.trickle()

    def trickle(self) -> None:
        if self.sent >= self.SIZE:
            self.transport.loseConnection()
            return
        piece = self.SIZE // getattr(self.factory, "pieces", self.PIECES)
        self.transport.write(b"p" * piece)
        self.sent += piece
        self.call = reactor.callLater(0.05, self.trickle)

    def connectionLost(self, reason) -> None:
        call = getattr(self, "call", None)
        if call is not None and call.active():
            call.cancel()


class TerminalCase(TestCase):
    """A shell in a pty against a classic indexer; ``self.raw`` is all it drew."""

    def setUp(self):
        self.indexer = ClassicIndexer()
        listening = reactor.listenTCP(0, self.indexer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir()
        argv = [sys.executable, "-m", "p2p.client", "-s", "127.0.0.1", "-p", str(self.port)]
        argv += ["--wsdl", "http://127.0.0.1:1/?wsdl", "--peer-listen", "tcp:0:interface=127.0.0.1"]
        self.raw = b""
        self.proc = spawn(self, argv, cwd=self.cwd, name="tty-shell", usePTY=True)
        received = self.proc.childDataReceived

        def keep(fd, data):
            self.raw += data
            received(fd, data)

        self.proc.childDataReceived = keep

    @defer.inlineCallbacks
    def type_keys(self, keys: bytes, result: str, times: int = 1):
        """Type ``keys`` at the prompt; fire once ``result`` is on the screen ``times`` times.

        Keys wait for the first prompt: before it the terminal is still in cooked
        mode, where the kernel, not the shell, edits the line."""
        yield poll_until(lambda: PROMPT in self.raw, what="the first prompt")
        self.proc.write(keys)
        d = poll_until(lambda: self.raw.count(result.encode()) >= times, what=f"{result!r}")

        def show(failure):
            failure.trap(defer.TimeoutError)
            raise defer.TimeoutError(f"{failure.value} x{times}; the screen:\n{self.raw!r}")

        yield d.addErrback(show)

    def slow_peer(self, pieces: int = _TricklingPeer.PIECES) -> None:
        """List user ``slow``: a peer sending 64 KiB in ``pieces``, one every 50 ms."""
        factory = protocol.Factory.forProtocol(_TricklingPeer)
        factory.pieces = pieces
        peer = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(peer.stopListening)
        self.indexer.users["slow"] = {"addr": ("127.0.0.1", str(peer.getHost().port)), "files": {}}


class ProgressBarTests(TerminalCase):
    @defer.inlineCallbacks
    def test_progress_bar_then_a_clean_result_line(self):
        self.resize(80)
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        bars = yield self.download_with_a_bar()
        self.assertTrue(any(BAR.fullmatch(bar) for bar in bars), bars)
        self.assertGreater(len(bars), 2, "redrawn as bytes arrive")

    @defer.inlineCallbacks
    def download_with_a_bar(self):
        """GET_FILE from a slow peer; checks the screen; fires with the bars drawn."""
        self.slow_peer()
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        start = len(self.raw)
        yield self.type_keys(b"GET_FILE slow f.bin f.bin\r", "c> GET_FILE OK\r\n")
        shown = self.raw[start:]
        self.assertEqual((self.cwd / "f.bin").read_bytes(), b"p" * _TricklingPeer.SIZE)
        # The bar is redrawn in place (\r), never wider than the terminal.
        _echo, drawn = shown.split(b"\r\n", 1)
        # The terminal is in replace mode while the command runs (in insert mode, each
        # \r redraw would push the last one right), in insert mode again at the prompt.
        self.assertLess(
            self.raw.rfind(b"\x1b[4h", 0, start), self.raw.rfind(INSERT_OFF, 0, start + 40)
        )
        self.assertNotIn(b"\x1b[4h", drawn.split(b"c> GET_FILE OK")[0])
        yield poll_until(lambda: self.raw.endswith(PROMPT), what="the prompt, in insert mode")
        # The result line starts at the line's start, after the bar was erased.
        redraws, _after = drawn.split(b"\rc> GET_FILE OK\r\n", 1)
        bars = [seg.decode().rstrip() for seg in redraws.split(b"\r") if seg.strip()]
        self.assertEqual(redraws.split(b"\r")[-1].strip(), b"", "the bar is erased")
        self.assertLessEqual(max(map(len, bars)), 79)
        return bars

    @defer.inlineCallbacks
    def test_the_bar_fits_a_narrow_terminal(self):
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        self.resize(50)
        yield self.download_with_a_bar()
        bars = self.raw.split(b"GET_FILE slow")[-1].split(b"\r")
        self.assertLessEqual(max(len(seg.decode().rstrip()) for seg in bars), 49)
        self.assertIn("f.bin f…".encode(), self.raw)

    def resize(self, columns: int, rows: int = 24) -> None:
        """Set the pty's size, as a terminal window does."""
        fcntl.ioctl(
            self.proc.transport.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0)
        )


class BarWidthTests(TestCase):
    """The bar never reaches the terminal's last column, whatever its width."""

    def test_every_width(self):
        labels = ("f from bob", "a-rather-long-file-name-for-a-bar.tar.gz from someone")
        for label in (*labels, "日本語のとても長いファイル名です.txt from 山田"):
            for width in range(20, 140):
                stream = io.StringIO()
                clock = iter([0.0, 3.0, 3.0]).__next__
                bar = ProgressBar(stream, 10**9, label, clock=clock, columns=lambda w=width: w)
                bar.update(123456789)
                line = stream.getvalue().lstrip("\r")
                self.assertLess(columns_of(line), width, (width, line))
                if width >= 40:
                    self.assertIn("%", line)
                if width >= 120:
                    self.assertIn(label, line)
                    self.assertIn("left", line)

    def test_unknown_width_is_not_cut(self):
        bar = ProgressBar(io.StringIO(), 100, "x" * 200, columns=lambda: None)
        self.assertIn("x" * 200, bar.render())


class EditingTests(TerminalCase):
    """Cursor keys and Backspace move over characters, not UTF-8 bytes."""

    def registered(self) -> list[bytes]:
        """The user names of the REGISTER requests the indexer got, in order."""
        return [r.split(b"\0")[2] for r in self.indexer.requests if r.startswith(b"REGISTER")]

    @defer.inlineCallbacks
    def test_backspace_left_and_history_over_non_ascii(self):
        left, backspace, up, end = b"\x1b[D", b"\x7f", b"\x1b[A", b"\x1b[F"
        yield self.type_keys("REGISTER zoë".encode() + backspace + b"e\r", "c> REGISTER OK")
        yield self.type_keys("REGISTER aé".encode() + left + b"b\r", "c> REGISTER OK", 2)
        yield self.type_keys(up + backspace + b"x\r", "c> REGISTER OK", 3)
        # Wide characters take two columns: the cursor moves by two.
        start = len(self.raw)
        keys = "REGISTER 日本".encode() + left + b"x" + end + b"z\r"
        yield self.type_keys(keys, "c> REGISTER OK", 4)
        self.assertIn(b"\x1b[2D", self.raw[start:])
        # A combining accent goes with its letter: one Backspace removes both.
        yield self.type_keys("REGISTER qe\u0301".encode() + backspace + b"r\r", "c> REGISTER OK", 5)
        names = [name.decode("utf-8", "replace") for name in self.registered()]
        self.assertEqual(names, ["zoe", "abé", "abx", "日x本z", "qr"])


class InterruptTests(TerminalCase):
    """Ctrl-C in the middle of a download."""

    @defer.inlineCallbacks
    def test_ctrl_c_mid_download(self):
        self.slow_peer(pieces=1000)  # 20 s or more: Ctrl-C comes long before the end
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        yield self.type_keys(b"GET_FILE slow f.bin f.bin\r", "f.bin from slow")
        self.proc.write(b"\x03")
        code = yield deadline(self.proc.ended)
        self.assertEqual(code, 0, self.raw)
        self.assertIn(b"\rc> GET_FILE FAIL\r\n", self.raw)
        self.assertEqual(list(self.cwd.iterdir()), [])
        self.assertIsNone(self.indexer.users["alice"]["addr"])
        self.assertTrue(self.raw.endswith(INSERT_OFF), self.raw[-60:])

    @defer.inlineCallbacks
    def test_the_terminal_is_left_in_replace_mode(self):
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        self.proc.write(b"\x04")
        yield deadline(self.proc.ended)
        self.assertTrue(self.raw.endswith(INSERT_OFF), self.raw[-60:])
