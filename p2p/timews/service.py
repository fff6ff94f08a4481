"""``twistd p2p-time``: the options and the service of the SOAP time service."""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python import usage

from p2p import wire
from p2p.console import say
from p2p.listening import (
    CAP_OPTIONS,
    CappedWrappingFactory,
    ListeningService,
    local_http_url,
)
from p2p.logs import LogOptions, ServiceLogs
from p2p.metrics import METRICS_OPTION, Metrics, counts_wanted, serve_metrics
from p2p.startup import ListenFailure, StartGuard
from p2p.timews.resource import DEFAULT_MAX_BODY, make_site

log = Logger()


class Options(LogOptions, usage.Options):
    """Command line of ``twistd p2p-time``."""

    synopsis = "[--listen ENDPOINT] [--max-body BYTES] [--inline] [--metrics ENDPOINT]"
    longdesc = (
        "SOAP 1.1 time service: one operation, get_time, returning the local time as "
        "dd/mm/YYYY HH:MM:SS. The WSDL is served at /?wsdl."
    )
    optFlags = [
        [
            "inline",
            None,
            "Run Spyne on the reactor thread instead of in the thread pool "
            "(twisted.web.wsgi): more calls/s for get_time, but a request's parse "
            "holds every other service of the process meanwhile.",
        ],
    ]
    optParameters = [
        [
            "listen",
            "l",
            f"tcp:{wire.TIME_PORT}",
            "Endpoint to listen on (Twisted endpoint string, e.g. tcp:8000:interface=127.0.0.1).",
        ],
        ["max-body", None, DEFAULT_MAX_BODY, "Largest request body accepted, in bytes.", int],
        *CAP_OPTIONS,
        METRICS_OPTION,
    ]

    def postOptions(self) -> None:
        if self["max-body"] < 1024:
            raise usage.UsageError("--max-body must be at least 1024 bytes")


def wsdl_url(address: object) -> str:
    """The WSDL URL a local client can use to reach a listening address."""
    return local_http_url(address, "/?wsdl") or f"{address} (not a TCP address)"


class TimeWebService(ListenFailure, ListeningService):
    """The listening site; says its WSDL URL once the port is open.

    A port that cannot be opened fails at start, so ``twistd`` exits with one
    line and status 1 instead of running without its service (``p2p.startup``).
    """

    label = "time service"

    def __init__(self, description: str, site: IProtocolFactory, reactor=None) -> None:
        super().__init__(description, site, reactor)
        self.url: str | None = None

    def listening(self, port: IListeningPort) -> None:
        self.url = wsdl_url(port.getHost())
        say(f"s> time service {self.url}")
        log.info("time service listening at {url}", url=self.url)


class TimeService(StartGuard, ServiceLogs, MultiService):
    """The time service and, with ``--metrics``, its metrics endpoint.

    Run by twistd, it logs rate-limited to bounded files (``p2p.logs``), and a
    failure to start is one line on the terminal and status 1 (``p2p.startup``).
    """

    label = "time service"
    #: The service's counts (None without ``--metrics``).
    metrics: Metrics | None = None


def makeService(options: Options) -> IService:
    """The time service for ``options`` (not started)."""
    from twisted.internet import reactor

    site = make_site(reactor, max_body=options["max-body"], inline=bool(options["inline"]))
    # Slow clients (one byte a minute) each hold a connection: cap them, so
    # they can use up a slot each but never the process's file descriptors,
    # and one address only its share of the slots.
    capped = CappedWrappingFactory(site, options["max-connections"], options["max-per-source"])
    top = TimeService()
    top.setName("time")
    top.log_options = options
    TimeWebService(options["listen"], capped, reactor).setServiceParent(top)
    if counts_wanted(options):
        top.metrics = Metrics("p2p_time")
        site.count_in(top.metrics)
        top.metrics.gauge(
            "open_connections", "Open HTTP connections.", lambda: capped.open_connections
        )
        serve_metrics(top, options, [top.metrics])
    return top
