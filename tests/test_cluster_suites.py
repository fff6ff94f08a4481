"""More end-to-end suites re-run against a PostgreSQL-backed indexer.

Each class here is an SQLite suite with ``on_postgres = True``: its indexers start on
a fresh database of the throwaway PostgreSQL server (tests/postgres.py) through
:func:`tests.test_indexer_e2e.indexer_db`. Where a test reads the SQLite file beside
the node, the subclass reads the same thing from the PostgreSQL database instead.
"""

from __future__ import annotations

from tests import test_logger_indexer as logger_indexer
from tests import test_metrics_e2e as metrics_e2e


class IndexerToLoggerOnPostgres(logger_indexer.IndexerToLoggerTests):
    """The audit relay from the PostgreSQL outbox: exactly once, in order."""

    on_postgres = True

    def outbox_count(self) -> int:
        """Rows waiting in the outbox of the test's PostgreSQL database."""
        import psycopg

        with psycopg.connect(self.postgres_uri) as conn:
            return conn.execute("SELECT count(*) FROM outbox").fetchone()[0]


class IndexerMetricsOnPostgres(metrics_e2e.IndexerMetricsTests):
    """The PostgreSQL node's ``/metrics``."""

    on_postgres = True
