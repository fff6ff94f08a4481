"""End-to-end tests of ``twistd p2p-time``: a real process on ``tcp:0``, at the URL it prints.

zeep (blocking, so in a thread) and raw HTTP (Agent, or a bare TCP socket)
talk to it; every malformed request must get a SOAP fault and leave the
service answering.
"""

from __future__ import annotations

import time
from datetime import datetime
from io import BytesIO
from pathlib import Path

from lxml import etree
from twisted.internet import defer, reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from p2p import wire
from p2p.timews.app import NAMESPACE
from tests.support import deadline, exchange, spawn_twistd, time_url, url_port

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
GET_TIME = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<e:Envelope xmlns:e="{SOAP_ENV}" xmlns:t="{NAMESPACE}">'
    "<e:Body><t:get_time/></e:Body></e:Envelope>"
).encode()
NS = {"e": SOAP_ENV, "t": NAMESPACE}


def parse_time(text: str) -> float:
    """Seconds since the epoch of a ``dd/mm/YYYY HH:MM:SS`` local time."""
    return time.mktime(datetime.strptime(text, wire.DATETIME_FORMAT).timetuple())


class TimeServiceTests(TestCase):
    """A real ``twistd p2p-time`` per test (Spyne run on the reactor)."""

    options: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.proc = spawn_twistd(
            self, "p2p-time", "--listen", "tcp:0:interface=127.0.0.1", *self.options
        )
        self.wsdl = yield time_url(self.proc)
        self.port = url_port(self.wsdl)
        self.base = f"http://127.0.0.1:{self.port}/"
        self.agent = Agent(reactor)

    def post(self, body: bytes, content_type: bytes = b"text/xml; charset=utf-8"):
        headers = Headers({b"content-type": [content_type], b"soapaction": [b'"get_time"']})
        d = self.agent.request(
            b"POST", self.base.encode(), headers, FileBodyProducer(BytesIO(body))
        )
        return deadline(d, 10)

    @defer.inlineCallbacks
    def get_wsdl(self, host: bytes):
        """GET ?wsdl asking for ``host``: the response and its body."""
        response = yield deadline(
            self.agent.request(b"GET", f"{self.base}?wsdl".encode(), Headers({b"host": [host]})),
            10,
        )
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def assert_fault(self, response, code: int = 500):
        body = yield readBody(response)
        self.assertEqual(response.code, code, body)
        root = etree.fromstring(body)
        faults = root.findall("e:Body/e:Fault", NS)
        self.assertEqual(len(faults), 1, body)
        self.assertIn("Client", faults[0].findtext("faultcode"))
        return faults[0]

    @defer.inlineCallbacks
    def assert_still_answers(self):
        response = yield self.post(GET_TIME)
        body = yield readBody(response)
        self.assertEqual(response.code, 200, body)
        path = "e:Body/t:get_timeResponse/t:get_timeResult"
        result = etree.fromstring(body).findtext(path, namespaces=NS)
        self.assertLess(abs(parse_time(result) - time.time()), 5)

    def test_printed_url(self):
        """The service says where its WSDL is: the address bound, not the port asked for."""
        self.assertRegex(self.wsdl, r"^http://127\.0\.0\.1:[1-9][0-9]*/\?wsdl$")

    @defer.inlineCallbacks
    def test_zeep(self):
        """zeep reads the WSDL and get_time answers a parsable time close to now."""

        def call() -> str:
            import zeep

            client = zeep.Client(self.wsdl)
            return client.service.get_time()

        answer = yield deadline(threads.deferToThread(call), 15)
        self.assertIsInstance(answer, str)
        self.assertLess(abs(parse_time(answer) - time.time()), 5)

    @defer.inlineCallbacks
    def test_raw_post(self):
        """A hand-written envelope gets a get_timeResponse with the time in the format."""
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_wsdl_address_follows_host(self):
        """The WSDL names the service at the host the client asked for."""
        response, body = yield self.get_wsdl(b"timehost.example:8123")
        self.assertEqual(response.code, 200)
        root = etree.fromstring(body)
        wsdl_ns = {
            "w": "http://schemas.xmlsoap.org/wsdl/",
            "s": "http://schemas.xmlsoap.org/wsdl/soap/",
        }
        address = root.find("w:service/w:port/s:address", wsdl_ns)
        self.assertEqual(address.get("location"), "http://timehost.example:8123/")
        self.assertEqual(root.findall("w:portType/w:operation", wsdl_ns)[0].get("name"), "get_time")

    @defer.inlineCallbacks
    def test_wsdl_is_byte_identical(self):
        """The WSDL is Spyne's, byte for byte, whatever fast path answers get_time."""
        yield self.assert_still_answers()
        response, body = yield self.get_wsdl(b"timehost.example:8123")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, (Path(__file__).parent / "data" / "time.wsdl").read_bytes())

    @defer.inlineCallbacks
    def test_every_answer_names_the_current_second(self):
        """Repeated identical calls (answered from memory after the first) each name the
        second they were answered in, across a change of second."""
        seen: set[str] = set()
        give_up = time.time() + 10
        while len(seen) < 2 and time.time() < give_up:
            before = time.time()
            response = yield self.post(GET_TIME)
            body = yield readBody(response)
            after = time.time()
            self.assertEqual(response.code, 200, body)
            path = "e:Body/t:get_timeResponse/t:get_timeResult"
            stamp = etree.fromstring(body).findtext(path, namespaces=NS)
            self.assertLessEqual(int(before), parse_time(stamp))
            self.assertLessEqual(parse_time(stamp), after)
            seen.add(stamp)
        self.assertEqual(len(seen), 2, "no change of second seen in 10 s")

    @defer.inlineCallbacks
    def test_not_xml(self):
        response = yield self.post(b"this is not xml")
        yield self.assert_fault(response)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_wrong_envelope(self):
        response = yield self.post(b"<notsoap><Body/></notsoap>")
        yield self.assert_fault(response)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_unknown_operation(self):
        body = GET_TIME.replace(b"t:get_time/", b"t:get_weather/")
        response = yield self.post(body)
        yield self.assert_fault(response)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_entity_expansion_bomb(self):
        """Nested entities ("billion laughs") are refused by the parser, not expanded."""
        entities = '<!ENTITY a0 "lollollollollollollollollollol">' + "".join(
            f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, 10)
        )
        body = GET_TIME.replace(b"<e:Envelope", f"<!DOCTYPE e [{entities}]><e:Envelope".encode())
        body = body.replace(b"<t:get_time/>", b"<t:get_time>&a9;</t:get_time>")
        response = yield self.post(body)
        yield self.assert_fault(response)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_external_entity_not_read(self):
        """An external entity is never fetched into the answer."""
        secret = Path(self.mktemp())
        secret.write_text("TOP-SECRET-CONTENT")
        doctype = f'<!DOCTYPE e [<!ENTITY x SYSTEM "file://{secret.resolve()}">]>'
        body = GET_TIME.replace(b"<e:Envelope", doctype.encode() + b"<e:Envelope")
        body = body.replace(b"<t:get_time/>", b"<t:get_time>&x;</t:get_time>")
        response = yield self.post(body)
        answer = yield readBody(response)
        self.assertNotIn(b"TOP-SECRET", answer)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_get_without_wsdl(self):
        """A plain GET is not a SOAP call: a fault with 405, not a page."""
        response = yield deadline(self.agent.request(b"GET", self.base.encode()), 10)
        yield self.assert_fault(response, code=405)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_huge_body(self):
        """A body announced over the cap is refused at once with 413 and a fault."""
        data = yield exchange(
            self.port,
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + b"<" * 10000,
        )
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        fault = etree.fromstring(body).find("e:Body/e:Fault", NS)
        self.assertIn("RequestTooLong", fault.findtext("faultcode"))
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_huge_chunked_body(self):
        """A chunked body that grows past the cap is cut off the same way."""
        chunk = b"a" * 32768
        data = yield exchange(
            self.port,
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 4,
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data[:200])
        yield self.assert_still_answers()


