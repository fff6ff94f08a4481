"""twistd plugin ``p2p-time`` (the service itself lives in ``p2p.timews.service``).

``ServiceMaker`` imports that module only when this plugin is the one run.
"""

from twisted.application.service import ServiceMaker

time = ServiceMaker(
    "p2p time service",
    "p2p.timews.service",
    "SOAP 1.1 get_time service (Spyne in twisted.web), WSDL at /?wsdl.",
    "p2p-time",
)
