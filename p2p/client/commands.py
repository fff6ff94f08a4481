"""The shell's command table and line parser (protocol.md section 5).

Parsing is pure: a line becomes a :class:`Parsed` command or a :class:`ParseError`
whose message is the exact line to print (``Syntax error. Usage: ...``). Command
names are case-insensitive; arguments keep their case.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2p import wire


@dataclass(frozen=True)
class CommandSpec:
    """One shell command: its name, how many words it takes and what it does."""

    name: str
    params: tuple[str, ...]
    summary: str
    #: The last parameter takes the rest of the line, spaces included (PUBLISH's description).
    rest: bool = False

    @property
    def usage(self) -> str:
        return " ".join((self.name, *(f"<{p}>" for p in self.params)))


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
        CommandSpec("LIST_CONTENT", ("user",), "list the files a user published"),
        CommandSpec("DISCONNECT", ("user",), "go offline and stop serving files"),
        CommandSpec(
            "GET_FILE",
            ("user", "remote file", "local file"),
            "download a file from a connected user",
        ),
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

    Raises :class:`ParseError` for an unknown command or a wrong number of
    arguments.
    """
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    name = words[0].upper()
    spec = COMMANDS.get(name)
    if spec is None:
        raise ParseError(f"Unknown command: {words[0]} (type HELP for the list of commands)")
    if spec.rest:
        # Keep the description's own spacing: split only as far as the fixed words.
        words = line.strip().split(None, len(spec.params))
    args = tuple(words[1:])
    if len(args) != len(spec.params):
        raise ParseError(f"Syntax error. Usage: {spec.usage}")
    return Parsed(name, args)


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
