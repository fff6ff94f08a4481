"""Downloads as numbered transfers: started by GET_FILE, listed by DOWNLOADS,
stopped by CANCEL.

Each GET_FILE is one :class:`Transfer` with its own
:class:`~p2p.client.get_file.GetFile`, so several can run at once and each can be
cancelled alone. In a terminal the shell starts them in the background and
returns to the prompt; reading from a pipe it waits for each (scripts read the
results in order). Progress reaches a :class:`~p2p.client.progress.Meter` per
transfer, from which the terminal's status area and ``DOWNLOADS`` draw; a
transfer that got no byte for a while shows as *stalled*, not with a stale rate.
A finished download says on stderr how big it was, how long it took and where
it was saved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from p2p import wire
from p2p.client.get_file import GetFile, local_destination
from p2p.client.progress import Meter, human_bytes, human_duration
from p2p.client.session import Session

#: The lines of DOWNLOADS and CANCEL (protocol.md section 5).
DOWNLOADS_OK = "c> DOWNLOADS OK"
CANCEL_OK = "c> CANCEL OK"
CANCEL_FAIL = "c> CANCEL FAIL, NO SUCH DOWNLOAD"


class Transfer:
    """One GET_FILE: what it fetches, how far it got, and its end (:attr:`done`)."""

    def __init__(self, number: int, owner: str, remote: str, now: float) -> None:
        self.number = number
        self.owner = owner
        self.remote = remote
        self.meter = Meter(now)
        #: Where the bytes go, once the download started.
        self.destination: Path | None = None
        #: Where they will go, known at the start (None: a bad destination, GET_FILE
        #: says why): no other transfer may write there meanwhile.
        self.target: Path | None = None
        #: Bytes written, once the download succeeded.
        self.saved: int | None = None
        self.cancelled = False
        #: The running GET_FILE command (cancelling it stops the transfer).
        self.command: Deferred | None = None
        #: Fires (with None) when the command's lines are printed.
        self.done: Deferred = Deferred()

    @property
    def label(self) -> str:
        return f"[{self.number}] {self.remote} from {self.owner}"

    def describe(self, now: float) -> list[str]:
        """What to show of it now: ``["asking the indexer"]`` before the download
        starts, then the meter's progress, rate and time left (or stalled)."""
        if self.destination is None:
            return ["asking the indexer"]
        return self.meter.describe(now)


class Transfers:
    """The running transfers of one shell, numbered from 1.

    ``download`` and ``no_such_file`` are what :class:`GetFile` takes; each
    transfer wraps ``download`` to record its destination and progress.
    ``on_change()`` is called when a transfer starts, progresses or ends (the
    terminal redraws its status area).
    """

    def __init__(
        self,
        session: Session,
        download: Callable[..., Deferred],
        no_such_file: type[BaseException],
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.output = session.output
        self.download = download
        self.no_such_file = no_such_file
        self.timeout = timeout
        self.clock = clock
        self.running: dict[int, Transfer] = {}
        self.on_change: Callable[[], None] = lambda: None
        self._numbers = 0

    def start(self, owner: str, remote: str, local: str) -> Transfer:
        """Start GET_FILE ``owner remote local``; its :attr:`Transfer.done` fires once
        its result line is printed."""
        self._numbers += 1
        transfer = Transfer(self._numbers, owner, remote, self.clock())
        with contextlib.suppress(ValueError):
            transfer.target = local_destination(remote, local).absolute()
        self.running[transfer.number] = transfer
        command = GetFile(
            self.session, self._download_for(transfer), self.no_such_file, self.timeout
        )
        d = command(owner, remote, local)
        transfer.command = d
        d.addErrback(self._unexpected)
        d.addBoth(lambda _: self._ended(transfer))
        d.chainDeferred(transfer.done)
        self.on_change()
        return transfer

    def _download_for(self, transfer: Transfer) -> Callable[..., Deferred]:
        def download(host, port, name, destination, progress=None, **kw: Any) -> Deferred:
            if transfer.cancelled:  # cancelled while the indexer was being asked
                return defer.fail(defer.CancelledError())
            transfer.destination = Path(destination)
            transfer.meter = Meter(self.clock())  # its rate and stalls count from now

            def advance(received: int, total: int | None = None) -> None:
                transfer.meter.update(received, total, self.clock())
                if progress is not None:
                    progress(received, total)
                self.on_change()

            d = self.download(host, port, name, destination, progress=advance, **kw)

            def saved(size: Any) -> Any:
                transfer.saved = size if isinstance(size, int) else transfer.meter.received
                took = self.clock() - transfer.meter.started
                self.output.note(
                    f"GET_FILE: {transfer.remote} from {transfer.owner}: "
                    f"{human_bytes(transfer.saved)} ({transfer.saved} bytes) in "
                    f"{human_duration(took)}, saved as {Path(destination).resolve()}"
                )
                return size

            return d.addCallback(saved)

        return download

    def _unexpected(self, failure) -> None:
        self.session.log.failure("GET_FILE failed unexpectedly", failure)
        self.output.note(f"internal error: {failure.getErrorMessage()}")

    def _ended(self, transfer: Transfer) -> None:
        del self.running[transfer.number]
        if transfer.cancelled:
            self.output.note(
                f"GET_FILE: download {transfer.number} ({transfer.remote} from "
                f"{transfer.owner}) cancelled; what arrived stays hidden beside "
                "the destination for the next GET_FILE of the same content to continue"
            )
        self.on_change()

    def existing_destination(self, remote: str, local: str) -> Path | None:
        """The file GET_FILE ``remote local`` would replace, if one exists there (None
        also when the destination is bad or no user is connected: GET_FILE says why)."""
        if self.session.user is None:
            return None
        try:
            destination = local_destination(remote, local).absolute()
        except ValueError:
            return None
        if destination.exists() or any(t.target == destination for t in self.running.values()):
            return destination  # there, or being downloaded there by another transfer
        return None

    def cancel(self, number: int, now: bool = False) -> bool:
        """Stop transfer ``number`` (its command prints GET_FILE FAIL, nothing is kept);
        False if no such transfer runs.

        While the indexer is still being asked, the question is left to finish and
        the download is then not started: cancelling it would cut the connection
        that holds the user's lease (protocol.md 7.3). ``now`` (the shell is ending):
        stop at once.
        """
        transfer = self.running.get(number)
        if transfer is None:
            return False
        transfer.cancelled = True
        if transfer.command is not None and (now or transfer.destination is not None):
            transfer.command.cancel()
        return True

    def cancel_all(self) -> int:
        """Stop every running transfer now; how many there were."""
        numbers = list(self.running)
        for number in numbers:
            self.cancel(number, now=True)
        return len(numbers)

    def status_lines(self) -> list[tuple[str, float | None, list[str]]]:
        """``(label, fraction done or None, parts)`` of each running transfer, in order."""
        now = self.clock()
        return [
            (t.label, t.meter.fraction() if t.destination else None, t.describe(now))
            for t in self.running.values()
        ]

    # --- the commands ---------------------------------------------------------

    def downloads_command(self) -> None:
        """DOWNLOADS: one tab-indented line per running transfer."""
        self.output.line(DOWNLOADS_OK)
        for label, _done, parts in self.status_lines():
            self.output.line("\t" + "  ".join((label, *parts)))

    def cancel_command(self, number: str) -> None:
        """CANCEL <n>."""
        if not wire.is_decimal(number) or not self.cancel(int(number)):
            self.output.line(CANCEL_FAIL)
            self.output.note(f"CANCEL: no running download {number} (DOWNLOADS lists them)")
            return
        self.output.line(CANCEL_OK)
