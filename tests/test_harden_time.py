"""Adversarial, deterministic tests of the SOAP time service, in process.

A real ``TimeSite`` (``make_site``) listens on 127.0.0.1, Spyne inline and in
the thread pool, and gets random malformed requests over raw TCP: broken XML,
entity bombs, deep nesting, odd methods, paths, Host and SOAPAction headers,
huge headers, pipelining, HTTP/1.0. Every answer must be a well-formed HTTP
response: 200 only for a real get_time call or the WSDL, else 4xx/5xx, a
SOAP fault when it has an XML body, never a traceback; the service must answer
a good call afterwards. trial fails a test on any error logged meanwhile.
"""

from __future__ import annotations

import random
import re

from lxml import etree
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from p2p.timews.app import NAMESPACE
from p2p.timews.resource import make_site
from tests.support import exchange

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
NS = {"e": SOAP_ENV, "t": NAMESPACE}
WSDL_NS = {"w": "http://schemas.xmlsoap.org/wsdl/", "s": "http://schemas.xmlsoap.org/wsdl/soap/"}
GET_TIME = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<e:Envelope xmlns:e="{SOAP_ENV}" xmlns:t="{NAMESPACE}">'
    "<e:Body><t:get_time/></e:Body></e:Envelope>"
).encode()
TIME = re.compile(rb"<[^>]*get_timeResult>\d\d/\d\d/\d{4} \d\d:\d\d:\d\d</")


def http_request(
    method: bytes = b"POST",
    target: bytes = b"/",
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    for name, value in headers or []:
        lines.append(name + b": " + value)
    if body or method == b"POST":
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def split_responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Parse back-to-back HTTP/1.x responses (Content-Length framed, or to the end)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:300]
        status, *header_lines = head.split(b"\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", status + b" ")
        assert match, status
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, data = rest[:size], rest[size:]
        else:
            body, data = rest, b""
        out.append((int(match.group(1)), headers, body))
    return out


