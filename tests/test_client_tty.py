"""The shell in a terminal (a pseudo-terminal here): downloads in the background
with a status area under the prompt, DOWNLOADS and CANCEL, Ctrl-C, Ctrl-D and QUIT,
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
from tests.support import deadline, fresh_home, poll_until, spawn
from tests.test_client_interop import ClassicIndexer

#: The prompt as drawn in the terminal (insert mode on, then ``c> ``).
PROMPT = b"\x1b[4hc> "
#: Replace mode (insert mode off).
INSERT_OFF = b"\x1b[4l"
#: One status line: label, bar, percentage, bytes, rate and time left.
BAR = re.compile(
    r"\[1\] f\.bin from slow  \[#+ *\] +\d+%  [\d.]+ KiB / 64\.0 KiB  [\d.]+ K?i?B/s  \d+:\d\d left"
)
#: The bar drawn in place by a download in the foreground (--no-edit).
INLINE_BAR = re.compile(r"f\.bin from slow  \[#+ *\] +\d+%  [\d.]+ KiB / 64\.0 KiB")
#: A status line as drawn under the prompt line, up to the move back up to it.
STATUS = re.compile(rb"\r\n(\[1\] f\.bin from slow  [^\r\n\x1b]*)\x1b\[1A")


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


class _StallingPeer(protocol.Protocol):
    """Answers FETCH with 1 KiB of 64 KiB, then sends nothing more (a frozen peer)."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"FETCH\0") and not hasattr(self, "sent"):
            self.sent = True
            self.transport.write(b"\x00%d\x00" % (64 * 1024) + b"s" * 1024)


class TerminalCase(TestCase):
    """A shell in a pty against a classic indexer; ``self.raw`` is all it drew."""

    #: More options for the shell.
    extra: tuple[str, ...] = ()

    def setUp(self):
        self.indexer = ClassicIndexer()
        listening = reactor.listenTCP(0, self.indexer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir()
        self.home = fresh_home(self)
        self.start_shell()

    def start_shell(self) -> None:
        """Start the shell in a pty (again: a new process, the same home and directory)."""
        argv = [sys.executable, "-m", "p2p.client", "-s", "127.0.0.1", "-p", str(self.port)]
        argv += ["--wsdl", "http://127.0.0.1:1/?wsdl", "--peer-listen", "tcp:0:interface=127.0.0.1"]
        argv += self.extra
        self.raw = b""
        env = {"P2P_HOME": str(self.home)}
        self.proc = spawn(self, argv, cwd=self.cwd, env=env, name="tty-shell", usePTY=True)
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

    def assertOnlyPartial(self, name: str) -> None:
        """Nothing at the destination ``name``: only the hidden partial files a cut
        download keeps for the next GET_FILE to continue (protocol.md 2.6)."""
        self.assertEqual(
            sorted(p.name for p in self.cwd.iterdir()),
            [f".{name}.p2p-part", f".{name}.p2p-part.json"],
        )

    def resize(self, columns: int, rows: int = 24) -> None:
        """Set the pty's size, as a terminal window does."""
        fcntl.ioctl(
            self.proc.transport.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0)
        )

    def slow_peer(self, pieces: int = _TricklingPeer.PIECES) -> None:
        """List user ``slow``: a peer sending 64 KiB in ``pieces``, one every 50 ms."""
        factory = protocol.Factory.forProtocol(_TricklingPeer)
        factory.pieces = pieces
        peer = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(peer.stopListening)
        self.indexer.users["slow"] = {"addr": ("127.0.0.1", str(peer.getHost().port)), "files": {}}


