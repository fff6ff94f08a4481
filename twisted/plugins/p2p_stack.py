"""twistd plugin ``p2p-stack`` (the service itself lives in ``p2p.stack``)."""

from p2p.plugin import LazyServiceMaker

stack = LazyServiceMaker(
    "p2p-stack",
    "The indexer, the audit logger and the SOAP time service in one process.",
    "p2p.stack",
)