class InlineTimeServiceTests(TimeServiceTests):
    """The same with ``--inline``: Spyne on the reactor thread."""

    options = ("--inline",)


class ConnectionCapTests(TestCase):
    """``--max-connections``: slow clients hold a slot each, never more than the cap."""

    @defer.inlineCallbacks
    def test_cap_closes_extra_connections_and_frees_slots(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        proc = spawn_twistd(
            self, "p2p-time", "--listen", "tcp:0:interface=127.0.0.1", "--max-connections=2"
        )
        port = url_port((yield time_url(proc)))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        # two silent clients take both slots (one byte of a request line each)
        idle = []
        for _ in range(2):
            conn = yield connectProtocol(endpoint, Protocol())
            conn.transport.write(b"P")
            idle.append(conn)
        # a third is closed at once, without a byte
        refused = yield exchange(port, b"POST / HTTP/1.1\r\n", timeout=10)
        self.assertEqual(refused, b"")
        # a slot frees up: a real call is served again
        closed = Deferred()
        idle[0].connectionLost = lambda reason: closed.callback(None)
        idle[0].transport.loseConnection()
        yield deadline(closed, 10)
        request = (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(GET_TIME) + GET_TIME
        )
        for _ in range(50):  # the server may see the close a moment after the client did
            answer = yield exchange(port, request, timeout=10)
            if answer:
                break
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertIn(b"get_timeResult", answer)
        idle[1].transport.loseConnection()