class BackgroundDownloadTests(TerminalCase):
    """GET_FILE returns to the prompt; progress shows in a status area under it."""

    @defer.inlineCallbacks
    def connected(self, pieces: int = _TricklingPeer.PIECES):
        self.slow_peer(pieces)
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")

    @defer.inlineCallbacks
    def test_status_area_then_a_clean_result_line(self):
        self.resize(100)
        yield self.connected()
        start = len(self.raw)
        yield self.type_keys(b"GET_FILE slow f.bin f.bin\r", "c> GET_FILE OK\r\n")
        self.assertEqual((self.cwd / "f.bin").read_bytes(), b"p" * _TricklingPeer.SIZE)
        shown = self.raw[start:]
        # The prompt came back at once, before any byte arrived, under the entered line.
        echo, rest = shown.split(b"\r\n", 1)
        self.assertIn(b"GET_FILE slow f.bin f.bin", echo)
        self.assertLess(rest.find(PROMPT), rest.find(b"%"))
        # Status lines under the prompt, redrawn as bytes arrive, never wider than the
        # terminal; each followed by a move back up to the prompt line.
        bars = [m.decode() for m in STATUS.findall(shown)]
        self.assertGreater(len(bars), 2, shown)
        self.assertTrue(any(BAR.search(bar) for bar in bars), bars)
        self.assertLessEqual(max(map(columns_of, bars)), 99)
        # The result line is printed above the prompt, after the status area was erased;
        # then the prompt is drawn again, and no status line is left under it.
        before, _after = shown.rsplit(b"c> GET_FILE OK\r\n", 1)
        self.assertTrue(before.endswith(b"\r\x1b[J" + INSERT_OFF), before[-40:])
        yield poll_until(lambda: self.raw.endswith(b"\r\x1b[J" + PROMPT), what="a bare prompt")
        self.assertIn(b"saved as " + str(self.cwd / "f.bin").encode(), self.raw)

    @defer.inlineCallbacks
    def test_commands_answer_while_a_download_runs_and_the_typed_line_stays(self):
        yield self.connected(pieces=1000)  # 50 s or more: far longer than the test
        yield self.type_keys(b"GET_FILE slow f.bin f.bin\r", "[1] f.bin from slow  ")
        yield self.type_keys(b"LIST_USERS\r", "c> LIST_USERS OK")
        self.assertIn(b"\tslow 127.0.0.1", self.raw)
        # A half-typed line is drawn again, whole, with every status redraw.
        self.proc.write(b"LIST_US")
        mark = len(self.raw)
        redrawn = re.compile(re.escape(PROMPT) + rb"LIST_US\r+\n\[1\] f\.bin")
        yield poll_until(
            lambda: len(redrawn.findall(self.raw, mark)) >= 2,
            what="status redraws keeping the typed line",
        )
        yield self.type_keys(b"ERS\r", "c> LIST_USERS OK", 2)
        # DOWNLOADS: one line per transfer, with progress and rate.
        yield self.type_keys(b"DOWNLOADS\r", "c> DOWNLOADS OK")
        yield poll_until(lambda: re.search(rb"\t\[1\] f\.bin from slow  +\d+%", self.raw))
        self.assertNotRegex(self.raw, rb"c> GET_FILE (OK|FAIL)")
        # CANCEL: the FAIL line, and nothing at the destination (what arrived stays
        # hidden beside it, for the next GET_FILE to continue).
        yield self.type_keys(b"CANCEL 1\r", "c> CANCEL OK")
        self.assertIn(b"c> GET_FILE FAIL\r\n", self.raw)
        self.assertOnlyPartial("f.bin")
        yield self.type_keys(b"CANCEL 1\r", "c> CANCEL FAIL, NO SUCH DOWNLOAD")
        yield self.type_keys(b"DOWNLOADS\r", "c> DOWNLOADS OK", 2)
        self.assertFalse(self.proc.exited)

    @defer.inlineCallbacks
    def test_a_frozen_peer_shows_as_stalled_with_no_key_typed(self):
        yield self.connected()
        peer = reactor.listenTCP(
            0, protocol.Factory.forProtocol(_StallingPeer), interface="127.0.0.1"
        )
        self.addCleanup(peer.stopListening)
        self.indexer.users["frozen"] = {"addr": ("127.0.0.1", str(peer.getHost().port))}
        yield self.type_keys(b"GET_FILE frozen f.bin\r", "[1] f.bin from frozen")
        # Redrawn by itself, the status line says for how long nothing came.
        yield self.type_keys(b"", " / 64.0 KiB  stalled 0:06")
        yield self.type_keys(b"CANCEL 1\r", "c> CANCEL OK")
        self.assertOnlyPartial("f.bin")

    @defer.inlineCallbacks
    def test_no_silent_overwrite_and_the_remote_name_by_default(self):
        yield self.connected()
        (self.cwd / "f.bin").write_bytes(b"precious")
        question = f"{self.cwd / 'f.bin'} exists. Replace it? [y/N] "
        yield self.type_keys(b"GET_FILE slow f.bin\r", question)
        yield self.type_keys(b"n\r", "c> GET_FILE FAIL")
        self.assertEqual((self.cwd / "f.bin").read_bytes(), b"precious")
        yield self.type_keys(b"GET_FILE slow f.bin\r", question, 2)
        yield self.type_keys(b"y\r", "c> GET_FILE OK")
        self.assertEqual((self.cwd / "f.bin").read_bytes(), b"p" * _TricklingPeer.SIZE)
        # The answers are not commands, nor kept in the history.
        self.assertFalse(any(r.startswith((b"y\0", b"n\0")) for r in self.indexer.requests))
        yield self.type_keys(b"\x04", "")
        yield deadline(self.proc.ended)
        history = (self.home / "history").read_bytes().splitlines()
        self.assertEqual(history[-2:], [b"GET_FILE slow f.bin"] * 2)


