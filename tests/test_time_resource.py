"""Unit tests of the time service's web side, over in-memory requests."""

from __future__ import annotations

from io import BytesIO

from lxml import etree
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel

from p2p.timews.fault import soap_fault
from p2p.timews.inline import InlineWSGIResource, wsgi_environ
from p2p.timews.resource import is_wsdl_query, service_address
from p2p.timews.service import Options, wsdl_url


def request(
    host: bytes | None = None, path: bytes = b"/", method: bytes = b"GET", body: bytes = b""
) -> server.Request:
    """A real twisted.web request on a dummy channel (local address 10.0.0.1:80)."""
    req = server.Request(DummyChannel())
    req.method = method
    req.path = path
    req.uri = path + b"?wsdl"
    req.clientproto = b"HTTP/1.1"
    req.content = BytesIO(body)
    if host is not None:
        req.requestHeaders.setRawHeaders(b"host", [host])
    return req


class WsdlTests(TestCase):
    def test_wsdl_query(self):
        for query in (b"wsdl", b"WSDL", b"wsdl=", b"wsdl=1&x=2"):
            self.assertTrue(is_wsdl_query(query), query)
        for query in (b"", b"x=wsdl", b"wsdlx"):
            self.assertFalse(is_wsdl_query(query), query)

    def test_address_from_host_header(self):
        self.assertEqual(service_address(request(b"h.example:8000")), "http://h.example:8000/")
        self.assertEqual(service_address(request(b"[::1]:8000")), "http://[::1]:8000/")

    def test_bad_host_header_uses_local_address(self):
        """A Host that could break the XML is never echoed."""
        self.assertEqual(service_address(request(b'evil"><x')), "http://10.0.0.1:80/")

    def test_path_is_quoted(self):
        self.assertEqual(service_address(request(b"h:1", b'/a"b')), "http://h:1/a%22b")

    def test_printed_url(self):
        self.assertEqual(
            wsdl_url(IPv4Address("TCP", "0.0.0.0", 8000)), "http://127.0.0.1:8000/?wsdl"
        )
        self.assertEqual(wsdl_url(IPv4Address("TCP", "10.1.2.3", 81)), "http://10.1.2.3:81/?wsdl")


class FaultTests(TestCase):
    def test_fault_is_escaped_xml(self):
        root = etree.fromstring(soap_fault("Client.X", "a < b & c"))
        self.assertEqual(root.findtext(".//faultstring"), "a < b & c")
        self.assertEqual(root.findtext(".//faultcode"), "soap11env:Client.X")


class InlineTests(TestCase):
    def post(self, app) -> tuple[server.Request, bytes]:
        req = request(b"h", method=b"POST", body=b"<x/>")
        req.requestHeaders.setRawHeaders(b"content-type", [b"text/xml"])
        req.requestHeaders.setRawHeaders(b"x-thing", [b"1"])
        return req, InlineWSGIResource(app).render(req)

    def test_answer(self):
        seen = {}

        def app(environ, start_response):
            seen.update(environ)
            start_response("201 Made", [("Content-Type", "text/plain")])
            return [b"a", environ["wsgi.input"].read()]

        req, body = self.post(app)
        self.assertEqual((req.code, body), (201, b"a<x/>"))
        self.assertEqual(req.responseHeaders.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual((seen["REQUEST_METHOD"], seen["HTTP_X_THING"]), ("POST", "1"))
        self.assertEqual(seen["CONTENT_TYPE"], "text/xml")
        self.assertEqual((seen["SERVER_PORT"], seen["REMOTE_ADDR"]), ("80", "192.168.1.1"))

    def test_application_error_is_a_fault(self):
        def app(environ, start_response):
            raise RuntimeError("boom")

        req, body = self.post(app)
        self.assertEqual(req.code, 500)
        self.assertIn(b"Fault", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_environ_path(self):
        environ = wsgi_environ(request(b"h", b"/a%20b"))
        self.assertEqual((environ["PATH_INFO"], environ["QUERY_STRING"]), ("/a b", "wsdl"))


class OptionsTests(TestCase):
    def test_defaults(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["listen"], "tcp:8000")
        self.assertFalse(options["inline"])

    def test_tiny_body_cap_refused(self):
        from twisted.python.usage import UsageError

        self.assertRaises(UsageError, Options().parseOptions, ["--max-body", "10"])
