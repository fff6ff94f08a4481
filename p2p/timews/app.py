"""The Spyne SOAP 1.1 application of the time service: one operation, ``get_time``.

Only the SOAP contract lives here (names, namespace, protocols); how it is
mounted in twisted.web is :mod:`p2p.timews.resource`.
"""

from __future__ import annotations

import logging
from email.message import Message
from io import BytesIO

from spyne import Application, ServiceBase, Unicode, rpc
from spyne.protocol.soap import Soap11
from spyne.server.wsgi import WsgiApplication
from twisted.logger import Logger

from p2p import wire
from p2p.timews.fault import soap_fault

#: Target namespace of the WSDL and of the SOAP body elements.
NAMESPACE = "urn:p2p:time"
#: The ``<service name=...>`` of the WSDL.
SERVICE_NAME = "TimeService"


#: Longest piece of a Spyne log message kept (they can quote the client's whole body).
_MAX_LOGGED = 300


class _ToTwistedLog(logging.Handler):
    """Spyne logs through ``logging``; send it to twisted.logger, shortened."""

    log = Logger(namespace="spyne")

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if len(text) > _MAX_LOGGED:
            text = text[:_MAX_LOGGED] + "..."
        self.log.info("{spyne_message}", spyne_message=text)


def _route_spyne_logging() -> None:
    spyne_log = logging.getLogger("spyne")
    if not any(isinstance(h, _ToTwistedLog) for h in spyne_log.handlers):
        spyne_log.addHandler(_ToTwistedLog(logging.WARNING))
        spyne_log.propagate = False


class TimeService(ServiceBase):
    """The one SOAP operation: the current local time as the indexer expects it."""

    @rpc(_returns=Unicode)
    def get_time(ctx) -> str:
        """The current local time as dd/mm/YYYY HH:MM:SS."""
        return wire.format_datetime()


def make_application() -> Application:
    """The Spyne application: SOAP 1.1 in (schema-validated by lxml) and out."""
    _route_spyne_logging()
    return Application(
        [TimeService],
        tns=NAMESPACE,
        name=SERVICE_NAME,
        in_protocol=Soap11(validator="lxml"),
        out_protocol=Soap11(),
    )


def _fault(start_response, status: str, code: str, message: str, headers=()) -> list[bytes]:
    body = soap_fault(code, message)
    start_response(
        status,
        [
            ("Content-Type", "text/xml; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return [body]


class GuardedWsgiApplication(WsgiApplication):
    """Spyne's WSGI application behind the checks Spyne itself lacks.

    Spyne raises out of the WSGI call (a logged traceback and a bare 500) for
    a POST with an empty body (StopIteration), a Content-Type charset Python
    does not know (LookupError) and a body that is not text in that charset
    (UnicodeDecodeError); and it serves a SOAP call on any method but GET.
    These get a SOAP fault here. The body is read once (already bounded by the
    site) and handed on with a Content-Type naming only the checked charset,
    so Spyne decodes exactly what was checked.
    """

    def __call__(self, environ: dict, start_response, wsgi_url=None):
        method = environ.get("REQUEST_METHOD", "")
        if method == "GET":
            return super().__call__(environ, start_response, wsgi_url)
        if method != "POST":
            return _fault(
                start_response,
                "405 Method Not Allowed",
                "Client.MethodNotAllowed",
                "SOAP calls are POSTed; GET /?wsdl gives the WSDL",
                [("Allow", "GET, HEAD, POST")],
            )
        body = environ["wsgi.input"].read(self.max_content_length + 1)
        if len(body) > self.max_content_length:
            return _fault(
                start_response,
                "413 Request Entity Too Large",
                "Client.RequestTooLong",
                f"request body over {self.max_content_length} bytes",
            )
        if not body:
            return _fault(start_response, "500 Internal Server Error", "Client", "empty body")
        message = Message()
        message["content-type"] = environ.get("CONTENT_TYPE", "")
        mime = message.get_content_type()
        charset = message.get_param("charset")
        content_type = mime
        if charset is not None:
            charset = str(charset)
            try:
                body.decode(charset)
            except Exception:  # LookupError, UnicodeError, a bytes-to-bytes codec...
                return _fault(
                    start_response,
                    "500 Internal Server Error",
                    "Client.BadCharset",
                    "body is not text in the charset of its Content-Type",
                )
            content_type = f"{mime}; charset={charset}"
        environ = dict(environ)
        environ["CONTENT_TYPE"] = content_type
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input"] = BytesIO(body)
        return super().__call__(environ, start_response, wsgi_url)


def make_wsgi_application(max_content_length: int) -> WsgiApplication:
    """The application as a WSGI callable; Spyne also refuses bodies over the cap."""
    return GuardedWsgiApplication(make_application(), max_content_length=max_content_length)
