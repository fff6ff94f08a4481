"""Resumed and multi-source downloads between real client processes on 127.0.0.1.

The serving clients cap their upload rate (``--max-upload-rate``) so a download
lasts long enough to be cut where the test wants it; every wait is for a line,
a file's content or a process's end, with a deadline.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from twisted.internet import defer

from tests.support import poll_until
from tests.test_client_transfer import BIG_DEADLINE, MiB, TransferTestCase, digest, make_big

#: Each serving client's cap: 40 MiB take about 4 s from one source, 100 MiB from
#: three about 3.3 s (progress is recorded once a second).
RATE = str(10 * MiB)
RESUMING = r"^resuming \S*{name} at (\d+) bytes$"


def held(cwd: Path, name: str) -> int:
    """Bytes the partial state beside ``cwd/name`` counts as complete (0: none yet)."""
    try:
        state = json.loads((cwd / f".{name}.p2p-part.json").read_text())
    except (OSError, ValueError):
        return 0
    piece = state.get("piece_size") or 0
    return state["prefix"] + len(state["pieces"]) * piece


class CappedCase(TransferTestCase):
    """Serving clients capped at RATE, and what a downloader's stderr says."""

    @defer.inlineCallbacks
    def capped(self, name: str, cwd=None, home=None):
        """A shell for ``name`` serving at most RATE bytes/s, connected (registered if new)."""
        shell = self.stack.shell(name, cwd=cwd, home=home, extra=("--max-upload-rate", RATE))
        if home is None:
            yield shell.check(f"REGISTER {name}", "c> REGISTER OK")
        yield shell.check(f"CONNECT {name}", "c> CONNECT OK")
        return shell

    @defer.inlineCallbacks
    def cut_by_killing(self, owner, bob, local: str):
        """bob runs ``GET_FILE <owner> big.bin <local>``; once bob has saved some
        progress the owner's client is killed (kill -9). Fires with the bytes bob kept."""
        before = len(bob.lines)
        bob.proc.write(f"GET_FILE {owner.proc.name} big.bin {local}\n".encode())
        yield poll_until(lambda: held(bob.cwd, local) > 0, BIG_DEADLINE, what="progress saved")
        yield owner.proc.kill()
        yield poll_until(lambda: len(bob.lines) > before, BIG_DEADLINE, what="bob's verdict")
        self.assertEqual(bob.lines[before:], ["c> GET_FILE FAIL"], bob.proc.output())
        self.assertFalse((bob.cwd / local).exists())
        kept = held(bob.cwd, local)
        self.assertGreater(kept, 0)
        return kept

    @defer.inlineCallbacks
    def kill_and_resume(self, bob, original: str):
        """bob runs ``GET_FILE alice big.bin big.bin`` and is killed (kill -9) once it has
        saved some progress; bob started again (same directory and home) resumes at
        least there and ends with the bytes whose SHA-256 is ``original``."""
        bob.proc.write(b"GET_FILE alice big.bin big.bin\n")
        yield poll_until(lambda: held(bob.cwd, "big.bin") > 0, BIG_DEADLINE, what="progress saved")
        yield bob.proc.kill()  # kill -9: no goodbye, no last save
        kept = held(bob.cwd, "big.bin")
        self.assertFalse((bob.cwd / "big.bin").exists())
        again = self.stack.shell("bob", cwd=bob.cwd, home=bob.home)
        yield again.check("CONNECT bob", "c> CONNECT OK")
        got = yield again.run("GET_FILE alice big.bin big.bin", timeout=BIG_DEADLINE)
        self.assertEqual(got, ["c> GET_FILE OK"], again.proc.output())
        [at] = self.resumed_at(again, "big.bin")
        self.assertGreaterEqual(at, kept)
        self.assertGreater(at, 0)
        self.assertEqual(digest(bob.cwd / "big.bin"), original)
        self.assertEqual(sorted(p.name for p in bob.cwd.glob(".big.bin*")), [])

    def resumed_at(self, shell, name: str) -> list[int]:
        pattern = re.compile(RESUMING.format(name=re.escape(name)))
        return [int(m[1]) for line in shell.proc.errlines if (m := pattern.search(line))]


