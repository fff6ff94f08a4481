"""twistd plugin ``p2p-logger`` (the service itself lives in ``p2p.logger.service``).

``ServiceMaker`` imports that module only when this plugin is the one run.
"""

from twisted.application.service import ServiceMaker

logger = ServiceMaker(
    "p2p audit logger",
    "p2p.logger.service",
    "ONC-RPC audit logger: LOG over TCP and UDP, audit file, rpcbind registration.",
    "p2p-logger",
)
