"""The audit file and the logger's memory of what each sender already stored.

``AuditLog.store`` appends one record line to the audit file with a single
``write`` to the OS (no user-space buffer), so once it returns the line
survives ``kill -9`` of the logger; the reply is sent only after that.

Exactly-once for the indexer's relay: a relay call names its sender and the
record's outbox sequence number (see ``relay``). The logger keeps, in a journal
beside the audit file (``<audit file>.state``), the last sequence number stored
per sender. For every sequenced record it first appends a journal line
``{"s": sender, "q": seq, "o": audit offset, "r": record}`` and then the audit
line. On start the journal is replayed: if the last entry's audit line is
missing (killed between the two writes) it is written then (redo), so a
record is either stored and remembered, or neither. A record whose sequence
number is not above the sender's last one is acknowledged without storing it.
The journal is compacted (one line per sender, written aside and renamed) at
start and whenever it grows past ``compact_at`` bytes (or past twice its
compacted size, when that is larger). While the service runs, the compacted
copy is written by ``run_in_thread`` (the reactor's thread pool), so no caller
waits for it; journal lines written meanwhile are appended to the copy before
it replaces the journal.

Any client can make up sender ids, so the memory of senders is bounded:
beyond ``max_senders`` the sender that stored least recently is forgotten
(with a warning). A live indexer relays all the time and stays remembered; a
forgotten sender's next resend of an old record would be stored again, which
only an idle sender could ever send. Bounding the senders bounds the journal
too, so replaying it at start takes a bounded time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from twisted.logger import Logger

from p2p.console import say

log = Logger()

#: Default bound on remembered relay senders (an indexer is one sender).
DEFAULT_MAX_SENDERS = 10_000


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an OSError raised inside without a file name (a failed write) ``path``,
    so the start-up line names the file (``p2p.startup``)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


class AuditLog:
    """Append-only audit file plus the per-sender sequence journal."""

    def __init__(
        self,
        path: str | os.PathLike,
        state_path: str | os.PathLike | None = None,
        echo: bool = True,
        compact_at: int = 1 << 20,
        max_senders: int = DEFAULT_MAX_SENDERS,
        run_in_thread: Callable | None = None,
    ) -> None:
        self.path = Path(path)
        self.state_path = (
            Path(state_path) if state_path else self.path.with_name(self.path.name + ".state")
        )
        self.echo = echo
        self.compact_at = compact_at
        self.max_senders = max_senders
        #: ``f(function, *args)`` -> Deferred, for compaction off the reactor;
        #: None compacts synchronously (unit tests, tools).
        self.run_in_thread = run_in_thread
        #: Last stored seq per sender, least recently stored first.
        self.last_seq: OrderedDict[str, int] = OrderedDict()
        self.forgotten = 0  # senders forgotten over max_senders (diagnostics, tests)
        self._compacting: list[bytes] | None = None  # journal lines since the snapshot
        self._audit_fd: int | None = None
        self._state_fd: int | None = None
        self._state_size = 0
        self._compact_limit = compact_at
        self.stored = 0  # records written since open (for tests and figures)
        self.duplicates = 0  # relay records acknowledged without storing them again

    # -- life cycle

    def open(self) -> None:
        """Open the files, replay the journal (redoing a half-stored record), compact."""
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._audit_fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        with _naming(self.path):  # a redone record is written to the audit file
            self._replay()
        with _naming(self.state_path):
            self._compact()

    def close(self) -> None:
        for name in ("_audit_fd", "_state_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)

    # -- storing

    def store(self, record: str, sender: str | None = None, seq: int | None = None) -> bool:
        """Store one record; False when ``sender`` already stored ``seq`` (not stored again).

        Raises ``OSError`` when the files cannot be written (the caller answers -1).
        """
        assert self._audit_fd is not None, "AuditLog.store before open()"
        line = (record + "\n").encode("utf-8")
        offset = None  # where the line starts, for the journal (a failed write finds it)
        undo = None  # what to restore if the audit line cannot be written
        if sender is not None and seq is not None:
            if seq <= self.last_seq.get(sender, -1):
                self.duplicates += 1
                log.info("record {seq} of {sender} already stored", seq=seq, sender=sender)
                return False
            offset = os.fstat(self._audit_fd).st_size
            entry = {"s": sender, "q": seq, "o": offset, "r": record}
            undo = (self._state_size, self.last_seq.get(sender))
            self._journal(entry)
            self._remember(sender, seq)
        try:
            self._write_all(self._audit_fd, line)
        except OSError as exc:
            # No torn line for the next record to be glued to, and no journal entry
            # claiming this record: its resend must store it, not skip it as stored.
            if offset is None:  # O_APPEND: the bytes written before the failure end the file
                offset = self._size_less(getattr(exc, "characters_written", 0))
            if offset is not None:
                self._truncate(self._audit_fd, offset)
            if undo is not None:
                self._unjournal(sender, *undo)
            raise
        self.stored += 1
        if self.echo:
            say(record)
        if self._state_size > self._compact_limit and self._compacting is None:
            if self.run_in_thread is None:
                try:
                    self._compact()
                except OSError as exc:  # the record is stored; compaction is retried later
                    log.warn("cannot compact the relay journal: {exc}", exc=exc)
            else:
                self._compact_in_thread()
        return True

    def _remember(self, sender: str, seq: int) -> None:
        """Record ``seq`` as ``sender``'s last, forgetting the stalest sender over the bound."""
        self.last_seq[sender] = seq
        self.last_seq.move_to_end(sender)
        while len(self.last_seq) > self.max_senders:
            old, _ = self.last_seq.popitem(last=False)
            self.forgotten += 1
            if self.forgotten & (self.forgotten - 1) == 0:  # 1, 2, 4, 8...: no log flood
                log.warn(
                    "relay senders over --max-senders {n}: forgot {old} ({count} forgotten so far)",
                    n=self.max_senders,
                    old=old,
                    count=self.forgotten,
                )

    def _size_less(self, written: int) -> int | None:
        """The audit file's size less ``written`` bytes; None if it cannot be read."""
        try:
            return os.fstat(self._audit_fd).st_size - written
        except OSError:
            return None

    @staticmethod
    def _truncate(fd: int, size: int) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)

    def _unjournal(self, sender: str, size: int, previous: int | None) -> None:
        assert self._state_fd is not None
        self._truncate(self._state_fd, size)
        self._state_size = size
        if self._compacting:
            self._compacting.pop()  # that line is not in the journal any more
        if previous is None:
            self.last_seq.pop(sender, None)
        else:
            self.last_seq[sender] = previous

    def fsync(self) -> None:
        """Force both files to stable storage (for --fsync)."""
        for fd in (self._audit_fd, self._state_fd):
            if fd is not None:
                os.fsync(fd)

    # -- internals

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        """Write all of ``data``: one write(2), unless the disk fills meanwhile.

        A write(2) that fails writes nothing, so when one fails after short ones,
        the OSError's ``characters_written`` (as ``BlockingIOError`` has) says
        how many bytes those wrote; ``store`` cuts them off again, which spares
        it an fstat per record to learn where the line starts.
        """
        written = os.write(fd, data)
        if written < len(data):
            view = memoryview(data)
            try:
                while written < len(data):
                    written += os.write(fd, view[written:])
            except OSError as exc:
                exc.characters_written = written
                raise

    def _journal(self, entry: dict) -> None:
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")
        assert self._state_fd is not None
        try:
            self._write_all(self._state_fd, data)
        except OSError:
            self._truncate(self._state_fd, self._state_size)  # no torn journal line
            raise
        self._state_size += len(data)
        if self._compacting is not None:
            self._compacting.append(data)

    def _replay(self) -> None:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        last_entry = None
        for line in raw.split(b"\n"):
            try:
                entry = json.loads(line)
                sender, seq = str(entry["s"]), int(entry["q"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: that record was never stored
            self._remember(sender, max(seq, self.last_seq.get(sender, -1)))
            last_entry = entry
        if last_entry is not None and "o" in last_entry:
            self._redo(last_entry)

    def _redo(self, entry: dict) -> None:
        """Finish a record whose journal line was written but maybe not its audit line."""
        line = (str(entry["r"]) + "\n").encode("utf-8")
        offset = int(entry["o"])
        assert self._audit_fd is not None
        size = os.fstat(self._audit_fd).st_size
        if size >= offset + len(line):
            return  # stored completely
        if size < offset:
            log.warn("audit file shorter than the journal says; not redoing {seq}", seq=entry["q"])
            return
        os.ftruncate(self._audit_fd, offset)  # drop a torn partial line
        self._write_all(self._audit_fd, line)
        log.info("redid record {seq} of {sender}", seq=entry["q"], sender=entry["s"])
        if self.echo:
            say(str(entry["r"]))

    @property
    def _tmp_path(self) -> Path:
        return self.state_path.with_name(self.state_path.name + ".tmp")

    def _write_aside(self, senders: list[tuple[str, int]]) -> int:
        """Write the compacted journal (one line per sender, stalest first) aside; its size.

        Thread-safe: it reads only ``senders``, a copy taken on the reactor.
        """
        data = "".join(
            json.dumps({"s": s, "q": q}, separators=(",", ":")) + "\n" for s, q in senders
        ).encode("utf-8")
        with open(self._tmp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return len(data)

    def _compact(self) -> None:
        """Compact now, on the calling thread (at open, or without a thread pool)."""
        self._install(self._write_aside(list(self.last_seq.items())))

    def _compact_in_thread(self) -> None:
        """Encode and write the compacted copy in a thread; install it back on the reactor."""
        senders = list(self.last_seq.items())  # a cheap copy; the encoding is the thread's
        self._compacting = []

        def install(size: int) -> None:
            since, self._compacting = self._compacting, None
            if self._state_fd is None:  # closed meanwhile
                return
            extra = b"".join(since)
            with open(self._tmp_path, "ab") as f:
                f.write(extra)
            self._install(size + len(extra))

        def failed(failure):
            self._compacting = None
            log.warn("cannot compact the relay journal: {why}", why=failure.getErrorMessage())

        d = self.run_in_thread(self._write_aside, senders)
        d.addCallback(install).addErrback(failed)

    def _install(self, size: int) -> None:
        """Make the written-aside copy the journal and append to it from now on."""
        os.replace(self._tmp_path, self.state_path)
        if self._state_fd is not None:
            os.close(self._state_fd)
        self._state_fd = os.open(self.state_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._state_size = size
        # With many senders the compacted journal alone can pass compact_at: compact
        # again only once it has doubled, or every record would rewrite it all.
        self._compact_limit = max(self.compact_at, 2 * size)
