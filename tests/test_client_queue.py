"""The shell's command queue: order, one line at a time, QUIT, errors, idleness,
and a long run of quick lines behind a slow one (no recursion)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from p2p.client import commands
from p2p.client.command_queue import CommandQueue, Quit
from p2p.client.shell import Shell


class Recorder:
    """A ``run`` for the queue: records lines; a line may be made slow or failing."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.slow: dict[str, Deferred] = {}
        self.reports: list[str] = []

    def run(self, line: str):
        self.ran.append(line)
        if line == "quit":
            raise Quit()
        if line == "boom":
            raise RuntimeError("kaboom")
        return self.slow.get(line)


class CommandQueueTests(TestCase):
    def setUp(self) -> None:
        self.rec = Recorder()
        self.queue = CommandQueue(self.rec.run, self.rec.reports.append)
        self.idle: list[int] = []
        self.queue.on_idle = lambda: self.idle.append(len(self.rec.ran))

    def test_quick_lines_run_at_once(self) -> None:
        self.queue.submit("a")
        self.assertEqual(self.rec.ran, ["a"])
        self.assertFalse(self.queue.busy)
        self.assertEqual(self.idle, [1])

    def test_a_slow_line_holds_the_next_ones(self) -> None:
        self.rec.slow["slow"] = gate = Deferred()
        for line in ("slow", "b", "c"):
            self.queue.submit(line)
        self.assertEqual(self.rec.ran, ["slow"])
        self.assertTrue(self.queue.busy)
        self.assertEqual(self.idle, [])
        gate.callback(None)
        self.assertEqual(self.rec.ran, ["slow", "b", "c"])
        self.assertEqual(self.idle, [3])  # once, when the queue ran dry
        self.assertFalse(self.queue.busy)

    def test_thousands_of_quick_lines_behind_a_slow_one(self) -> None:
        # DeferredLock.run would start each next line from inside the previous
        # one's release and overflow the stack after a few hundred lines.
        self.rec.slow["slow"] = gate = Deferred()
        self.queue.submit("slow")
        lines = [f"# {i}" for i in range(5000)]
        for line in lines:
            self.queue.submit(line)
        gate.callback(None)
        self.assertEqual(self.rec.ran, ["slow", *lines])
        self.assertEqual(self.rec.reports, [])

    def test_quit_ends_and_drops_what_follows(self) -> None:
        self.rec.slow["slow"] = gate = Deferred()
        for line in ("slow", "quit", "after"):
            self.queue.submit(line)
        self.assertFalse(self.queue.ended.called)
        gate.callback(None)
        self.assertEqual(self.rec.ran, ["slow", "quit"])
        self.assertTrue(self.queue.ended.called)
        self.queue.submit("later")
        self.assertEqual(self.rec.ran, ["slow", "quit"])
        self.assertFalse(self.queue.busy)

    def test_close_drops_the_waiting_lines_and_later_ones(self) -> None:
        """The shell ending on a signal: what waits never runs (nor prints)."""
        self.rec.slow["slow"] = gate = Deferred()
        for line in ("slow", "waiting", "also waiting"):
            self.queue.submit(line)
        self.queue.close()
        self.queue.submit("later")
        gate.callback(None)  # the running line finishes
        self.assertEqual(self.rec.ran, ["slow"])
        self.assertFalse(self.queue.busy)

    def test_a_failing_command_is_reported_and_the_next_runs(self) -> None:
        self.queue.submit("boom")
        self.queue.submit("next")
        self.assertEqual(self.rec.ran, ["boom", "next"])
        self.assertEqual(self.rec.reports, ["internal error: kaboom"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.queue.ended.called)

    def test_a_failing_idle_callback_does_not_stop_the_queue(self) -> None:
        def broken() -> None:
            raise OSError("terminal gone")

        self.queue.on_idle = broken
        self.queue.submit("a")
        self.queue.submit("b")
        self.assertEqual(self.rec.ran, ["a", "b"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

    def test_a_slow_failure_is_reported_too(self) -> None:
        self.rec.slow["slow"] = gate = Deferred()
        self.queue.submit("slow")
        self.queue.submit("next")
        gate.errback(ValueError("late"))
        self.assertEqual(self.rec.ran, ["slow", "next"])
        self.assertEqual(self.rec.reports, ["internal error: late"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class _Output:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    def note(self, text: str) -> None:
        pass

    def progress_stream(self):
        return None


class _Indexer:
    def request(self, op: str, user: str, *args):
        return defer.succeed((0, [] if op.startswith("LIST") else None))


class DispatchTests(TestCase):
    def test_every_command_of_the_table_has_a_runner(self) -> None:
        share = Path(self.mktemp())
        share.mkdir()
        shell = Shell(_Indexer(), _Output(), share, reactor=MemoryReactorClock())
        self.assertEqual(set(shell._commands), set(commands.COMMANDS))
