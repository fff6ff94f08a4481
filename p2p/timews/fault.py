"""SOAP 1.1 fault envelopes for the answers given outside Spyne."""

from __future__ import annotations

from xml.sax.saxutils import escape


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
