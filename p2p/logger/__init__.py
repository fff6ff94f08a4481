"""The audit logger: ONC-RPC over TCP and UDP, and the indexer's relay to it."""
