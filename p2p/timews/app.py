"""The Spyne SOAP 1.1 application of the time service: one operation, ``get_time``.

Only the SOAP contract lives here (names, namespace, protocols); how it is
mounted in twisted.web is :mod:`p2p.timews.resource`.
"""

from __future__ import annotations

import codecs
import logging
from email.message import Message
from io import BytesIO

from spyne import Application, Fault, ServiceBase, Unicode, rpc
from spyne.protocol.soap import Soap11
from spyne.server.wsgi import WsgiApplication
from twisted.logger import Logger

from p2p import wire
from p2p.logs import one_line
from p2p.timews.answers import BODY, CONTENT_TYPE, STAMP, ValidatedAnswers
from p2p.timews.fault import log_fault, soap_fault

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
        self.log.error("{spyne_message}", spyne_message=one_line(record.getMessage(), _MAX_LOGGED))


def _route_spyne_logging() -> None:
    """Only Spyne's critical messages: it logs every fault it answers (as errors,
    with the client's body); the guard logs each fault once, in one line."""
    spyne_log = logging.getLogger("spyne")
    if not any(isinstance(h, _ToTwistedLog) for h in spyne_log.handlers):
        spyne_log.addHandler(_ToTwistedLog(logging.CRITICAL))
        spyne_log.propagate = False


class StrictSoap11(Soap11):
    """Spyne's SOAP 1.1, refusing a document type declaration (SOAP 1.1, section 3).

    Spyne neither loads DTDs nor expands entities, but an entity it leaves in
    the tree made lxml's schema validation raise (an internal error, not a fault).
    """

    def create_in_document(self, ctx, charset=None) -> None:
        super().create_in_document(ctx, charset)
        root = ctx.in_document[0]
        if root.getroottree().docinfo.internalDTD is not None:
            raise Fault("Client.DTDNotAllowed", "a SOAP message must not contain a DTD")


class TimeService(ServiceBase):
    """The one SOAP operation: the current local time as the indexer expects it."""

    @rpc(_returns=Unicode)
    def get_time(ctx) -> str:
        """The current local time as dd/mm/YYYY HH:MM:SS."""
        # (This docstring is the WSDL's documentation of the operation: keep it.)
        # The stamp is also left in the request's environ, so the answer can be
        # learned for identical requests (p2p.timews.answers).
        stamp = wire.format_datetime()
        environ = getattr(ctx.transport, "req_env", None)
        if isinstance(environ, dict):
            environ[STAMP] = stamp
        return stamp


def make_application() -> Application:
    """The Spyne application: SOAP 1.1 in (schema-validated by lxml) and out."""
    _route_spyne_logging()
    return Application(
        [TimeService],
        tns=NAMESPACE,
        name=SERVICE_NAME,
        in_protocol=StrictSoap11(validator="lxml"),
        out_protocol=Soap11(),
    )


#: Python text codecs that are not character sets (Spyne's re-encoding raised on them).
_NOT_CHARSETS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape"})
#: Key of the (code, reason) of the fault answered, in the environ handed to Spyne.
_FAULT = "p2p.fault"


class _Answer(Exception):
    """Raised by the checks: answer ``status`` with this fault, Spyne never called."""

    def __init__(self, status: str, code: str, reason: str, headers=()) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.headers = status, code, reason, list(headers)


def _note_fault(ctx) -> None:
    """Spyne's ``wsgi_exception`` event: remember which fault it answers, for the log line."""
    error = ctx.out_error or ctx.in_error
    reason = getattr(error, "faultstring", "") or error
    if isinstance(reason, bytes):  # lxml's schema errors
        reason = reason.decode("utf-8", "replace")
    ctx.transport.req_env[_FAULT] = (str(getattr(error, "faultcode", "Server")), str(reason))


def _charset(body: bytes, content_type: str) -> tuple[str, str | None]:
    """The MIME type and the checked charset of the Content-Type (None: lxml finds it)."""
    message = Message()
    message["content-type"] = content_type
    charset = message.get_param("charset")
    if charset is None:
        return message.get_content_type(), None
    charset = str(charset)
    try:
        if codecs.lookup(charset).name in _NOT_CHARSETS:
            raise LookupError(charset)
        body.decode(charset)
    except Exception:  # LookupError, UnicodeError, a bytes-to-bytes codec...
        raise _Answer(
            "500 Internal Server Error",
            "Client.BadCharset",
            "body is not text in the charset of its Content-Type",
        ) from None
    return message.get_content_type(), charset


