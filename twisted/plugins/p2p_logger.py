"""twistd plugin ``p2p-logger`` (the service itself lives in ``p2p.logger.service``)."""

from p2p.plugin import LazyServiceMaker

logger = LazyServiceMaker(
    "p2p-logger",
    "ONC-RPC audit logger: LOG over TCP and UDP, audit file, rpcbind registration.",
    "p2p.logger.service",
)
