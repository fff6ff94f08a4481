"""GET_FILE's side of several sources (protocol.md 2.6): who else has the content
(``SOURCES``, with the keys ``LIST_PEERS`` gives) goes to the download as ``sources``.

Against the real indexer in memory (tests/test_client_shell.py), the download faked.
"""

from __future__ import annotations

from p2p import wire
from p2p.client.indexer_client import UnknownOperation
from p2p.peer.download import Expected, Source
from tests.test_client_search import BODY, LULLABY, SHA
from tests.test_client_shell import ShellTestCase


class SourcesTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.connect()
        owners = (("bob", "10.0.0.2", 5555), ("carol", "10.0.0.3", 6666), ("dave", "10.0.0.4", 7))
        for user, host, port in owners:
            self.assertEqual(self.indexer.other("REGISTER", user), 0)
            self.assertEqual(self.indexer.other("CONNECT", user, port, peer=host), 0)
        publish = ("PUBLISH_FILE", "nana", len(BODY), SHA, "new")
        self.assertEqual(self.indexer.other(publish[0], "bob", LULLABY, *publish[1:]), 0)
        self.assertEqual(self.indexer.other(publish[0], "carol", "cuna.txt", *publish[1:]), 0)
        # alice has the same bytes herself: the indexer leaves the asker out.
        self.assertEqual(self.indexer.other(publish[0], "alice", "mine.txt", *publish[1:]), 0)
        self.assertEqual(self.indexer.other("PUBLISH", "dave", "other.txt", "not the same"), 0)

    def test_the_other_owners_go_to_the_download(self) -> None:
        self.assertEqual(self.send(f"GET_FILE bob {LULLABY} out"), ["c> GET_FILE OK"])
        self.assertEqual(
            self.checked,
            [
                {
                    "expected": Expected(len(BODY), SHA),
                    "sources": [Source("carol", "cuna.txt", "10.0.0.3", 6666, None)],
                }
            ],
        )
        self.assertIn(("SOURCES", "alice", SHA), self.indexer.requests)
        self.assertEqual(self.resumable, [(True, "bob", self.output.note)])

    def test_a_classic_indexer_means_the_owner_only(self) -> None:
        self.indexer.faults["SOURCES"] = UnknownOperation("what is SOURCES?")
        self.assertEqual(self.send(f"GET_FILE bob {LULLABY} out"), ["c> GET_FILE OK"])
        self.assertEqual(self.checked, [{"expected": Expected(len(BODY), SHA)}])
        self.assertFalse([n for n in self.output.notes if "SOURCES" in n])

    def test_nothing_published_nothing_asked(self) -> None:
        self.assertEqual(self.send("GET_FILE dave other.txt out"), ["c> GET_FILE OK"])
        self.assertEqual(self.checked, [{}])
        self.assertNotIn("SOURCES", self.indexer.ops())

    def test_a_claimed_source_is_checked_against_its_key(self) -> None:
        rows = (("bob", "10.0.0.2", 5555, "ab" * 32), ("carol", "10.0.0.3", 6666, "cd" * 32))
        self.indexer.faults["LIST_PEERS"] = wire.encode_code(wire.OK) + wire.encode_listing(rows)
        self.assertEqual(self.send(f"GET_FILE bob {LULLABY} out"), ["c> GET_FILE OK"])
        [checked] = self.checked
        self.assertEqual(checked["expected_fingerprint"], "ab" * 32)
        self.assertEqual(
            checked["sources"], [Source("carol", "cuna.txt", "10.0.0.3", 6666, "cd" * 32)]
        )
