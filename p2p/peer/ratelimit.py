"""One cap on the bytes a peer server sends per second, all connections together.

``p2p-client --max-upload-rate``: a token bucket driven by the reactor's clock
(so tests drive it with ``twisted.internet.task.Clock``). It fills at ``rate``
bytes per second up to ``burst`` bytes; a producer takes what it may send now
(:meth:`TokenBucket.take`) and, when the bucket is empty, queues to be woken in
turn (:meth:`TokenBucket.queue`). However many connections share it, the bytes sent in
any interval of ``t`` seconds are at most ``burst + rate * t``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from p2p import wire

#: The smallest burst: a chunk big enough that a slow cap does not mean tiny writes.
MIN_BURST = 64 * 1024
#: The shortest wait for the bucket: a clock's float sums must not make it wake
#: again and again within one instant.
MIN_WAIT = 0.001
_SLACK = 1e-6
#: Multipliers of the suffixes ``--max-upload-rate`` accepts (1024-based).
SUFFIXES = {"K": 1024, "M": 1024**2, "G": 1024**3}


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` at once (default max(rate/10, 64 KiB)).

    Fair between the connections that share it: one that finds it empty joins a
    queue (:meth:`queue`) and is woken in turn once a tenth of a second's worth is
    in the bucket; while some wait, :meth:`take` grants nothing to others.
    """

    def __init__(self, rate: int, clock: Any, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate // 10, MIN_BURST)
        #: The least :meth:`take` grants (unless less is wanted): a tenth of a second's worth.
        self.step = max(min(self.burst, rate // 10), 1)
        self.clock = clock
        self._tokens = float(self.burst)
        self._at = clock.seconds()
        #: Who waits for a turn, and how many bytes each wants (first come, first served).
        self._waiting: deque[tuple[Callable[[], None], int]] = deque()
        self._timer: Any = None

    def _refill(self) -> None:
        now = self.clock.seconds()
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def take(self, want: int, turn: bool = False) -> int:
        """Bytes that may be sent now, at most ``want`` (0: :meth:`queue` and wait).

        Grants only once ``min(want, step)`` bytes are in the bucket, so that a
        starved bucket means about ten writes a second rather than many small
        ones; and nothing while others wait, unless this is the caller's ``turn``
        (it was just woken)."""
        if self._waiting and not turn:
            return 0
        self._refill()
        available = int(self._tokens + _SLACK)  # float sums may fall short by a hair
        if available < min(want, self.step):
            return 0
        granted = min(want, available)
        self._tokens = max(self._tokens - granted, 0.0)
        return granted

    def queue(self, wake: Callable[[], None], want: int) -> None:
        """Call ``wake()`` (on the clock) when it is this caller's turn to :meth:`take`
        ``want`` bytes (woken as soon as ``min(want, step)`` are in the bucket: waiting for
        more would let a full bucket overflow while the reactor is late)."""
        self._waiting.append((wake, want))
        self._arm()

    def cancel(self, wake: Callable[[], None]) -> None:
        """``wake`` no longer waits (its connection ended)."""
        for entry in self._waiting:
            if entry[0] == wake:
                self._waiting.remove(entry)
                break
        if not self._waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is None and self._waiting:
            self._refill()
            missing = self._needed() - self._tokens
            self._timer = self.clock.callLater(max(missing / self.rate, MIN_WAIT), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._refill()
        while self._waiting and int(self._tokens + _SLACK) >= self._needed():
            wake, _want = self._waiting.popleft()
            wake()
        self._arm()

    def _needed(self) -> int:
        """Bytes the first in the queue waits for."""
        return min(self._waiting[0][1], self.step)


def parse_rate(text: str) -> int:
    """A byte rate as ``--max-upload-rate`` takes it: a positive integer, optionally
    followed by ``K``, ``M`` or ``G`` (1024-based; ``k`` etc. too). ValueError otherwise."""
    raw = text.strip()
    factor = SUFFIXES.get(raw[-1:].upper(), 1)
    digits = raw[:-1] if factor != 1 else raw
    if not wire.is_decimal(digits):
        raise ValueError(f"not a byte rate: {text!r} (a whole number, optionally K, M or G)")
    rate = int(digits) * factor
    if rate <= 0:
        raise ValueError(f"a byte rate must be positive: {text!r}")
    return rate
