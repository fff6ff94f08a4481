"""Unit tests of p2p.metrics: the counts, their Prometheus text, the option, the endpoint."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.python import usage
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from p2p.metrics import (
    BY_PARENT,
    METRICS_OPTION,
    Metrics,
    MetricsResource,
    MetricsService,
    counts_wanted,
    registry_of,
    serve_metrics,
)
from p2p.startup import StartFailure


def scrape(collectors, process: bool = False) -> dict[tuple, float]:
    """Every sample of ``collectors`` rendered as Prometheus text and parsed back."""
    text = MetricsResource(registry_of(collectors, process=process)).render_GET(DummyRequest([]))
    return samples(text.decode("utf-8"))


def samples(text: str) -> dict[tuple, float]:
    """``{(name, ((label, value), ...)): value}`` of a Prometheus text page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class _Options(usage.Options):
    optParameters = [METRICS_OPTION]


class CountTests(TestCase):
    def test_counter_by_labels(self):
        m = Metrics("p2p_test")
        requests = m.counter("requests", "Requests.", ("op", "code"))
        requests.inc(("LIST", "0"))
        requests.inc(("LIST", "0"))
        requests.inc(("PUBLISH", "3"), amount=2)
        got = scrape([m])
        self.assertEqual(got[("p2p_test_requests_total", (("code", "0"), ("op", "LIST")))], 2)
        self.assertEqual(got[("p2p_test_requests_total", (("code", "3"), ("op", "PUBLISH")))], 2)
        self.assertEqual(m.sample("requests", ("LIST", "0")), 2)

    def test_histogram_buckets_are_cumulative_and_at_most_the_bound(self):
        m = Metrics("p2p_test")
        latency = m.histogram("duration_seconds", "Latency.", ("op",), bounds=(0.001, 0.01))
        for value in (0.0005, 0.001, 0.005, 3.0):
            latency.observe(value, ("LIST",))
        got = scrape([m])
        bucket = "p2p_test_duration_seconds_bucket"
        self.assertEqual(got[(bucket, (("le", "0.001"), ("op", "LIST")))], 2)  # 0.001 <= 0.001
        self.assertEqual(got[(bucket, (("le", "0.01"), ("op", "LIST")))], 3)
        self.assertEqual(got[(bucket, (("le", "+Inf"), ("op", "LIST")))], 4)
        self.assertEqual(got[("p2p_test_duration_seconds_count", (("op", "LIST"),))], 4)
        self.assertAlmostEqual(
            got[("p2p_test_duration_seconds_sum", (("op", "LIST"),))], 3.0065, places=9
        )
        self.assertEqual(m.sample("duration_seconds", ("LIST",)), 4)

    def test_gauges_and_outside_counters_are_read_when_scraped(self):
        m = Metrics("p2p_test")
        state = {"open": 3, "stored": 7}
        m.gauge("open_connections", "Open.", lambda: state["open"])
        m.counted("records_stored", "Stored.", lambda: state["stored"])
        m.gauge("not_running", "Nothing yet.", lambda: None)
        state["open"] = 5
        got = scrape([m])
        self.assertEqual(got[("p2p_test_open_connections", ())], 5)
        self.assertEqual(got[("p2p_test_records_stored_total", ())], 7)
        self.assertNotIn(("p2p_test_not_running", ()), got)

    def test_process_figures(self):
        got = scrape([Metrics("p2p_test")], process=True)
        self.assertIn(("process_cpu_seconds_total", ()), got)

    def test_unknown_sample(self):
        self.assertRaises(KeyError, Metrics("p2p_test").sample, "nothing")


class OptionTests(TestCase):
    def test_off_by_default(self):
        options = _Options()
        options.parseOptions([])
        self.assertIsNone(options["metrics"])
        self.assertFalse(counts_wanted(options))
        parent = MultiService()
        serve_metrics(parent, options, [])
        self.assertEqual(list(parent), [])

    def test_an_endpoint(self):
        options = _Options()
        options.parseOptions(["--metrics", "tcp:0:interface=127.0.0.1"])
        self.assertTrue(counts_wanted(options))
        parent = MultiService()
        serve_metrics(parent, options, [])
        [child] = list(parent)
        self.assertIsInstance(child, MetricsService)

    def test_by_parent_counts_and_serves_nothing(self):
        options = _Options()
        options.parseOptions([])
        options["metrics"] = BY_PARENT
        self.assertTrue(counts_wanted(options))
        parent = MultiService()
        serve_metrics(parent, options, [])
        self.assertEqual(list(parent), [])

    def test_not_an_endpoint(self):
        self.assertRaises(usage.UsageError, _Options().parseOptions, ["--metrics", "nonsense:1"])


class ServiceTests(TestCase):
    @defer.inlineCallbacks
    def test_serves_metrics_and_says_where(self):
        from twisted.internet import reactor
        from twisted.web.client import Agent, readBody

        m = Metrics("p2p_test")
        m.counter("requests", "Requests.", ("op",)).inc(("LIST",))
        said = []
        service = MetricsService("tcp:0:interface=127.0.0.1", [m], say=said.append)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.port.getHost().port
        self.assertEqual(said, [f"s> metrics http://127.0.0.1:{port}/metrics"])
        agent = Agent(reactor)
        response = yield agent.request(b"GET", service.url.encode("ascii"))
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(samples(body.decode())[("p2p_test_requests_total", (("op", "LIST"),))], 1)
        elsewhere = yield agent.request(b"GET", f"http://127.0.0.1:{port}/other".encode())
        yield readBody(elsewhere)
        self.assertEqual(elsewhere.code, 404)

    def test_port_taken_names_the_option(self):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        service = MetricsService(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", [])
        with self.assertRaises(StartFailure) as caught:
            service.privilegedStartService()
        self.assertIn("metrics cannot listen on", str(caught.exception))
        self.assertIn("--metrics", str(caught.exception))
        self.assertNotIn("--listen", str(caught.exception))
