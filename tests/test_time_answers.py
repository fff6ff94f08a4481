"""The time service's reuse of validated answers (p2p.timews.answers), in memory.

A request byte-identical to one Spyne validated and answered gets the same
envelope naming the current second, without Spyne; anything else still goes
to Spyne (its faults unchanged); the memory is bounded.
"""

from __future__ import annotations

from io import BytesIO

from lxml import etree
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel

from p2p import wire
from p2p.timews.answers import BODY, CONTENT_TYPE, STAMP, ValidatedAnswers, answer_key
from p2p.timews.app import make_wsgi_application
from p2p.timews.inline import InlineWSGIResource
from p2p.timews.resource import TimeResource, request_key
from tests.test_time_service import GET_TIME, NS

UTF8 = b"text/xml; charset=utf-8"
#: 27/11/2026 12:00:00 in UTC; tests compare against wire.format_datetime of it.
NOON = 1796212800.0


class FakeClock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def environ(body: bytes = GET_TIME, stamp: str = "01/01/2026 00:00:00", **extra) -> dict:
    """The environ as the guard leaves it after Spyne answered ``stamp``."""
    env = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        CONTENT_TYPE: UTF8.decode(),
        BODY: body,
        STAMP: stamp,
    }
    env.update(extra)
    return env


def envelope(stamp: str) -> bytes:
    return f"<a>{stamp}</a>".encode()


class ValidatedAnswersTests(TestCase):
    def key(self, body: bytes = GET_TIME) -> tuple:
        return answer_key("POST", "/", "", UTF8.decode(), body)

    def test_identical_request_gets_the_current_second(self):
        clock = FakeClock()
        answers = ValidatedAnswers(clock=clock)
        headers = [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", "30")]
        answers.learn(environ(), "200 OK", headers, envelope("01/01/2026 00:00:00"))
        status, kept, body = answers.lookup(self.key())
        self.assertEqual(status, "200 OK")
        self.assertEqual(kept, [("Content-Type", "text/xml; charset=utf-8")])
        self.assertEqual(body, envelope(wire.format_datetime(NOON)))
        clock.now += 1
        self.assertEqual(answers.lookup(self.key())[2], envelope(wire.format_datetime(NOON + 1)))
        self.assertEqual(answers.hits, 2)

    def test_other_bytes_are_not_known(self):
        answers = ValidatedAnswers()
        answers.learn(environ(), "200 OK", [], envelope("01/01/2026 00:00:00"))
        self.assertIsNone(answers.lookup(self.key(GET_TIME + b" ")))
        other_type = answer_key("POST", "/", "", "text/xml; charset=latin-1", GET_TIME)
        self.assertIsNone(answers.lookup(other_type))
        self.assertEqual(answers.hits, 0)

    def test_only_reusable_answers_are_learned(self):
        answers = ValidatedAnswers(max_body=len(GET_TIME))
        stamp = "01/01/2026 00:00:00"
        answers.learn(environ(), "500 Internal Server Error", [], envelope(stamp))  # a fault
        answers.learn(environ(stamp=None), "200 OK", [], envelope(stamp))  # not get_time
        answers.learn(environ(REQUEST_METHOD="GET"), "200 OK", [], envelope(stamp))
        answers.learn(environ(), "200 OK", [], envelope(stamp) * 2)  # stamp twice
        answers.learn(environ(), "200 OK", [], b"<a/>")  # stamp absent
        answers.learn(environ(GET_TIME + b" "), "200 OK", [], envelope(stamp))  # too long
        self.assertEqual(len(answers), 0)
        answers.learn(environ(), "200 OK", [], envelope(stamp))
        self.assertEqual(len(answers), 1)

    def test_memory_is_bounded_oldest_forgotten(self):
        answers = ValidatedAnswers(max_entries=2)
        bodies = [GET_TIME + b" " * i for i in range(3)]
        for body in bodies:
            answers.learn(environ(body), "200 OK", [], envelope("01/01/2026 00:00:00"))
        self.assertEqual(len(answers), 2)
        self.assertIsNone(answers.lookup(self.key(bodies[0])))
        self.assertIsNotNone(answers.lookup(self.key(bodies[2])))


def post(body: bytes = GET_TIME, content_type: bytes = UTF8, path: bytes = b"/") -> server.Request:
    """A real twisted.web POST on a dummy channel, body fully received."""
    req = server.Request(DummyChannel())
    req.method = b"POST"
    req.path = path
    req.uri = path
    req.clientproto = b"HTTP/1.1"
    req.content = BytesIO(body)
    req.requestHeaders.setRawHeaders(b"content-type", [content_type])
    return req


def stamp_of(body: bytes) -> str:
    return etree.fromstring(body).findtext("e:Body/t:get_timeResponse/t:get_timeResult", None, NS)


class TimeResourceTests(TestCase):
    """TimeResource in front of the real Spyne application (run inline)."""

    def setUp(self):
        self.answers = ValidatedAnswers()
        self.spyne_calls = 0
        app = make_wsgi_application(64 * 1024, answers=self.answers)

        def counted(environ, start_response):
            self.spyne_calls += 1
            return app(environ, start_response)

        self.resource = TimeResource(InlineWSGIResource(counted), b"<wsdl/>", self.answers)

    def render(self, req: server.Request) -> bytes:
        return self.resource.render(req)

    def test_second_identical_call_skips_spyne_with_the_same_answer(self):
        first = post()
        spyne_body = self.render(first)
        second = post()
        known_body = self.render(second)
        self.assertEqual((self.spyne_calls, self.answers.hits), (1, 1))
        self.assertEqual((first.code, second.code), (200, 200))
        self.assertEqual(
            known_body,
            spyne_body.replace(stamp_of(spyne_body).encode(), stamp_of(known_body).encode()),
        )
        self.assertEqual(
            second.responseHeaders.getRawHeaders(b"content-type"),
            first.responseHeaders.getRawHeaders(b"content-type"),
        )
        self.assertEqual(
            request_key(second, b""), answer_key("POST", "/", "", UTF8.decode(), GET_TIME)
        )

    def test_malformed_calls_still_get_spyne_faults(self):
        self.render(post())  # learned
        for body in (GET_TIME.replace(b"get_time/", b"get_timeX/"), GET_TIME[:-1], b"<x"):
            req = post(body)
            answer = self.render(req)
            self.assertEqual(req.code, 500, answer)
            fault = etree.fromstring(answer).find("e:Body/e:Fault", NS)
            self.assertIsNotNone(fault, answer)
            self.assertIn("Client", fault.findtext("faultcode"))
        self.assertEqual((self.spyne_calls, self.answers.hits, len(self.answers)), (4, 0, 1))

    def test_same_body_other_content_type_goes_to_spyne(self):
        self.render(post())
        req = post(content_type=b"text/xml; charset=bogus-charset")
        answer = self.render(req)
        self.assertEqual(req.code, 500)
        self.assertIn(b"Client.BadCharset", answer)
        self.assertEqual(self.answers.hits, 0)
