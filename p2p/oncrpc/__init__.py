"""ONC-RPC (RFC 5531) over XDR (RFC 4506): messages, record marking, client, server, portmapper.

A library: it knows nothing of the audit logger or the indexer that use it.
"""
