"""twistd plugin ``p2p-indexer`` (the service itself lives in ``p2p.indexer.service``).

``ServiceMaker`` imports that module only when this plugin is the one run,
so listing the plugins (``twistd --help``) stays fast.
"""

from twisted.application.service import ServiceMaker

indexer = ServiceMaker(
    "p2p indexer",
    "p2p.indexer.service",
    "p2p indexer: users, addresses and published files, stored in SQLite.",
    "p2p-indexer",
)
