"""Prometheus metrics of every service: cheap counts on the hot path, served at ``/metrics``.

- :class:`Counter` and :class:`Histogram` count in plain dicts and lists,
  on the reactor thread only, so counting a request costs a dict update and a
  bisect (no lock, no prometheus_client object per request); a gauge is a
  function read when ``/metrics`` is asked for.
- :class:`Metrics` holds one service's families under one prefix
  (``p2p_indexer``, ``p2p_time``...) and is a ``prometheus_client`` collector:
  the families become Prometheus metrics only when scraped.
- :data:`METRICS_OPTION` is the ``--metrics ENDPOINT`` row every service shares
  (off by default); :func:`counts_wanted` and :func:`serve_metrics` read it.
- :class:`MetricsService` serves a ``twisted.web`` site whose ``/metrics``
  renders a registry of those collectors (and the process's CPU, memory and
  file descriptors) in Prometheus's text format, on the reactor thread.

Public Twisted API only; this module imports nothing of the services.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.application.service import IServiceCollection
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from p2p.console import say
from p2p.listening import ListeningService, local_http_url
from p2p.startup import ListenFailure, StartFailure

log = Logger()

#: Latency buckets in seconds: from a tenth of a millisecond (an indexer request
#: answered in its turn) to ten seconds (a request held by a slow client).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: A part's ``metrics`` value when its parent (the stack) serves every part's
#: metrics on one endpoint: the part counts and serves nothing itself.
BY_PARENT = "by-parent"


def metrics_endpoint(text: str) -> str:
    """An option value that must be a server endpoint description (``tcp:9100``...)."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a server endpoint ({exc})") from None
    return text


#: ``--metrics ENDPOINT``: the ``usage.Options`` row of every service (off by default).
METRICS_OPTION: list = [
    "metrics",
    None,
    None,
    "Serve Prometheus metrics at /metrics on this server endpoint "
    "(e.g. tcp:9100:interface=127.0.0.1). Off by default.",
    metrics_endpoint,
]


def counts_wanted(options) -> bool:
    """Whether the service's ``options`` ask it to count (served here or by its parent)."""
    return options["metrics"] is not None


def serve_metrics(parent: IServiceCollection, options, collectors: Iterable[Collector]) -> None:
    """Serve ``collectors`` on ``--metrics`` as a child of ``parent``, unless off or served
    by the parent (:data:`BY_PARENT`)."""
    where = options["metrics"]
    if where is not None and where != BY_PARENT:
        MetricsService(where, collectors).setServiceParent(parent)