class Mutator:
    """Random broken variants of a get_time request (fixed seed)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def body(self) -> tuple[bytes, bool]:
        """A body and whether it is still a valid get_time call."""
        r = self.r
        kind = r.randrange(12)
        if kind == 0:
            return GET_TIME, True
        if kind == 1:  # flipped bytes
            data = bytearray(GET_TIME)
            for _ in range(r.randrange(1, 5)):
                data[r.randrange(len(data))] = r.randrange(256)
            return bytes(data), False
        if kind == 2:  # truncated
            return GET_TIME[: r.randrange(len(GET_TIME))], False
        if kind == 3:
            return r.randbytes(r.randrange(0, 2000)), False
        if kind == 4:  # deep nesting
            depth = r.choice([300, 3000, 20000])
            return (b"<a>" * depth + b"</a>" * depth)[:60000], False
        if kind == 5:  # billion laughs
            ents = '<!ENTITY a0 "lol">' + "".join(
                f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, 12)
            )
            body = f"<!DOCTYPE e [{ents}]>".encode() + GET_TIME.split(b"?>", 1)[1]
            return body.replace(b"<t:get_time/>", b"<t:get_time>&a11;</t:get_time>"), False
        if kind == 6:  # quadratic blow-up: one big entity used many times
            ent = f'<!DOCTYPE e [<!ENTITY b "{"x" * 20000}">]>'.encode()
            body = ent + GET_TIME.split(b"?>", 1)[1]
            return body.replace(
                b"<t:get_time/>", b"<t:get_time>" + b"&b;" * 2000 + b"</t:get_time>"
            ), False
        if kind == 7:  # wrong operation or arguments
            return GET_TIME.replace(b"get_time/", b"get_time><x>1</x></t:get_time"), False
        if kind == 8:  # another encoding declared than used
            return GET_TIME.replace(b"UTF-8", r.choice([b"UTF-16", b"EBCDIC", b"nonsense"])), False
        if kind == 9:  # invalid UTF-8 inside
            return GET_TIME.replace(b"<t:get_time/>", b"<t:get_time>\xff\xfe</t:get_time>"), False
        if kind == 10:  # many attributes / namespaces
            attrs = b" ".join(b'a%d="1"' % i for i in range(r.randrange(1, 3000)))
            return GET_TIME.replace(b"<t:get_time/>", b"<t:get_time " + attrs + b"/>"), False
        return b"<?xml version='1.0'?><!-- " + b"-" * r.randrange(100) + b"", False

    def headers(self) -> list[tuple[bytes, bytes]]:
        r = self.r
        headers = [(b"Host", r.choice([b"127.0.0.1", b"h.example:1", b'e"><x', b"", b"[::1]:8"]))]
        if r.random() < 0.8:
            headers.append(
                (
                    b"Content-Type",
                    r.choice(
                        [
                            b"text/xml; charset=utf-8",
                            b"text/xml",
                            b"application/json",
                            b"text/xml; charset=klingon",
                            b"",
                        ]
                    ),
                )
            )
        if r.random() < 0.7:
            headers.append(
                (b"SOAPAction", r.choice([b'"get_time"', b"get_time", b'"nope"', b"", b'"' * 5]))
            )
        return headers


class HardenedSiteTests(TestCase):
    """Spyne in the reactor's thread pool (the default)."""

    inline = False

    def setUp(self):
        site = make_site(reactor, inline=self.inline)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port

    def send(self, data: bytes):
        return exchange(self.number, data, timeout=20)

    def check(self, status: int, headers: dict, body: bytes, may_succeed: bool, what=None) -> None:
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(b'File "', body)
        if status == 200:
            self.assertTrue(may_succeed, (what, body[:500]))
            return
        self.assertGreaterEqual(status, 400, body[:500])
        self.assertLess(status, 600)
        if body.lstrip().startswith(b"<"):
            root = etree.fromstring(body)
            self.assertEqual(len(root.findall("e:Body/e:Fault", NS)), 1, body[:500])

    @defer.inlineCallbacks
    def assert_still_answers(self):
        data = yield self.send(
            http_request(body=GET_TIME, headers=[(b"Host", b"x"), (b"Connection", b"close")])
        )
        [(status, _, body)] = split_responses(data)
        self.assertEqual(status, 200, body)
        self.assertRegex(body, TIME)

    @defer.inlineCallbacks
    def test_random_malformed_posts(self):
        mutator = Mutator(11)
        statuses = set()
        for _ in range(60):
            body, valid = mutator.body()
            headers = [*mutator.headers(), (b"Connection", b"close")]
            data = yield self.send(http_request(body=body, headers=headers))
            [(status, head, answer)] = split_responses(data)
            self.check(status, head, answer, valid)
            statuses.add(status)
            if status == 200:
                self.assertRegex(answer, TIME)
        self.assertTrue({200, 500} <= statuses, statuses)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_inputs_spyne_raised_on(self):
        """Each of these made Spyne raise out of the WSGI call: a logged traceback, a bare 500."""
        cases = [
            (b"POST", b"", b"text/xml; charset=utf-8", 500, b"Client"),
            (b"POST", GET_TIME, b"text/xml; charset=klingon", 500, b"Client.BadCharset"),
            (b"POST", GET_TIME, b"text/xml; charset=rot13", 500, b"Client.BadCharset"),
            (b"POST", GET_TIME + b"\xff", b"text/xml; charset=utf-8", 500, b"Client.BadCharset"),
            (b"PUT", GET_TIME, b"text/xml", 405, b"Client.MethodNotAllowed"),
            (b"HEAD", b"", b"text/xml", 405, None),
            (b"DELETE", b"", b"text/xml", 405, b"Client.MethodNotAllowed"),
        ]
        for method, body, content_type, code, fault in cases:
            headers = [(b"Host", b"h"), (b"Content-Type", content_type), (b"Connection", b"close")]
            data = yield self.send(http_request(method, b"/", body, headers))
            [(status, _, answer)] = split_responses(data)
            self.assertEqual(status, code, (method, content_type, answer))
            if fault is not None:
                root = etree.fromstring(answer)
                self.assertEqual(
                    root.findtext("e:Body/e:Fault/faultcode", namespaces=NS),
                    "soap11env:" + fault.decode(),
                )
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_methods_paths_and_versions(self):
        r = random.Random(12)
        for _ in range(60):
            method = r.choice([b"GET", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"POST", b"BREW"])
            target = r.choice(
                [
                    b"/",
                    b"/?wsdl",
                    b"/?WSDL=1",
                    b"/x/y",
                    b"//",
                    b"/%00",
                    b"/%ff?wsdl",
                    b"*",
                    b"/?" + b"a" * 3000,
                    b"/?wsdl&wsdl",
                ]
            )
            version = r.choice([b"HTTP/1.0", b"HTTP/1.1"])
            headers = [] if version == b"HTTP/1.0" and r.random() < 0.5 else [(b"Host", b"h")]
            body = GET_TIME if r.random() < 0.5 else b""
            data = yield self.send(
                http_request(method, target, body, [*headers, (b"Connection", b"close")], version)
            )
            [(status, head, answer)] = split_responses(data)
            is_wsdl = method in (b"GET", b"HEAD") and b"wsdl" in target.lower()
            # twisted.web answers "OPTIONS *" (the server as a whole) itself: 200, no body.
            is_wsdl = is_wsdl or (method, target) == (b"OPTIONS", b"*")
            self.check(
                status,
                head,
                answer,
                is_wsdl or (method == b"POST" and body != b""),
                (method, target, version),
            )
            if method == b"HEAD":
                self.assertEqual(answer, b"")
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_wsdl_host_injection(self):
        """Whatever the Host, the WSDL stays XML and names an http URL without markup."""
        hosts = [
            b'a"b',
            b"a<b>",
            b"a&amp;",
            b"x\tz",
            b"h:99999999",
            b"[::1",
            b"[::1]:80",
            b"a" * 300,
            b"\xff\xfe",
            b"h.example:80/evil",
            b"h?x",
            b"h#x",
            b"user@h",
        ]
        for host in hosts:
            data = yield self.send(
                http_request(
                    b"GET", b"/?wsdl", headers=[(b"Host", host), (b"Connection", b"close")]
                )
            )
            [(status, _, body)] = split_responses(data)
            if status != 200:
                self.assertGreaterEqual(status, 400)
                continue
            root = etree.fromstring(body)
            location = root.find("w:service/w:port/s:address", WSDL_NS).get("location")
            self.assertRegex(location, r"^http://[A-Za-z0-9.\-\[\]:]+/$", host)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_pipelined_requests_answered_in_order(self):
        good = http_request(body=GET_TIME, headers=[(b"Host", b"h")])
        bad = http_request(body=b"<x", headers=[(b"Host", b"h")])
        wsdl = http_request(b"GET", b"/?wsdl", headers=[(b"Host", b"h")])
        last = http_request(body=GET_TIME, headers=[(b"Host", b"h"), (b"Connection", b"close")])
        data = yield self.send(good + bad + wsdl + good + bad + last)
        statuses = [s for s, _, _ in split_responses(data)]
        self.assertEqual(statuses, [200, 500, 200, 200, 500, 200])

    @defer.inlineCallbacks
    def test_huge_headers_refused(self):
        for extra in (
            [(b"X-Big", b"a" * 70000)],
            [(b"X-H%d" % i, b"v") for i in range(2000)],
        ):
            data = yield self.send(http_request(body=GET_TIME, headers=extra))
            if data:  # Twisted closes at once on an over-long line, else answers 400
                self.assertRegex(data[:12], rb"^HTTP/1\.1 4\d\d")
            self.assertNotIn(b"get_timeResult", data)
        yield self.assert_still_answers()

    @defer.inlineCallbacks
    def test_garbage_request_lines(self):
        r = random.Random(13)
        for _ in range(40):
            junk = r.choice(
                [
                    r.randbytes(r.randrange(1, 300)),
                    b"GET\r\n\r\n",
                    b"POST / HTTP/9.9\r\n\r\n",
                    b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
                    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                ]
            )
            data = yield self.send(junk + b"\r\n\r\n")
            if data:  # twisted answers 400 or just closes
                self.assertRegex(data[:12], rb"^HTTP/1\.[01] [45]\d\d")
                self.assertNotIn(b"Traceback", data)
        yield self.assert_still_answers()


class HardenedInlineSiteTests(HardenedSiteTests):
    """The same with ``--inline`` (Spyne on the reactor)."""

    inline = True
