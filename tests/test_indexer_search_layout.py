"""The search database's layout (p2p.indexer.searchindex): one written by another
version (an FTS5 index with positions, say) is dropped and filled again from the main
database when the store opens it."""

from __future__ import annotations

import sqlite3

from twisted.trial.unittest import TestCase

from p2p.indexer import searchindex
from p2p.indexer.fulltext import FTS_TABLE
from p2p.indexer.store import Store


def fts_sql(path: str) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (FTS_TABLE,)).fetchone()[
            0
        ]
    finally:
        db.close()


class OlderLayout(TestCase):
    def test_filled_again(self) -> None:
        path = self.mktemp()
        store = Store(path)
        for change, args in (
            (store.add_user, ("u",)),
            (store.set_address, ("u", ("10.0.0.1", 5000))),
            (store.add_file, ("u", "otter.txt", "paws")),
        ):
            change(*args)
        store.commit()
        self.assertEqual([h.name for h in store.search(["otter"], 10)], ["otter.txt"])
        store.close()
        search_path = path + searchindex.SUFFIX
        self.assertIn(searchindex.FTS_OPTIONS, fts_sql(search_path))
        # The layout before: positions kept, no version recorded.
        db = sqlite3.connect(search_path, isolation_level=None)
        db.execute(f"DROP TABLE {FTS_TABLE}")
        db.execute(
            f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5(name, description, content='docs',"
            " content_rowid='id', detail=column)"
        )
        db.execute("DELETE FROM search_meta WHERE key = 'version'")
        db.close()
        store.open()
        self.addCleanup(store.close)
        store.add_file("u", "walrus.txt", "tusks")
        store.commit()
        self.assertEqual([h.name for h in store.search(["otter"], 10)], ["otter.txt"])
        self.assertEqual([h.name for h in store.search(["tusks"], 10)], ["walrus.txt"])
        self.assertIn(searchindex.FTS_OPTIONS, fts_sql(search_path))
