"""The time client: the WSDL address, the real time service, the local-clock fallback."""

from __future__ import annotations

import re
from types import SimpleNamespace

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p import wire
from p2p.client import time_client
from p2p.client.time_client import TimeClient, wsdl_url
from tests.support import deadline, hold_port, spawn_twistd, time_url

DATETIME = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d$")


class WsdlUrlTests(TestCase):
    def test_option_then_environment_then_default(self) -> None:
        env = {"WSDL_URL": "http://env/?wsdl"}
        self.assertEqual(wsdl_url("http://opt/?wsdl", env), "http://opt/?wsdl")
        self.assertEqual(wsdl_url(None, env), "http://env/?wsdl")
        self.assertEqual(wsdl_url(None, {}), time_client.DEFAULT_WSDL)
        self.assertEqual(time_client.DEFAULT_WSDL, "http://localhost:8000/?wsdl")


class FallbackTests(TestCase):
    @defer.inlineCallbacks
    def test_unreachable_service_warns_once_and_uses_the_local_clock(self) -> None:
        warnings: list[str] = []
        url = f"http://127.0.0.1:{hold_port(self)}/?wsdl"  # refuses connections
        client = TimeClient(url, warnings.append, timeout=2, retry_after=0)
        first = yield deadline(client.now())
        second = yield deadline(client.now())
        for stamp in (first, second):
            self.assertRegex(stamp, DATETIME)
        self.assertEqual(len(warnings), 1)
        self.assertIn(url, warnings[0])
        self.assertIn("local clock", warnings[0])

    @defer.inlineCallbacks
    def test_after_a_failure_the_service_is_not_asked_for_a_while(self) -> None:
        calls = []

        def broken():
            calls.append(1)
            raise OSError("down")

        client = TimeClient("http://unused/?wsdl", lambda _: None, retry_after=3600)
        client._make_client = broken
        yield client.now()
        stamp = yield client.now()
        self.assertRegex(stamp, DATETIME)
        self.assertEqual(len(calls), 1)

    @defer.inlineCallbacks
    def test_junk_answer_falls_back(self) -> None:
        client = TimeClient("http://unused/?wsdl", lambda _: None)
        fake = SimpleNamespace(service=SimpleNamespace(get_time=lambda: "x" * 100))
        client._make_client = lambda: fake
        stamp = yield client.now()
        self.assertRegex(stamp, DATETIME)

    @defer.inlineCallbacks
    def test_client_is_built_once(self) -> None:
        built = []

        def make():
            built.append(1)
            return SimpleNamespace(service=SimpleNamespace(get_time=lambda: "17/12/2014 13:20:35"))

        client = TimeClient("http://unused/?wsdl", lambda _: None)
        client._make_client = make
        stamps = yield defer.gatherResults([client.now() for _ in range(5)])
        self.assertEqual(stamps, ["17/12/2014 13:20:35"] * 5)
        self.assertEqual(built, [1])


class RealServiceTests(TestCase):
    @defer.inlineCallbacks
    def test_time_from_the_real_service(self) -> None:
        service = spawn_twistd(self, "p2p-time", "--listen", "tcp:0:interface=127.0.0.1")
        url = yield time_url(service)
        warnings: list[str] = []
        client = TimeClient(url, warnings.append)
        stamp = yield deadline(client.now())
        self.assertRegex(stamp, DATETIME)
        wire.decode_field(stamp.encode(), wire.FieldKind.DATETIME)
        again = yield deadline(client.now())  # same session, same zeep client
        self.assertRegex(again, DATETIME)
        self.assertEqual(warnings, [])
