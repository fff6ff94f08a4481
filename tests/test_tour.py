"""The README's tour, followed as printed: ``make run``'s stack, two clients, one file.

``make run`` starts ``twistd p2p-stack`` with ``P2P_DEMO_DIR`` set; the stack
fills that folder and prints a tour to paste. This test starts the stack the
same way (on ports the kernel picks), reads the tour it prints, and runs its
lines as a user would: the shell commands word for word from a directory
outside the checkout, the client commands on each client's input.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from p2p import stack
from tests.support import REPO, deadline, hold_port, spawn, spawn_twistd
from tests.test_indexer_e2e import indexer_db

#: A tour line to paste is indented by this much; the others start with ``s> ``.
INDENT = "    "


def tour_sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """The printed tour: each ``s> tour:`` heading with the lines to paste under it."""
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("s> tour:"):
            sections.append((line, []))
        elif line.startswith(INDENT) and sections:
            sections[-1][1].append(line)
    return sections


class TourTests(TestCase):
    """The tour ``make run`` prints ends in ``c> GET_FILE OK`` with alice's bytes."""

    def setUp(self):
        # Outside the checkout, as a user's terminal would be (trial's own
        # temporary directory is inside it).
        self.outside = Path(tempfile.mkdtemp(prefix="p2p-tour-")).resolve()
        self.addCleanup(shutil.rmtree, self.outside, True)
        self.assertFalse(self.outside.is_relative_to(REPO))

    @defer.inlineCallbacks
    def test_tour_as_printed(self):
        demo = self.outside / "demo"
        home = self.outside / "stack"
        somewhere = self.outside / "elsewhere"
        home.mkdir()
        somewhere.mkdir()
        logger = hold_port(self)
        proc = spawn_twistd(
            self,
            "p2p-stack",
            "--indexer-listen=tcp:0:interface=127.0.0.1",
            "--time-listen=tcp:0:interface=127.0.0.1",
            f"--logger-listen=tcp:{logger}:interface=127.0.0.1",
            "--no-rpcbind",
            f"--db={indexer_db(self, ':memory:')}",
            cwd=home,
            env={stack.DEMO_ENV: str(demo)},
        )
        yield proc.wait_for_line(r"s> tour: then QUIT at alice's prompt, and: cat (.+)$")
        sections = tour_sections(proc.lines)
        self.assertEqual(len(sections), 5, proc.output())
        (_, [alice_shell]), (_, alice_input), (_, [bob_shell]), (_, bob_input), (last, _) = sections

        alice_args = shlex.split(alice_shell)
        self.assertTrue(Path(alice_args[0]).is_absolute(), alice_shell)
        self.assertEqual(Path(alice_args[0]).name, "p2p-client")
        alice = spawn(self, alice_args, cwd=somewhere, name="alice")
        alice.write("".join(line + "\n" for line in alice_input).encode())
        yield alice.wait_for_line(r"^c> PUBLISH OK$")
        self.assertEqual(alice.lines, ["c> REGISTER OK", "c> CONNECT OK", "c> PUBLISH OK"])

        bob = spawn(self, shlex.split(bob_shell), cwd=somewhere, name="bob")
        bob.write("".join(line + "\n" for line in bob_input).encode())
        code = yield deadline(bob.ended)
        self.assertEqual(code, 0, bob.output())
        self.assertIn("c> GET_FILE OK", bob.lines, bob.output())
        self.assertEqual(bob.lines[-1], "c> GET_FILE OK", bob.output())
        found = bob.lines.index("c> SEARCH OK")  # the search finds alice's file, its size
        size = len(stack.DEMO_BYTES)
        self.assertRegex(bob.lines[found + 1], rf'^\talice {stack.DEMO_FILE} {size} "')

        alice.write(b"QUIT\n")
        code = yield deadline(alice.ended)
        self.assertEqual(code, 0, alice.output())

        # The file the tour says to look at holds alice's bytes, and nothing
        # landed in the directory the clients were started from.
        copy = Path(shlex.split(last.rsplit("cat ", 1)[1])[0])
        self.assertEqual(copy, demo / "bob" / stack.DEMO_FILE)
        self.assertEqual(copy.read_bytes(), (demo / "alice" / stack.DEMO_FILE).read_bytes())
        self.assertEqual(copy.read_bytes(), stack.DEMO_BYTES)
        self.assertEqual(list(somewhere.iterdir()), [])
