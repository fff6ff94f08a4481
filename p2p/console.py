"""Operator lines (``s> ...``) written straight to the process's real stdout.

``twistd`` redirects ``sys.stdout`` into its log, which would prefix every line
with a timestamp and a namespace; the services' own lines are part of their
interface, so they bypass that redirection.
"""

from __future__ import annotations

import sys


def say(line: str) -> None:
    """Print one operator line on the real standard output, unbuffered."""
    stream = sys.__stdout__
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # stdout closed (daemonised, or the reader went away): the line is optional
