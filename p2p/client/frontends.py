"""How lines reach the shell and how its output leaves.

Two input front ends over ``twisted.internet.stdio.StandardIO``:

- :class:`PipeInput`, plain newline-ended lines, when standard input is not a terminal:
  plain lines, so scripts can drive the shell; end of input quits.
- :class:`TerminalInput`, a ``twisted.conch.recvline.HistoricRecvLine`` behind an
  ``insults.ServerProtocol`` with the terminal in raw mode (twisted.conch.stdio's
  approach): the line can be edited and history recalled with the arrow keys,
  running downloads show in a status area under it, and output is printed above
  both; Ctrl-C clears the line, Ctrl-D (on an empty line) quits.
  :func:`raw_terminal` restores the terminal at exit.

Output is written synchronously, in order, with :class:`StdioOutput`: result lines
on fd 1, notes for humans on fd 2 (the raw terminal keeps output processing on, so
``\\n`` still starts a new line).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import select
import sys
import unicodedata
from collections.abc import Callable, Iterator

from twisted.conch import recvline
from twisted.conch.insults import insults
from twisted.internet import interfaces, protocol, stdio
from twisted.internet.defer import Deferred
from zope.interface import implementer

from p2p.client.completion import Completer, common_prefix
from p2p.client.history import History
from p2p.client.progress import columns_of, fit_line

PROMPT = "c> "
#: Seconds between redraws of the status area while downloads run and no byte comes.
TICK = 1.0
#: ECMA-48 "reset mode: IRM": the terminal back in replace mode, as it was before the shell.
RESET_INSERT_MODE = b"\x1b[4l"
#: Longest input line accepted (a description is at most 256 bytes; leave room).
MAX_LINE = 64 * 1024


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to ``fd``, waiting if it is non-blocking and full.

    The terminal's file description is shared by stdin (which StandardIO makes
    non-blocking) and stdout/stderr, so a plain write may raise EAGAIN.
    """
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except (BrokenPipeError, OSError):
            return  # the reader went away: nothing more can be shown
        view = view[written:]


class StdioOutput:
    """The shell's output: result lines to stdout, notes to stderr, progress to stdout.

    Also a minimal text stream (``write``/``flush``) so a progress bar can draw on
    stdout; progress is offered only when stdout is a terminal.
    """

    def __init__(self, stdout: int = 1, stderr: int = 2) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.show_progress = os.isatty(stdout)
        #: The editable prompt, when there is one: output goes above its line and
        #: status area, which are drawn again below it (:meth:`ShellTerminal.print_above`).
        self.screen: ShellTerminal | None = None
        #: Told every result line (Tab completion learns names from the listings).
        self.seen: Callable[[str], None] | None = None

    def _encode(self, text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")

    def line(self, text: str) -> None:
        if self.seen is not None:
            self.seen(text)
        self._write(self.stdout, self._encode(text + "\n"))

    def note(self, text: str) -> None:
        self._write(self.stderr, self._encode(text + "\n"))

    def _write(self, fd: int, data: bytes) -> None:
        if self.screen is not None:
            self.screen.print_above(fd, data)
        else:
            write_all(fd, data)

    def progress_stream(self) -> StdioOutput | None:
        return self if self.show_progress else None

    # text-stream interface for the progress bar
    def write(self, text: str) -> int:
        write_all(self.stdout, self._encode(text))
        return len(text)

    def flush(self) -> None:
        pass

    def columns(self) -> int | None:
        """The terminal's width now, so a progress bar never wraps; None if unknown."""
        try:
            return os.get_terminal_size(self.stdout).columns or None
        except OSError:
            return None


def decode_line(raw: bytes) -> str:
    """Input bytes as text; invalid UTF-8 survives as surrogates and is refused later."""
    return raw.rstrip(b"\r").decode("utf-8", "surrogateescape")


@implementer(interfaces.IHalfCloseableProtocol)
class PipeInput(protocol.Protocol):
    """Plain lines from a pipe or a file; end of input ends the shell.

    A line longer than ``MAX_LENGTH`` is dropped whole, up to its newline, with
    one note: none of its tail may run as a command, and the lines after it
    still do. (``LineReceiver`` would do neither.)
    """

    MAX_LENGTH = MAX_LINE

    def __init__(self, submit: Callable[[str], None], end: Callable[[], None], note) -> None:
        self.submit = submit
        self.end = end
        self.note = note
        self._buffer = b""
        self._discarding = False  # inside an over-long line, until its newline
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line)
        if len(self._buffer) > self.MAX_LENGTH:
            self._buffer = b""
            self._too_long()

    def _line(self, line: bytes) -> None:
        if self._discarding:
            self._discarding = False  # the newline that ends the over-long line
        elif len(line) > self.MAX_LENGTH:
            self._too_long()
            self._discarding = False
        else:
            self.submit(decode_line(line))

    def _too_long(self) -> None:
        if not self._discarding:
            self._discarding = True
            self.note(f"input line longer than {self.MAX_LENGTH} bytes ignored")

    def readConnectionLost(self) -> None:
        rest, self._buffer = self._buffer, b""
        if rest and not self._discarding:
            self.submit(decode_line(rest))
        self._finish()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = protocol.connectionDone) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self._ended:
            self._ended = True
            self.end()


