"""SOAP 1.1 fault envelopes for the answers given outside Spyne, and the one log line of a fault."""

from __future__ import annotations

from xml.sax.saxutils import escape

from twisted.logger import Logger, LogLevel

from p2p.logs import one_line

log = Logger(namespace="p2p.timews.fault")

#: Longest fault string quoted in the log (Spyne's can quote the client's body).
MAX_LOGGED_REASON = 120


def soap_fault(code: str, message: str) -> bytes:
    """A SOAP 1.1 fault envelope; ``code`` is e.g. ``Client.RequestTooLong``."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<soap11env:Envelope xmlns:soap11env="http://schemas.xmlsoap.org/soap/envelope/">'
        "<soap11env:Body><soap11env:Fault>"
        f"<faultcode>soap11env:{escape(code)}</faultcode>"
        f"<faultstring>{escape(message)}</faultstring>"
        "</soap11env:Fault></soap11env:Body></soap11env:Envelope>"
    ).encode()


def log_fault(peer: str, method: str, status: str, code: str, reason: str) -> None:
    """One short line for a request answered with a fault (in place of its access line).

    Everything the client chose (method, reason quoting its body) is cut short
    and has its control characters escaped, so a line stays one line. A
    ``Server`` fault (our failure, not the client's) is an error.
    """
    log.emit(
        LogLevel.error if code.startswith("Server") else LogLevel.info,
        "SOAP fault to {peer} {method}: {status} {code}: {reason}",
        peer=peer,
        method=one_line(method, 20),
        status=status.split(" ", 1)[0],
        code=code,
        reason=one_line(reason, MAX_LOGGED_REASON),
    )
