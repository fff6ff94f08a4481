"""Operator lines (``s> ...``) written straight to the process's real stdout.

``twistd`` redirects ``sys.stdout`` into its log, which would prefix every line
with a timestamp and a namespace; the services' own lines are part of their
interface, so they bypass that redirection. They are written as UTF-8 bytes,
like the names they carry, whatever the locale's encoding.
"""

from __future__ import annotations

import sys

from twisted.python import usage


def say(line: str) -> None:
    """Print one operator line on the real standard output, unbuffered."""
    stream = sys.__stdout__
    if stream is None:
        return
    data = (line + "\n").encode("utf-8", "backslashreplace")
    try:
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode("utf-8"))
            stream.flush()
    except (OSError, ValueError):
        pass  # stdout closed (daemonised, or the reader went away): the line is optional


def parse_command_line(options: usage.Options, argv: list[str] | None, program: str) -> None:
    """Parse a command's arguments (``sys.argv[1:]`` when ``argv`` is None); on a usage
    error print the help and the reason on stderr and exit 2, as every p2p command does."""
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"{options}\n{program}: {exc}\n")
        sys.exit(2)