class ResumeTests(CappedCase):
    @defer.inlineCallbacks
    def test_downloading_client_killed_then_restarted(self):
        alice = yield self.capped("alice")
        (bob,) = yield self.online("bob")
        original = make_big(alice.share / "big.bin", 40)
        yield alice.check("PUBLISH big.bin big", "c> PUBLISH OK")
        yield self.kill_and_resume(bob, original)

    @defer.inlineCallbacks
    def test_resumed_from_another_owner_of_the_same_content(self):
        alice = yield self.capped("alice")
        carol = yield self.capped("carol")
        (bob,) = yield self.online("bob")
        original = make_big(alice.share / "big.bin", 40)
        yield alice.check("PUBLISH big.bin big", "c> PUBLISH OK")
        kept = yield self.cut_by_killing(alice, bob, "copy.bin")
        # carol has the same bytes under another name: the download goes on from her.
        os.link(alice.share / "big.bin", carol.share / "same-bytes.bin")
        yield carol.check("PUBLISH same-bytes.bin hers", "c> PUBLISH OK")
        got = yield bob.run("GET_FILE carol same-bytes.bin copy.bin", timeout=BIG_DEADLINE)
        self.assertEqual(got, ["c> GET_FILE OK"], bob.proc.output())
        [at] = self.resumed_at(bob, "copy.bin")
        self.assertGreaterEqual(at, kept)
        self.assertEqual(digest(bob.cwd / "copy.bin"), original)

    @defer.inlineCallbacks
    def test_content_changed_between_attempts_is_not_mixed(self):
        alice = yield self.capped("alice")
        (bob,) = yield self.online("bob")
        make_big(alice.share / "big.bin", 40)
        yield alice.check("PUBLISH big.bin v1", "c> PUBLISH OK")
        yield self.cut_by_killing(alice, bob, "big.bin")
        # alice comes back with other bytes (same size) in that file, published again.
        again = yield self.capped("alice", cwd=alice.cwd, home=alice.home)
        changed = make_big(alice.share / "big.bin.new", 40)
        os.replace(alice.share / "big.bin.new", alice.share / "big.bin")
        yield again.check("DELETE big.bin", "c> DELETE OK")
        yield again.check("PUBLISH big.bin v2", "c> PUBLISH OK")
        got = yield bob.run("GET_FILE alice big.bin big.bin", timeout=BIG_DEADLINE)
        self.assertEqual(got, ["c> GET_FILE OK"], bob.proc.output())
        self.assertEqual(self.resumed_at(bob, "big.bin"), [])
        self.assertEqual(digest(bob.cwd / "big.bin"), changed)


class SeveralSourcesTests(CappedCase):
    @defer.inlineCallbacks
    def three_owners(self, mib: int):
        """alice, carol and dave (capped) publish the same ``mib`` MiB as big.bin; bob
        is connected. Fires with the four shells and the file's SHA-256."""
        shells = []
        for name in ("alice", "carol", "dave"):
            shells.append((yield self.capped(name)))
        (bob,) = yield self.online("bob")
        original = make_big(shells[0].share / "big.bin", mib)
        for shell in shells[1:]:  # copies of their own (a link's change touches all three)
            (shell.share / "big.bin").write_bytes((shells[0].share / "big.bin").read_bytes())
        for shell in shells:
            yield shell.check("PUBLISH big.bin the same", "c> PUBLISH OK")
        return (*shells, bob), original

    @defer.inlineCallbacks
    def test_downloading_client_killed_midway_resumes_with_the_pieces_checked(self):
        (_alice, _carol, _dave, bob), original = yield self.three_owners(100)
        yield self.kill_and_resume(bob, original)

    @defer.inlineCallbacks
    def test_three_sources_one_killed_one_altered(self):
        (_alice, carol, dave, bob), original = yield self.three_owners(100)
        # dave's copy changes behind his client's back: other bytes, same size.
        with (dave.share / "big.bin").open("r+b") as f:
            for offset in range(0, 100 * MiB, 4 * MiB):
                f.seek(offset + 7)
                f.write(b"altered")
        before = len(bob.lines)
        bob.proc.write(b"GET_FILE alice big.bin big.bin\n")
        yield poll_until(lambda: held(bob.cwd, "big.bin") > 0, BIG_DEADLINE, what="pieces in")
        yield carol.proc.kill()
        yield poll_until(lambda: len(bob.lines) > before, BIG_DEADLINE, what="bob's verdict")
        self.assertEqual(bob.lines[before:], ["c> GET_FILE OK"], bob.proc.output())
        self.assertEqual(digest(bob.cwd / "big.bin"), original)
        dropped = [line for line in bob.proc.errlines if "GET_FILE: source" in line]
        self.assertTrue(any("source carol" in line for line in dropped), bob.proc.output())
        self.assertTrue(any("source dave" in line for line in dropped), bob.proc.output())