class ShellTerminal(recvline.HistoricRecvLine):
    """An editable, history-keeping prompt feeding the shell, with a status area.

    ``recvline`` edits bytes: each byte is one entry of ``lineBuffer`` and one
    column on screen, so the cursor keys and Backspace split UTF-8 characters.
    Here the input is decoded incrementally and each entry is one character
    (its UTF-8 bytes, combining marks joined to the character before them),
    moved over by its width on screen: 2 columns for wide (East Asian) text.
    Bytes that are not UTF-8 stay as they came (one entry each).

    Under the input line, the *status area* shows one line per running download
    (``status()`` gives their label, fraction done and parts, see
    :mod:`~p2p.client.progress`); :meth:`refresh` redraws it at most
    ``REFRESHES_PER_SECOND`` times a second. Output arriving meanwhile is printed
    above both (:meth:`print_above`), so neither the line being typed nor the
    status is disturbed. While a command runs the prompt is hidden; keys typed
    then are kept and take effect when it comes back (typed ahead, as in a shell).

    Ctrl-C clears the line being typed (it never quits); Ctrl-D on an empty line
    calls ``quit``.
    """

    ps = (PROMPT.encode(), PROMPT.encode())
    #: At most this many status lines; beyond, one line says how many more run.
    MAX_STATUS_LINES = 4
    REFRESHES_PER_SECOND = 5

    def __init__(
        self,
        submit: Callable[[str], None],
        quit: Callable[[], None],
        status: Callable[[], list[tuple[str, float | None, list[str]]]] = list,
        columns: Callable[[], int | None] = lambda: None,
        reactor=None,
        completer: Completer | None = None,
        history: History | None = None,
    ) -> None:
        self.submit = submit
        self.quit = quit
        self.status = status
        self.columns = columns
        self.reactor = reactor
        self.completer = completer
        self.history = history
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        #: The prompt and the line being typed are on screen (no command is running).
        self.prompt_shown = False
        #: Keys typed while the prompt was hidden, handled when it comes back.
        self.typed_ahead = b""
        self._last_refresh = float("-inf")
        self._refresh_call = None
        self._tick = None  # the next redraw while downloads run, bytes or not
        #: Fires with the next entered line instead of running it (see :meth:`ask`).
        self._question: Deferred | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.keyHandlers[b"\x03"] = self.handle_INTERRUPT  # Ctrl-C (no SIGINT in raw mode)
        self.keyHandlers[b"\x04"] = self.handle_EOF  # Ctrl-D
        self.keyHandlers.update(
            {
                b"\x01": self.handle_HOME,  # Ctrl-A
                b"\x05": self.handle_END,  # Ctrl-E
                b"\x0b": self.handle_KILL_TO_END,  # Ctrl-K
                b"\x0c": self.handle_CLEAR,  # Ctrl-L
                b"\x15": self.handle_KILL_LINE,  # Ctrl-U
                b"\x17": self.handle_KILL_WORD,  # Ctrl-W
            }
        )
        if self.history is not None:
            self.historyLines = self.history.load()
            self.historyPosition = len(self.historyLines)

    def initializeScreen(self) -> None:
        # RecvLine resets (clears) the whole screen; a shell must not.
        self.setInsertMode()

    # --- the input line and the status area under it ----------------------------

    def _width(self) -> int:
        return self.columns() or 80

    def _offsets(self) -> tuple[int, int]:
        """Columns from the prompt's start to the cursor and to the input's end."""
        start = columns_of(self.ps[self.pn].decode("utf-8", "replace"))
        cursor = start + self._columns(self.lineBuffer[: self.lineBufferIndex])
        return cursor, cursor + self._columns(self.lineBuffer[self.lineBufferIndex :])

    def _status_text(self, width: int) -> list[bytes]:
        rows = self.status()
        shown = rows
        if len(rows) > self.MAX_STATUS_LINES:
            shown = rows[: self.MAX_STATUS_LINES - 1]
        lines = [fit_line(label, done, parts, width) for label, done, parts in shown]
        if len(rows) > len(shown):
            lines.append(f"... and {len(rows) - len(shown)} more (DOWNLOADS lists them)")
        return [line.encode("utf-8", "surrogateescape") for line in lines]

    def _erase(self) -> None:
        """Erase the input line (when shown) and the status area; the cursor ends at
        the first column of the row where they started."""
        self.terminal.write(b"\r")
        if self.prompt_shown:
            row = self._offsets()[0] // self._width()
            if row:
                self.terminal.cursorUp(row)
        self.terminal.eraseToDisplayEnd()

    def _draw(self) -> None:
        """Draw the input line (when shown) then the status area under it, and put
        the cursor back where the typing goes."""
        width = self._width()
        lines = self._status_text(width)
        if not self.prompt_shown:
            if lines:
                self.terminal.write(b"\r\n".join(lines))
                if len(lines) > 1:
                    self.terminal.cursorUp(len(lines) - 1)
                self.terminal.write(b"\r")
            return
        self.terminal.setModes([insults.modes.IRM])
        self.drawInputLine()
        cursor, end = self._offsets()
        if not lines:
            self._back(end - cursor)
            return
        self.terminal.write(b"\r\n" + b"\r\n".join(lines))
        last_input_row = max(end - 1, 0) // width
        self.terminal.cursorUp(len(lines) + last_input_row - cursor // width)
        self.terminal.write(b"\r")
        self._forward(cursor % width)

    def redraw(self) -> None:
        """Draw the input line and status area again in place."""
        self._erase()
        self._draw()

    def print_above(self, fd: int, data: bytes) -> None:
        """Write ``data`` (whole lines) to ``fd`` above the input line and status area."""
        self._erase()
        self.terminal.resetModes([insults.modes.IRM])
        write_all(fd, data)
        self._draw()

    def leave(self) -> None:
        """Erase the status area (and the prompt): the shell is ending."""
        self._erase()
        self.prompt_shown = False

    def refresh(self) -> None:
        """The status changed: redraw it, at most ``REFRESHES_PER_SECOND`` times a second
        (a later call is scheduled rather than dropped, so the last state shows)."""
        if self.reactor is None:
            self.redraw()
            return
        if self._refresh_call is not None and self._refresh_call.active():
            return
        wait = self._last_refresh + 1.0 / self.REFRESHES_PER_SECOND - self.reactor.seconds()
        if wait > 0:
            self._refresh_call = self.reactor.callLater(wait, self.refresh)
            return
        self._last_refresh = self.reactor.seconds()
        self.redraw()
        # Time passes with no byte too (a stalled peer): redraw every second meanwhile.
        if (self._tick is None or not self._tick.active()) and self.status():
            self._tick = self.reactor.callLater(TICK, self.refresh)

    def keystrokeReceived(self, keyID, modifier) -> None:
        if isinstance(keyID, bytes) and len(keyID) == 1 and keyID[0] >= 0x80:
            self.characterReceived(keyID, False)  # UTF-8 bytes of non-ASCII text
            return
        if keyID not in self._printableChars:
            self._decoder.reset()  # an editing key inside a character: drop its first bytes
        super().keystrokeReceived(keyID, modifier)

    # --- one entry per character ----------------------------------------------

    def characterReceived(self, ch: bytes, moreCharactersComing: bool) -> None:
        """Typed (or recalled) bytes: buffered until they make whole characters."""
        for char in self._decoder.decode(ch):
            data = char.encode("utf-8", "surrogateescape")
            if unicodedata.combining(char) and self.lineBufferIndex > 0:
                self.lineBuffer[self.lineBufferIndex - 1] += data  # e then a combining accent
                self.terminal.write(data)
            else:
                super().characterReceived(data, moreCharactersComing)

    def _columns(self, entries) -> int:
        return sum(_width(entry) for entry in entries)

    def _back(self, n: int) -> None:
        if n:
            self.terminal.cursorBackward(n)

    def _forward(self, n: int) -> None:
        if n:
            self.terminal.cursorForward(n)

    def handle_LEFT(self) -> None:
        if self.lineBufferIndex > 0:
            self.lineBufferIndex -= 1
            self._back(_width(self.lineBuffer[self.lineBufferIndex]))

    def handle_RIGHT(self) -> None:
        if self.lineBufferIndex < len(self.lineBuffer):
            self._forward(_width(self.lineBuffer[self.lineBufferIndex]))
            self.lineBufferIndex += 1

    def handle_HOME(self) -> None:
        self._back(self._columns(self.lineBuffer[: self.lineBufferIndex]))
        self.lineBufferIndex = 0

    def handle_END(self) -> None:
        self._forward(self._columns(self.lineBuffer[self.lineBufferIndex :]))
        self.lineBufferIndex = len(self.lineBuffer)

    def handle_BACKSPACE(self) -> None:
        if self.lineBufferIndex > 0:
            self.lineBufferIndex -= 1
            width = _width(self.lineBuffer.pop(self.lineBufferIndex))
            if width:
                self._back(width)
                self.terminal.deleteCharacter(width)

    def handle_DELETE(self) -> None:
        if self.lineBufferIndex < len(self.lineBuffer):
            width = _width(self.lineBuffer.pop(self.lineBufferIndex))
            if width:
                self.terminal.deleteCharacter(width)

    def _deliverBuffer(self, buf: bytes) -> None:
        # A recalled history line: through the decoder like typed text, all at once.
        self._decoder.reset()
        if buf:
            self.characterReceived(buf, False)

    def handle_RETURN(self) -> None:
        # The entered line stays on screen as typed; the status area goes under
        # what the command prints, then under the next prompt.
        self.handle_END()
        self.terminal.eraseToDisplayEnd()
        self.prompt_shown = False
        if self._question is not None:  # an answer: neither history nor a command
            line = b"".join(self.lineBuffer)
            self.lineBuffer, self.lineBufferIndex = [], 0
            self.terminal.nextLine()
            self.lineReceived(line)
            return
        if self.history is not None and self.lineBuffer:
            self.history.add(b"".join(self.lineBuffer))
        super().handle_RETURN()

    def lineReceived(self, line: bytes) -> None:
        # Insert mode is for editing at the prompt only: a command's output (the
        # progress bar's \r redraws above all) must overwrite, not push text right.
        self.terminal.resetModes([insults.modes.IRM])
        self._draw()
        question, self._question = self._question, None
        if question is not None:
            self.ps = (PROMPT.encode(), PROMPT.encode())
            question.callback(decode_line(line))
            return
        self.submit(decode_line(line))

    def ask(self, question: str) -> Deferred:
        """Show ``question`` as the prompt; fire with the next line entered (not run
        as a command, not kept in the history). Ctrl-C or Ctrl-D answer ``""``."""
        d: Deferred = Deferred()
        self._erase()
        self._question = d
        self.ps = (question.encode("utf-8", "surrogateescape"),) * 2
        self.prompt_shown = False
        self.show_prompt()
        return d

    def show_prompt(self) -> None:
        """Draw the prompt and whatever has been typed so far (in insert mode) with
        the status area under it, then handle the keys typed ahead meanwhile."""
        if self.prompt_shown:
            return
        self._erase()
        self.prompt_shown = True
        self._draw()
        keys, self.typed_ahead = self.typed_ahead, b""
        if keys:
            self.terminal.dataReceived(keys)

    def keys_received(self, data: bytes) -> None:
        """Keys from the terminal: handled now at the prompt, else kept for it. A
        Ctrl-C typed ahead drops what was typed ahead before it."""
        if self.prompt_shown and not self.typed_ahead:
            self.terminal.dataReceived(data)
            return
        self.typed_ahead += data
        if b"\x03" in self.typed_ahead:
            self.typed_ahead = self.typed_ahead.rpartition(b"\x03")[2]

    def _replace_line(self, entries: list[bytes], index: int) -> None:
        """Make the input line ``entries`` with the cursor before ``entries[index]``."""
        self._erase()
        self.lineBuffer = entries
        self.lineBufferIndex = index
        self._draw()

    def handle_INTERRUPT(self) -> None:
        """Ctrl-C: the line being typed is left on screen, marked ``^C``, and a fresh
        empty prompt is drawn under it (as bash does). Nothing else stops."""
        self.handle_END()
        self.terminal.write(b"^C")
        self.lineBuffer = []
        self.lineBufferIndex = 0
        if self._question is not None:  # no answer: no
            self.handle_RETURN()
            return
        self.terminal.eraseToDisplayEnd()
        self.terminal.write(b"\r\n")
        self.historyPosition = len(self.historyLines)
        self._draw()

    def handle_EOF(self) -> None:
        if self._question is not None:
            self.handle_INTERRUPT()
        elif not self.lineBuffer:
            self._erase()
            self.prompt_shown = False
            self.terminal.resetModes([insults.modes.IRM])
            self.quit()

    def handle_KILL_LINE(self) -> None:
        """Ctrl-U: delete from the line's start to the cursor."""
        self._replace_line(self.lineBuffer[self.lineBufferIndex :], 0)

    def handle_KILL_TO_END(self) -> None:
        """Ctrl-K: delete from the cursor to the line's end."""
        self._replace_line(self.lineBuffer[: self.lineBufferIndex], self.lineBufferIndex)

    def handle_KILL_WORD(self) -> None:
        """Ctrl-W: delete the word before the cursor (and the blanks after it)."""
        end = start = self.lineBufferIndex
        while start > 0 and self.lineBuffer[start - 1].isspace():
            start -= 1
        while start > 0 and not self.lineBuffer[start - 1].isspace():
            start -= 1
        self._replace_line(self.lineBuffer[:start] + self.lineBuffer[end:], start)

    def handle_CLEAR(self) -> None:
        """Ctrl-L: clear the screen; the prompt and status area at its top."""
        self.terminal.cursorHome()
        self.terminal.eraseDisplay()
        self._draw()

    def handle_TAB(self) -> None:
        """Complete the word before the cursor: a command, a user or a file name (the
        last listings'). One candidate is put in whole; several, what they share,
        and if that adds nothing they are listed above the prompt."""
        if self.completer is None:
            return
        typed = b"".join(self.lineBuffer[: self.lineBufferIndex])
        before = typed.decode("utf-8", "surrogateescape")
        start, candidates = self.completer.complete(before)
        if not candidates:
            return
        if len(candidates) == 1:
            text = candidates[0] + " "
        else:
            text = common_prefix(candidates)
            if len(text) <= len(before) - start:
                self.print_above(
                    2, ("  ".join(candidates) + "\n").encode("utf-8", "surrogateescape")
                )
                return
        head = _entries(before[:start] + text)
        self._replace_line(head + self.lineBuffer[self.lineBufferIndex :], len(head))


def _entries(text: str) -> list[bytes]:
    """``text`` as line-buffer entries: one per character, combining marks joined
    to the character before them."""
    entries: list[bytes] = []
    for char in text:
        data = char.encode("utf-8", "surrogateescape")
        if entries and unicodedata.combining(char):
            entries[-1] += data
        else:
            entries.append(data)
    return entries


def _width(entry: bytes) -> int:
    """Columns one line-buffer entry (a character and its combining marks) takes."""
    return columns_of(entry.decode("utf-8", "surrogateescape")) or 1


class _TerminalWriter:
    """The ``insults.ServerProtocol``'s transport: synchronous writes to stdout."""

    disconnecting = False

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd

    def write(self, data: bytes) -> None:
        write_all(self.fd, data)

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        pass

    def getPeer(self) -> stdio.PipeAddress:
        return stdio.PipeAddress()

    getHost = getPeer


@implementer(interfaces.IHalfCloseableProtocol)
class _KeyRelay(protocol.Protocol):
    """Keys from stdin to the prompt; end of input counts as Ctrl-D."""

    def __init__(self, prompt: ShellTerminal, end: Callable[[], None]) -> None:
        self.prompt = prompt
        self.end = end

    def dataReceived(self, data: bytes) -> None:
        self.prompt.keys_received(data)

    def readConnectionLost(self) -> None:
        self.end()

    def writeConnectionLost(self) -> None:
        pass


def _null_stdout() -> int:
    """A write fd for StandardIO's unused writer (output bypasses it, see StdioOutput)."""
    return os.open(os.devnull, os.O_WRONLY)


def attach_pipe(reactor, submit, end, note) -> PipeInput:
    """Read plain lines from stdin."""
    proto = PipeInput(submit, end, note)
    stdio.StandardIO(proto, stdin=0, stdout=_null_stdout(), reactor=reactor)
    return proto


def attach_terminal(
    reactor,
    submit: Callable[[str], None],
    quit: Callable[[], None],
    output: StdioOutput,
    status: Callable[[], list[tuple[str, float | None, list[str]]]] = list,
    completer: Completer | None = None,
    history: History | None = None,
) -> ShellTerminal:
    """Read keys from the (raw) terminal on stdin into an editable prompt; ``output``
    then prints above it, and ``status()`` is shown under it. ``completer`` completes
    with Tab the names of the listings ``output`` prints; ``history`` keeps the lines."""
    server = insults.ServerProtocol(
        ShellTerminal,
        submit,
        quit,
        status=status,
        columns=output.columns,
        reactor=reactor,
        completer=completer,
        history=history,
    )
    server.makeConnection(_TerminalWriter(1))
    prompt = server.terminalProtocol
    output.screen = prompt
    stdio.StandardIO(_KeyRelay(prompt, quit), stdin=0, stdout=_null_stdout(), reactor=reactor)
    return prompt


@contextlib.contextmanager
def raw_terminal(fd: int = 0) -> Iterator[None]:
    """Put the terminal in raw mode; restore its settings (and blocking mode) at exit."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # keep what was typed ahead (TCSAFLUSH would drop it)
    # Keep output processing: "\n" still ends a line on screen, even in a traceback.
    mode = termios.tcgetattr(fd)
    mode[tty.OFLAG] |= termios.OPOST | termios.ONLCR
    termios.tcsetattr(fd, termios.TCSADRAIN, mode)
    try:
        yield
    finally:
        if os.isatty(1):
            write_all(1, RESET_INSERT_MODE)  # the user's next program expects replace mode
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        os.set_blocking(fd, True)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
