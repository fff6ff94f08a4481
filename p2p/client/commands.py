"""The shell's command table and line parser (protocol.md section 5).

Parsing is pure: a line becomes a :class:`Parsed` command or a :class:`ParseError`
whose message is the exact line to print (``Syntax error. Usage: ...``). Command
names are case-insensitive; arguments keep their case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from p2p import wire
from p2p.client.words import split_words, word_spans


@dataclass(frozen=True)
class CommandSpec:
    """One shell command: its name, how many words it takes and what it does."""

    name: str
    params: tuple[str, ...]
    summary: str
    #: The last parameter takes the rest of the line, spaces included (PUBLISH's description).
    rest: bool = False
    #: The usage line's arguments when ``params`` do not tell them (options, several words).
    syntax: str | None = None
    #: Turns the words after the name into the command's arguments; ValueError if they
    #: do not fit (the usage line is printed). None: exactly one word per parameter.
    reads: Callable[[list[str]], tuple[str, ...]] | None = None

    @property
    def usage(self) -> str:
        if self.syntax is not None:
            return f"{self.name} {self.syntax}"
        return " ".join((self.name, *(f"<{p}>" for p in self.params)))


def search_arguments(words: list[str]) -> tuple[str, str]:
    """``[--limit N] <words...>`` -> ``(limit, query)``: the limit 1..1000 (default 100),
    the words joined by single spaces. ValueError if the limit is not one, or no word."""
    limit = wire.DEFAULT_SEARCH_LIMIT
    if words and (words[0] == "--limit" or words[0].startswith("--limit=")):
        option, _, value = words.pop(0).partition("=")
        if not value:
            value = words.pop(0) if words else ""
        if not wire.is_decimal(value):
            raise ValueError(f"{option} takes a number")
        limit = int(value)
        if not 1 <= limit <= wire.MAX_SEARCH_LIMIT:
            raise ValueError(f"{option} goes from 1 to {wire.MAX_SEARCH_LIMIT}")
    if not words:
        raise ValueError("no word to search for")
    return str(limit), " ".join(words)


#: What GET_FILE's fourth argument is when ``--force`` was given.
FORCE = "--force"


def get_file_arguments(words: list[str]) -> tuple[str, str, str, str]:
    """``[--force] <user> <remote> [<local>]`` -> ``(user, remote, local, force)``: the
    local name ``""`` when not given (the remote's base name, here), ``force``
    :data:`FORCE` or ``""``. ValueError if the words do not fit."""
    force = ""
    if words and words[0] == FORCE:
        force, words = FORCE, words[1:]
    if len(words) == 2:
        words = [*words, ""]
    if len(words) != 3:
        raise ValueError("GET_FILE takes a user, a remote file and maybe a local file")
    return words[0], words[1], words[2], force


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec("REGISTER", ("user",), "register a user name with the indexer"),
        CommandSpec("UNREGISTER", ("user",), "remove a user and everything it published"),
        CommandSpec("CONNECT", ("user",), "go online as this user and start serving files"),
        CommandSpec(
            "PUBLISH",
            ("file", "description"),
            "publish a file of the share directory",
            rest=True,
        ),
        CommandSpec("DELETE", ("file",), "withdraw a published file"),
        CommandSpec("LIST_USERS", (), "list the connected users"),
        CommandSpec("LIST_CONTENT", ("user",), "list the files a user published, with sizes"),
        CommandSpec(
            "SEARCH",
            ("limit", "words"),
            "find the files of connected users by words",
            syntax="[--limit N] <words...>",
            reads=search_arguments,
        ),
        CommandSpec("DISCONNECT", ("user",), "go offline and stop serving files"),
        CommandSpec(
            "GET_FILE",
            ("user", "remote file", "local file", "force"),
            "download a file from a connected user",
            syntax="[--force] <user> <remote file> [<local file>]",
            reads=get_file_arguments,
        ),
        CommandSpec("DOWNLOADS", (), "the running downloads: progress, rate, time left"),
        CommandSpec("CANCEL", ("n",), "stop download number n (as DOWNLOADS shows it)"),
        CommandSpec("HELP", (), "show this list"),
        CommandSpec("QUIT", (), "disconnect and leave"),
    )
}


@dataclass(frozen=True)
class Parsed:
    """A syntactically valid command: its canonical name and its arguments."""

    name: str
    args: tuple[str, ...]


class ParseError(Exception):
    """A line that is not a valid command; ``str(error)`` is the line to print."""


def parse(line: str) -> Parsed | None:
    """Parse one input line; ``None`` for a blank line or a ``#`` comment.

    Words are split as :func:`p2p.client.words.split_words` says: quotes keep
    spaces (``PUBLISH "my song.mp3" a song``). Raises :class:`ParseError` for an
    unknown command, a wrong number of arguments or an unclosed quote.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    first = stripped.split()[0]
    spec = COMMANDS.get(first.upper())
    if spec is None:
        raise ParseError(f"Unknown command: {first} (type HELP for the list of commands)")
    try:
        if spec.rest:
            args = _fixed_then_rest(stripped, len(spec.params))
        else:
            args = tuple(split_words(stripped)[1:])
            if spec.reads is not None:
                args = spec.reads(list(args))
    except ValueError:  # an unclosed quote, or what ``reads`` refuses
        raise ParseError(f"Syntax error. Usage: {spec.usage}") from None
    if len(args) != len(spec.params):
        raise ParseError(f"Syntax error. Usage: {spec.usage}")
    return Parsed(spec.name, args)


def _fixed_then_rest(line: str, count: int) -> tuple[str, ...]:
    """The ``count - 1`` words after the command name, then the rest of the line as
    typed (its own spacing and quotes: a description)."""
    spans = word_spans(line)
    fixed = [split_words(line[start:end]) for start, end in spans[1:count]]
    if len(spans) <= count or any(len(word) != 1 for word in fixed):
        return ()
    return (*(word[0] for word in fixed), line[spans[count][0] :])


def help_text() -> list[str]:
    """The lines HELP prints: one per command, usage then summary."""
    width = max(len(spec.usage) for spec in COMMANDS.values())
    return [f"{spec.usage.ljust(width)}  {spec.summary}" for spec in COMMANDS.values()]


def field_problem(value: str, kind: wire.FieldKind = wire.FieldKind.NAME) -> str | None:
    """Why ``value`` cannot travel as a field of ``kind`` (a name, by default), or None."""
    try:
        wire.decode_field(value.encode("utf-8"), kind)
    except (wire.BadField, UnicodeEncodeError) as exc:
        limit = wire.LIMITS[kind]
        return f"{value[:60]!r} cannot be sent as a {kind.value} ({exc}; limit {limit} bytes)"
    return None
