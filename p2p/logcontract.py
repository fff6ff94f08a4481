"""The LOG contract the audit logger and the indexer's relay both speak.

``logger.x`` defines the program; this module holds what both ends must agree
on beyond it: the result values of LOG, how a relay call names its sender and
outbox sequence number (the AUTH_SYS machine name), and how a program number
given on a command line is read. The logger service and the indexer import it;
neither imports the other.
"""

from __future__ import annotations

from p2p import wire

LOG_OK = 0
LOG_ERROR = -1

#: AUTH_SYS machinename of a relay call: ``p2p-outbox:<sender id>:<outbox seq>``.
RELAY_PREFIX = "p2p-outbox:"
#: Most digits of a relay sequence number: the outbox's are SQLite integers (< 2**63).
MAX_SEQ_DIGITS = 19


def relay_machinename(sender: str, seq: int) -> str:
    """The credential name a relay call carries."""
    return f"{RELAY_PREFIX}{sender}:{seq}"


def parse_relay_machinename(name: str) -> tuple[str, int] | None:
    """``(sender, seq)`` of a relay credential, or None for any other client."""
    if not name.startswith(RELAY_PREFIX):
        return None
    sender, sep, seq = name[len(RELAY_PREFIX) :].rpartition(":")
    # ASCII digits only: str.isdigit() also accepts "²" (int() raises) and "٣" (int() takes).
    if not sep or not sender or not (seq.isascii() and seq.isdigit()):
        return None
    if len(seq) > MAX_SEQ_DIGITS:
        return None
    return sender, int(seq)


def parse_program(text: str | int) -> int:
    """A program number in decimal or ``0x`` hex, inside the user-defined range.

    Raises ValueError with a message fit for a command line.
    """
    if isinstance(text, int):
        number = text
    else:
        try:
            number = int(text, 0)
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
    if not wire.LOGGER_PROGRAM_MIN <= number <= wire.LOGGER_PROGRAM_MAX:
        raise ValueError(f"must be in {wire.LOGGER_PROGRAM_MIN:#x}-{wire.LOGGER_PROGRAM_MAX:#x}")
    return number
