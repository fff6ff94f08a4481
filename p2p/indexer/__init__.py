"""The indexer: one request per TCP connection, an in-memory directory, a SQLite store."""
