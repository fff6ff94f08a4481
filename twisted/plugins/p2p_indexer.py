"""twistd plugin ``p2p-indexer`` (the service itself lives in ``p2p.indexer.service``)."""

from p2p.plugin import LazyServiceMaker

indexer = LazyServiceMaker(
    "p2p-indexer",
    "p2p indexer: users, addresses and published files, stored in SQLite.",
    "p2p.indexer.service",
)
