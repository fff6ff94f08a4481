"""twistd plugin ``p2p-stack`` (the service itself lives in ``p2p.stack``).

``ServiceMaker`` imports that module only when this plugin is the one run.
"""

from twisted.application.service import ServiceMaker

stack = ServiceMaker(
    "p2p stack",
    "p2p.stack",
    "The indexer, the audit logger and the SOAP time service in one process.",
    "p2p-stack",
)
