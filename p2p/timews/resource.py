"""The time service's twisted.web side: the site, the request body cap and the WSDL.

Spyne's own ``spyne.server.twisted`` does not import with current Twisted, so
the SOAP calls reach Spyne through its WSGI application mounted in
``twisted.web.wsgi.WSGIResource`` (the reactor's thread pool), or on the
reactor itself with ``--inline`` (:mod:`p2p.timews.inline`). The WSDL is answered
here, on the reactor, with the service address of the host the client asked
for (Spyne would cache the address of the first request forever).
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote, unquote_to_bytes
from xml.sax.saxutils import escape

from twisted.internet.interfaces import IReactorThreads
from twisted.web import http, resource, server
from twisted.web.wsgi import WSGIResource

from p2p.metrics import Metrics
from p2p.timews.answers import Key, ValidatedAnswers, answer_key
from p2p.timews.app import make_wsgi_application
from p2p.timews.fault import log_fault, soap_fault
from p2p.timews.inline import InlineWSGIResource

#: Default cap on a request body: a get_time envelope is a few hundred bytes.
DEFAULT_MAX_BODY = 64 * 1024

#: Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 60
#: Placeholder service address, swapped for the asked-for URL in every WSDL answer.
_PLACEHOLDER = "http://p2p-time.invalid/"
#: A Host header we are willing to echo into the WSDL: a name or IPv4, or [IPv6], and a port.
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")


class BoundedRequest(server.Request):
    """A request whose body may not exceed ``site.max_body`` bytes.

    The check happens while the body arrives (announced length or chunk by
    chunk), so an oversized body is never stored: the client gets a 413 SOAP
    fault and the connection is closed.
    """

    _refused = False
    _received = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: When the request line was read (its latency runs from here).
        self.begun = time.monotonic()

    def _limit(self) -> int:
        return getattr(self.channel.site, "max_body", DEFAULT_MAX_BODY)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # already answered; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        """Answer 413 with a fault straight on the transport and hang up."""
        self._refused = True
        self.content = None
        reason = f"request body over {self._limit()} bytes"
        peer = getattr(self.getClientAddress(), "host", "?")
        # the body's length is known before twisted.web sets the method
        method = "?" if self.method == server.Request.method else self.method.decode("latin-1")
        log_fault(peer, method, "413 Request Entity Too Large", "Client.RequestTooLong", reason)
        body = soap_fault("Client.RequestTooLong", reason)
        head = (
            "HTTP/1.1 413 Request Entity Too Large\r\n"
            "Content-Type: text/xml; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        counted = getattr(self.channel.site, "counted", None)
        if counted is not None:
            counted(self, 413)
        transport = self.channel.transport
        transport.write(head + body)
        transport.loseConnection()


class TimeSite(server.Site):
    """The site of the time service: bounded requests, no traceback pages.

    An answer with an error status has no access line: its fault was logged
    once, with its code, where it was made (``p2p.timews.fault.log_fault``).
    """

    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, root: resource.IResource, max_body: int = DEFAULT_MAX_BODY) -> None:
        # A SOAP body is never a form: twisted.web would parse its Content-Type
        # (through the email package, a quarter of a get_time call) to find out.
        super().__init__(root, timeout=IDLE_TIMEOUT, parsePOSTFormSubmission=False)
        self.max_body = max_body

    #: Counts requests and their latency (:meth:`count_in`); None: not counted.
    metrics: Metrics | None = None

    def count_in(self, metrics: Metrics) -> None:
        """Count each answered request in ``metrics``: by method and status, and its latency."""
        self.metrics = metrics
        self._requests = metrics.counter(
            "requests", "HTTP requests answered, by method and status code.", ("method", "code")
        )
        self._latency = metrics.histogram(
            "request_duration_seconds",
            "Seconds from a request's first line to its answer's end, by method.",
            ("method",),
        )

    def counted(self, request: server.Request, code: int) -> None:
        """One request answered with ``code``: count it (when counting)."""
        if self.metrics is None:
            return
        method = request.method.decode("latin-1") if request.method in _METHODS else "other"
        self._requests.inc((method, str(code)))
        self._latency.observe(time.monotonic() - request.begun, (method,))

    def log(self, request: server.Request) -> None:
        self.counted(request, request.code)
        if request.code < 400:
            super().log(request)


#: Methods counted under their own name (any other is "other": the labels stay few).
_METHODS = frozenset((b"GET", b"HEAD", b"POST"))


def is_wsdl_query(query: bytes) -> bool:
    """True for ``?wsdl`` (any case, with or without a value), as Spyne decides."""
    return query.split(b"&")[0].split(b"=")[0].lower() == b"wsdl"


def service_address(request: server.Request) -> str:
    """The URL the client used to reach us: scheme, the Host it asked for, the path."""
    scheme = "https" if request.isSecure() else "http"
    raw = request.getHeader(b"host")
    host = raw.decode("ascii", "replace") if raw is not None else ""
    if not _HOST.match(host):
        local = request.getHost()
        name = getattr(local, "host", "localhost")
        name = f"[{name}]" if ":" in name else name
        host = f"{name}:{local.port}" if hasattr(local, "port") else name
    path = quote(request.path.decode("latin-1"), safe="/")
    return f"{scheme}://{host}{path}"


class TimeResource(resource.Resource):
    """``GET ?wsdl`` answered here; everything else goes to Spyne (SOAP or fault)."""

    isLeaf = True

    def __init__(
        self,
        soap: resource.IResource,
        wsdl_template: bytes,
        answers: ValidatedAnswers | None = None,
    ) -> None:
        super().__init__()
        self._soap = soap
        self._wsdl = wsdl_template
        self._answers = answers

    def render(self, request: server.Request) -> bytes | int:
        query = request.uri.partition(b"?")[2]
        if request.method == b"POST" and self._answers is not None:
            known = self._answers.lookup(request_key(request, query))
            if known is not None:
                return self.render_known(request, *known)
        elif request.method in (b"GET", b"HEAD") and is_wsdl_query(query):
            return self.render_wsdl(request)
        return self._soap.render(request)

    def render_known(
        self, request: server.Request, status: str, headers: list, body: bytes
    ) -> bytes:
        """Spyne's answer to an identical request, naming the current second."""
        code, _, message = status.partition(" ")
        request.setResponseCode(int(code), message.encode("latin-1"))
        for name, value in headers:
            request.responseHeaders.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        return body

    def render_wsdl(self, request: server.Request) -> bytes:
        location = escape(service_address(request), {'"': "&quot;"}).encode("utf-8")
        request.setResponseCode(http.OK)
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        return self._wsdl.replace(_PLACEHOLDER.encode("ascii"), location)


