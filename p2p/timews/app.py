"""The Spyne SOAP 1.1 application of the time service: one operation, ``get_time``.

Only the SOAP contract lives here (names, namespace, protocols); how it is
mounted in twisted.web is :mod:`p2p.timews.resource`.
"""

from __future__ import annotations

import logging

from spyne import Application, ServiceBase, Unicode, rpc
from spyne.protocol.soap import Soap11
from spyne.server.wsgi import WsgiApplication
from twisted.logger import Logger

from p2p import wire

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
        text = record.getMessage()
        if len(text) > _MAX_LOGGED:
            text = text[:_MAX_LOGGED] + "..."
        self.log.info("{spyne_message}", spyne_message=text)


def _route_spyne_logging() -> None:
    spyne_log = logging.getLogger("spyne")
    if not any(isinstance(h, _ToTwistedLog) for h in spyne_log.handlers):
        spyne_log.addHandler(_ToTwistedLog(logging.WARNING))
        spyne_log.propagate = False


class TimeService(ServiceBase):
    """The one SOAP operation: the current local time as the indexer expects it."""

    @rpc(_returns=Unicode)
    def get_time(ctx) -> str:
        """The current local time as dd/mm/YYYY HH:MM:SS."""
        return wire.format_datetime()


def make_application() -> Application:
    """The Spyne application: SOAP 1.1 in (schema-validated by lxml) and out."""
    _route_spyne_logging()
    return Application(
        [TimeService],
        tns=NAMESPACE,
        name=SERVICE_NAME,
        in_protocol=Soap11(validator="lxml"),
        out_protocol=Soap11(),
    )


def make_wsgi_application(max_content_length: int) -> WsgiApplication:
    """The application as a WSGI callable; Spyne also refuses bodies over the cap."""
    return WsgiApplication(make_application(), max_content_length=max_content_length)