class GuardedWsgiApplication(WsgiApplication):
    """Spyne's WSGI application behind the checks Spyne itself lacks.

    Spyne raises out of the WSGI call (a logged traceback and a bare 500) for
    a POST with an empty body (StopIteration), a Content-Type charset Python
    does not know (LookupError), a body that is not text in that charset
    (UnicodeDecodeError) or a charset that is not one (``idna``); and it
    serves a SOAP call on any method but GET. These get a SOAP fault here. The
    body is read once (already bounded by the site) and handed on with a
    Content-Type naming only the checked charset, so Spyne decodes exactly
    what was checked. Whatever else raises gets a ``Server`` fault: every
    answer is whole before it is started, and every fault is logged as one
    short line (never a traceback: a client must not be able to fill the log).
    """

    def __init__(self, *args, answers: ValidatedAnswers | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.event_manager.add_listener("wsgi_exception", _note_fault)
        self.answers = answers

    def __call__(self, environ: dict, start_response, wsgi_url=None):
        environ = dict(environ)
        started: list = []

        def keep(status: str, headers: list, exc_info=None):
            started[:] = [status, headers]
            return None

        try:
            chunks = self._checked(environ, keep, wsgi_url)
            try:
                body = b"".join(chunks)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            status, headers = started
        except _Answer as answer:
            environ[_FAULT] = (answer.code, answer.reason)
            status, headers, body = answer.status, answer.headers, soap_fault(*environ[_FAULT])
            headers = [("Content-Type", "text/xml; charset=utf-8"), *headers]
        except Exception as exc:
            environ[_FAULT] = ("Server", f"internal error ({type(exc).__name__}: {exc})")
            status, body = "500 Internal Server Error", soap_fault("Server", "internal error")
            headers = [("Content-Type", "text/xml; charset=utf-8")]
        if not status.startswith(("2", "3")):
            code, reason = environ.get(_FAULT, ("?", ""))
            log_fault(
                environ.get("REMOTE_ADDR", "?"),
                environ.get("REQUEST_METHOD", "?"),
                status,
                code,
                reason,
            )
        headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        if self.answers is not None:
            self.answers.learn(environ, status, headers, body)
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    def _checked(self, environ: dict, start_response, wsgi_url):
        """Spyne's answer, once the request passed the checks (else ``_Answer``)."""
        method = environ.get("REQUEST_METHOD", "")
        if method == "GET":
            return super().__call__(environ, start_response, wsgi_url)
        if method != "POST":
            raise _Answer(
                "405 Method Not Allowed",
                "Client.MethodNotAllowed",
                "SOAP calls are POSTed; GET /?wsdl gives the WSDL",
                [("Allow", "GET, HEAD, POST")],
            )
        body = environ["wsgi.input"].read(self.max_content_length + 1)
        if len(body) > self.max_content_length:
            raise _Answer(
                "413 Request Entity Too Large",
                "Client.RequestTooLong",
                f"request body over {self.max_content_length} bytes",
            )
        if not body:
            raise _Answer("500 Internal Server Error", "Client", "empty body")
        environ[BODY] = body
        environ[CONTENT_TYPE] = environ.get("CONTENT_TYPE", "")
        mime, charset = _charset(body, environ[CONTENT_TYPE])
        environ["CONTENT_TYPE"] = mime if charset is None else f"{mime}; charset={charset}"
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input"] = BytesIO(body)
        return super().__call__(environ, start_response, wsgi_url)


def make_wsgi_application(
    max_content_length: int, answers: ValidatedAnswers | None = None
) -> WsgiApplication:
    """The application as a WSGI callable; Spyne also refuses bodies over the cap.

    With ``answers``, every answer it can be reused for is remembered there.
    """
    return GuardedWsgiApplication(
        make_application(), max_content_length=max_content_length, answers=answers
    )
