"""The interactive client shell and its clients of the indexer and time service."""
