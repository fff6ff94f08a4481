"""twistd plugin ``p2p-time`` (the service itself lives in ``p2p.timews.service``)."""

from p2p.plugin import LazyServiceMaker

time = LazyServiceMaker(
    "p2p-time",
    "SOAP 1.1 get_time service (Spyne in twisted.web), WSDL at /?wsdl.",
    "p2p.timews.service",
)