class NoEditTests(TerminalCase):
    """``--no-edit`` in a terminal: plain lines, each command to its end; a download
    draws its bar in place on its own line, erased before the result line."""

    extra = ("--no-edit",)

    @defer.inlineCallbacks
    def test_the_inline_bar(self):
        self.resize(100)
        self.slow_peer()
        self.proc.write(b"REGISTER alice\nCONNECT alice\n")
        yield poll_until(lambda: b"c> CONNECT OK" in self.raw, what="CONNECT OK")
        start = len(self.raw)
        self.proc.write(b"GET_FILE slow f.bin\n")
        yield poll_until(lambda: b"c> GET_FILE OK" in self.raw[start:], what="GET_FILE OK")
        shown = self.raw[start:].split(b"c> GET_FILE OK")[0]
        bars = [seg.decode().rstrip() for seg in shown.split(b"\r") if b"%" in seg]
        self.assertTrue(any(INLINE_BAR.search(bar) for bar in bars), shown)
        self.assertGreater(len(bars), 2, "redrawn in place as bytes arrive")
        self.assertTrue(shown.endswith(b"\r"), "erased, back at the line's start")
        self.assertEqual((self.cwd / "f.bin").read_bytes(), b"p" * _TricklingPeer.SIZE)


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
    """Ctrl-C clears the line; Ctrl-D and QUIT quit, saying what they cancel."""

    @defer.inlineCallbacks
    def test_ctrl_c_clears_the_line_and_the_download_goes_on(self):
        self.slow_peer(pieces=32)  # about 1.6 s
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        yield self.type_keys(b"GET_FILE slow f.bin f.bin\r", "[1] f.bin from slow")
        yield self.type_keys(b"REGISTER bo\x03", "^C")
        yield self.type_keys(b"\x03LIST_USERS\r", "c> LIST_USERS OK")
        yield self.type_keys(b"", "c> GET_FILE OK")
        self.assertEqual((self.cwd / "f.bin").read_bytes(), b"p" * _TricklingPeer.SIZE)
        self.assertFalse(self.proc.exited)
        ops = [r.split(b"\0")[0] for r in self.indexer.requests]
        self.assertEqual(ops, [b"REGISTER", b"CONNECT", b"LIST_USERS", b"LIST_USERS"])
        self.assertIsNotNone(self.indexer.users["alice"]["addr"])
        self.proc.write(b"\x04")
        code = yield deadline(self.proc.ended)
        self.assertEqual(code, 0, self.raw)
        self.assertIsNone(self.indexer.users["alice"]["addr"])

    @defer.inlineCallbacks
    def quit_mid_download(self, keys: bytes):
        self.slow_peer(pieces=1000)  # 50 s or more: the quit comes long before the end
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        yield self.type_keys(b"CONNECT alice\r", "c> CONNECT OK")
        yield self.type_keys(b"GET_FILE slow f.bin f.bin\r", "[1] f.bin from slow")
        self.proc.write(keys)
        code = yield deadline(self.proc.ended)
        self.assertEqual(code, 0, self.raw)
        self.assertIn(b"quitting with 1 download running: cancelled", self.raw)
        self.assertIn(b"c> GET_FILE FAIL\r\n", self.raw)
        self.assertOnlyPartial("f.bin")
        self.assertIsNone(self.indexer.users["alice"]["addr"])
        self.assertTrue(self.raw.endswith(INSERT_OFF), self.raw[-60:])

    def test_ctrl_d_mid_download(self):
        return self.quit_mid_download(b"\x04")

    def test_quit_mid_download(self):
        return self.quit_mid_download(b"QUIT\r")

    @defer.inlineCallbacks
    def test_the_terminal_is_left_in_replace_mode(self):
        yield self.type_keys(b"REGISTER alice\r", "c> REGISTER OK")
        self.proc.write(b"\x04")
        yield deadline(self.proc.ended)
        self.assertTrue(self.raw.endswith(INSERT_OFF), self.raw[-60:])
