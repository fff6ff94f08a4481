"""The PostgreSQL pipe's handling of a batch's result (no server: a result stands in)."""

from __future__ import annotations

import json

from psycopg import pq
from twisted.internet.task import Clock
from twisted.trial import unittest

from p2p.indexer.pgpipe import StatementFailed, StatementPipe
from p2p.indexer.pgrules import decode_batch


class _Result:
    """What libpq's ``get_result`` gives for a statement that returned one value."""

    status = pq.ExecStatus.TUPLES_OK

    def __init__(self, value: bytes) -> None:
        self.value = value

    def get_value(self, row: int, column: int) -> bytes:
        return self.value


class UnreadableResultTests(unittest.TestCase):
    """A batch whose result cannot be read fails every item of it, none left waiting."""

    def _batch(self, value: bytes, size: int = 3):
        pipe = StatementPipe("postgresql://unused", Clock(), lambda items: (b"", []), decode_batch)
        outcomes: list = [None] * size
        batch = []
        for n in range(size):
            d = pipe.submit(f"user{n}", {"n": n})
            d.addCallbacks(
                lambda v, n=n: outcomes.__setitem__(n, ("value", v)),
                lambda f, n=n: outcomes.__setitem__(n, ("failure", f)),
            )
            batch.append(pipe._queue.popleft())
        pipe._inflight, pipe._received = batch, [_Result(value)]
        pipe._done()
        return pipe, outcomes

    def _all_failed(self, outcomes: list) -> None:
        for outcome in outcomes:
            self.assertIsNotNone(outcome, "an item of the batch never heard")
            kind, failure = outcome
            self.assertEqual(kind, "failure")
            failure.trap(StatementFailed)

    def test_bad_json(self) -> None:
        pipe, outcomes = self._batch(b'[{"code": 0}, {"code"')
        self._all_failed(outcomes)
        self.assertIsNone(pipe._inflight)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_bad_same_reference(self) -> None:
        value = json.dumps([{"code": 0, "rows": []}, {"code": 0, "same": 7}, {"code": 0}])
        _pipe, outcomes = self._batch(value.encode())
        self._all_failed(outcomes)
        self.assertEqual(len(self.flushLoggedErrors(IndexError)), 1)

    def test_too_few_results(self) -> None:
        """Two results for three requests: none is given to the wrong request."""
        _pipe, outcomes = self._batch(json.dumps([{"code": 0}, {"code": 0}]).encode())
        self._all_failed(outcomes)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_readable(self) -> None:
        """The control: a good result gives each item its own value."""
        _pipe, outcomes = self._batch(json.dumps([{"code": n} for n in range(3)]).encode())
        self.assertEqual(outcomes, [("value", {"code": n}) for n in range(3)])
