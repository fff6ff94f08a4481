"""p2p: peer-to-peer file sharing on Twisted (indexer, audit logger, time service, client)."""

__version__ = "0.1.0"