class Counter:
    """A counter by label values: ``values[key]`` for each tuple ``key`` of label values."""

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.values: dict[tuple, float] = {}

    def inc(self, key: tuple = (), amount: float = 1) -> None:
        """Add ``amount`` to the count of ``key`` (one value per label)."""
        values = self.values
        values[key] = values.get(key, 0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(key, value)
        return family


class Histogram:
    """Observations by label values, in fixed buckets (``le``: at most the bound)."""

    __slots__ = ("bounds", "doc", "labels", "name", "series")

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        bounds: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.bounds = tuple(bounds)
        #: Per key: a count per bucket (the last one past every bound), then the sum.
        self.series: dict[tuple, list[float]] = {}

    def observe(self, value: float, key: tuple = ()) -> None:
        """Count ``value`` under ``key``."""
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        names = [*(_bound(b) for b in self.bounds), "+Inf"]
        for key, row in list(self.series.items()):
            total, buckets = 0, []
            for name, count in zip(names, row, strict=False):
                total += count
                buckets.append((name, total))
            family.add_metric(key, buckets, row[-1])
        return family


def _bound(value: float) -> str:
    return repr(float(value))


class _Reading:
    """A value read when scraped: a gauge, or a counter kept elsewhere."""

    __slots__ = ("doc", "kind", "name", "read")

    def __init__(self, name: str, doc: str, read: Callable[[], float | None], kind) -> None:
        self.name = name
        self.doc = doc
        self.read = read
        self.kind = kind

    def family(self) -> Metric | None:
        value = self.read()
        return None if value is None else self.kind(self.name, self.doc, value=value)


class Metrics(Collector):
    """One service's metrics, named ``PREFIX_...``; a prometheus_client collector."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._families: list[Counter | Histogram | _Reading] = []

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A new counter ``PREFIX_NAME_total``."""
        return self._add(Counter(f"{self.prefix}_{name}", doc, labels))

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        bounds: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        """A new histogram ``PREFIX_NAME`` (``_bucket``, ``_sum``, ``_count``)."""
        return self._add(Histogram(f"{self.prefix}_{name}", doc, labels, bounds))

    def gauge(self, name: str, doc: str, read: Callable[[], float | None]) -> None:
        """A gauge ``PREFIX_NAME``: ``read()`` when scraped (None: not shown)."""
        self._add(_Reading(f"{self.prefix}_{name}", doc, read, GaugeMetricFamily))

    def counted(self, name: str, doc: str, read: Callable[[], float | None]) -> None:
        """A counter ``PREFIX_NAME_total`` kept elsewhere: ``read()`` when scraped."""
        self._add(_Reading(f"{self.prefix}_{name}", doc, read, CounterMetricFamily))

    def _add(self, family):
        self._families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for item in self._families:
            family = item.family()
            if family is not None:
                yield family

    def sample(self, name: str, key: tuple = ()) -> float | None:
        """The value of counter ``PREFIX_NAME`` (or a histogram's count) under ``key``."""
        for item in self._families:
            if item.name == f"{self.prefix}_{name}":
                if isinstance(item, Counter):
                    return item.values.get(key)
                if isinstance(item, Histogram):
                    row = item.series.get(key)
                    return None if row is None else sum(row[:-1])
                return item.read()
        raise KeyError(name)


def registry_of(collectors: Iterable[Collector], process: bool = True) -> CollectorRegistry:
    """A registry of ``collectors`` and, with ``process``, this process's CPU, memory and fds."""
    registry = CollectorRegistry(auto_describe=True)
    if process and os.path.isdir("/proc"):
        ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsResource(resource.Resource):
    """Renders a registry in the format the scraper asks for (Prometheus text by default).

    On the reactor thread: the counts are only ever touched there.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return encode(self.registry)

    render_HEAD = render_GET


class _QuietSite(server.Site):
    """No access line per scrape (every 15 s from every scraper would fill the log)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: server.Request) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> server.Site:
    """A site serving ``registry`` at ``/metrics`` (anything else: 404)."""
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return _QuietSite(root, timeout=60)


def metrics_url(address: object) -> str:
    """Where a scraper on this host reaches a listening address's ``/metrics``."""
    url = local_http_url(address, "/metrics")
    if url is None:
        name = getattr(address, "name", address)
        url = f"unix:{os.fsdecode(name) if isinstance(name, bytes) else name} /metrics"
    return url


class MetricsService(ListenFailure, ListeningService):
    """Serves ``collectors`` at ``/metrics`` on ``description``; says ``s> metrics URL``
    (with ``say``: the real stdout unless given another writer of lines)."""

    label = "metrics"

    def __init__(
        self,
        description: str,
        collectors: Iterable[Collector],
        reactor=None,
        say: Callable[[str], None] = say,
    ) -> None:
        self.registry = registry_of(collectors)
        self.say = say
        super().__init__(description, metrics_site(self.registry), reactor)
        self.setName("metrics")
        #: Where ``/metrics`` is, once listening.
        self.url: str | None = None

    def listening(self, port: IListeningPort) -> None:
        self.url = metrics_url(port.getHost())
        self.say(f"s> metrics {self.url}")
        log.info("metrics at {url}", url=self.url)

    def cannot_listen(self, failure: Failure) -> None:
        try:
            super().cannot_listen(failure)
        except StartFailure as exc:  # its fix names this service's option
            raise StartFailure(str(exc).replace("--listen", "--metrics")) from failure.value
