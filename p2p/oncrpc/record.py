"""ONC-RPC record marking on streams (RFC 5531 section 11).

A record is one or more fragments; each fragment starts with a 4-byte header
whose top bit marks the last fragment and whose low 31 bits give its length.
``RecordReader`` reassembles records from arbitrary reads and never holds more
than ``max_record`` bytes of one record: past that, it keeps only a short
prefix (enough to read the call header and answer it) and skips the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

LAST_FRAGMENT = 0x80000000
MAX_FRAGMENT = 0x7FFFFFFF


def encode_record(data: bytes, fragment_size: int = MAX_FRAGMENT) -> bytes:
    """``data`` as one record, cut into fragments of at most ``fragment_size`` bytes."""
    if fragment_size < 1:
        raise ValueError("fragment_size must be positive")
    if len(data) <= fragment_size:  # one fragment: what a server's replies are
        return (len(data) | LAST_FRAGMENT).to_bytes(4, "big") + data
    parts = []
    view = memoryview(data)
    start = 0
    while True:
        chunk = view[start : start + fragment_size]
        start += len(chunk)
        last = start >= len(data)
        header = len(chunk) | (LAST_FRAGMENT if last else 0)
        parts.append(header.to_bytes(4, "big"))
        parts.append(bytes(chunk))
        if last:
            return b"".join(parts)


@dataclass(frozen=True)
class Oversized:
    """A record longer than the reader's maximum: its first bytes and its full size."""

    prefix: bytes
    size: int


class RecordReader:
    """Incremental record-marking decoder with a bound on what it buffers.

    ``feed`` returns the records completed by the new bytes: ``bytes`` for a
    whole record, ``Oversized`` for one that went past ``max_record`` (only its
    first ``keep`` bytes were kept, the rest was skipped as it arrived).
    """

    def __init__(self, max_record: int, keep: int = 1024) -> None:
        self.max_record = max_record
        self.keep = keep
        self._buffer = bytearray()  # unparsed bytes: at most a header plus one read
        self._record: list[bytes] = []  # fragments of the current record so far
        self._record_size = 0
        self._oversized = False
        self._remaining = 0  # bytes left in the current fragment
        self._last = False  # the current fragment ends the record
        self._in_fragment = False
        self._started = False  # a fragment of the current record was seen (even empty)

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        if not (self._buffer or self._in_fragment or self._started) and len(data) > 4:
            # Between records, a read holding exactly one whole single-fragment
            # record (a client waiting for each reply sends just that): no copy
            # through the buffer.
            header = int.from_bytes(data[:4], "big")
            if header == (len(data) - 4) | LAST_FRAGMENT and len(data) - 4 <= self.max_record:
                return [data[4:]]
        out: list[bytes | Oversized] = []
        self._buffer += data
        pos = 0
        buf = self._buffer
        while True:
            if not self._in_fragment:
                if len(buf) - pos < 4:
                    break
                header = int.from_bytes(buf[pos : pos + 4], "big")
                pos += 4
                self._remaining = header & MAX_FRAGMENT
                self._last = bool(header & LAST_FRAGMENT)
                self._in_fragment = True
                self._started = True
            take = min(self._remaining, len(buf) - pos)
            if take:
                self._add(bytes(buf[pos : pos + take]))
                pos += take
                self._remaining -= take
            if self._remaining:
                break
            self._in_fragment = False
            if self._last:
                out.append(self._finish())
        del buf[:pos]
        return out

    def _add(self, chunk: bytes) -> None:
        self._record_size += len(chunk)
        if self._oversized:
            return
        if self._record_size > self.max_record:
            self._oversized = True
            kept = b"".join(self._record) + chunk
            self._record = [kept[: self.keep]]
            return
        self._record.append(chunk)

    def _finish(self) -> bytes | Oversized:
        data = b"".join(self._record)
        size, oversized = self._record_size, self._oversized
        self._record, self._record_size, self._oversized = [], 0, False
        self._started = False
        return Oversized(data, size) if oversized else data

    @property
    def partial(self) -> bool:
        """True while a record has started but not ended."""
        return bool(self._buffer) or self._in_fragment or self._started

    @property
    def buffered(self) -> int:
        """Bytes held right now (for tests of the memory bound)."""
        return len(self._buffer) + sum(len(c) for c in self._record)