def request_key(request: server.Request, query: bytes) -> Key:
    """The key of a POST's answer (:func:`p2p.timews.answers.answer_key`), as Spyne
    would see the request through WSGI."""
    content = request.content
    if content is None:
        body = b""
    else:
        content.seek(0)
        body = content.read()
        content.seek(0)
    return answer_key(
        "POST",
        unquote_to_bytes(request.path).decode("latin-1"),
        query.decode("latin-1"),
        (request.getHeader(b"content-type") or b"").decode("latin-1"),
        body,
    )


def make_site(
    reactor: IReactorThreads, max_body: int = DEFAULT_MAX_BODY, inline: bool = False
) -> TimeSite:
    """The whole web side: Spyne's WSGI app, the WSDL, the body cap.

    Spyne runs in the reactor's thread pool through ``WSGIResource``, so a slow
    SOAP parse never holds the reactor; ``inline`` runs it on the reactor.
    """
    answers = ValidatedAnswers()
    wsgi_app = make_wsgi_application(max_content_length=max_body, answers=answers)
    wsdl = wsgi_app.doc.wsdl11
    wsdl.build_interface_document(_PLACEHOLDER)
    template = wsdl.get_interface_document()
    if inline:
        soap = InlineWSGIResource(wsgi_app)
    else:
        soap = WSGIResource(reactor, reactor.getThreadPool(), wsgi_app)
    return TimeSite(TimeResource(soap, template, answers), max_body=max_body)
