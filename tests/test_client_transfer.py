"""Real client processes on 127.0.0.1 exchanging files through their shells.

Files are generated in each test's temporary directory and compared byte for
byte (SHA-256, streamed). The time service is left down on purpose: stamps fall
back to the local clock, which these tests do not care about.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support import deadline, poll_until
from tests.test_client_e2e import Stack

MiB = 1024 * 1024
#: Seconds allowed for one large transfer on a busy two-core machine.
BIG_DEADLINE = 180.0


def digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def make_big(path: Path, mib: int) -> str:
    """Write ``mib`` MiB of varied bytes, 1 MiB at a time; return their SHA-256."""
    block = os.urandom(MiB)
    h = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(mib):
            chunk = block[i:] + block[:i]
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


class TransferTestCase(TestCase):
    @defer.inlineCallbacks
    def online(self, *names: str, shares: dict[str, Path] | None = None):
        """One shell per name, registered and connected; fires with them in order."""
        shells = []
        for name in names:
            share = (shares or {}).get(name)
            shell = self.stack.shell(name, share=share)
            yield shell.check(f"REGISTER {name}", "c> REGISTER OK")
            yield shell.check(f"CONNECT {name}", "c> CONNECT OK")
            shells.append(shell)
        return shells

    @defer.inlineCallbacks
    def setUp(self):
        self.stack = Stack(self)
        yield self.stack.start_indexer()


class TwoClientTests(TransferTestCase):
    @defer.inlineCallbacks
    def test_small_odd_and_200_mib_files_arrive_byte_for_byte(self):
        alice, bob = yield self.online("alice", "bob")
        files = {
            "empty.bin": b"",
            "one.bin": b"\x00",
            "nul.bin": b"\x00" * 1000 + bytes(range(256)) * 4096 + b"\x00\n\r\x00",
        }
        for name, data in files.items():
            (alice.share / name).write_bytes(data)
        big_hash = make_big(alice.share / "big.bin", 200)
        for name in [*files, "big.bin"]:
            yield alice.check(f"PUBLISH {name} test file {name}", "c> PUBLISH OK")
        for name, data in files.items():
            yield bob.check(f"GET_FILE alice {name} got-{name}", "c> GET_FILE OK")
            self.assertEqual((bob.cwd / f"got-{name}").read_bytes(), data, name)
        got = yield bob.run("get_file alice big.bin got-big.bin", timeout=BIG_DEADLINE)
        self.assertEqual(got, ["c> GET_FILE OK"], bob.proc.output())
        self.assertEqual(digest(bob.cwd / "got-big.bin"), big_hash)
        self.assertEqual(sorted(p.name for p in bob.cwd.glob(".*part*")), [])

    @defer.inlineCallbacks
    def test_missing_unpublished_and_escaping_files_are_refused(self):
        root = Path(self.mktemp()).resolve()
        share = root / "share"
        share.mkdir(parents=True)
        (root / "secret.txt").write_bytes(b"outside the share")
        (share / "unpublished.txt").write_bytes(b"not published")
        (share / "link.txt").symlink_to(root / "secret.txt")
        alice, bob = yield self.online("alice", "bob", shares={"alice": share})
        for name in ("../secret.txt", str(root / "secret.txt"), "link.txt", "gone.txt"):
            yield alice.check(f"PUBLISH {name} try it", "c> PUBLISH OK")
        self.assertTrue(
            any("not inside the share directory" in line for line in alice.proc.errlines)
        )
        for name in (
            "../secret.txt",
            str(root / "secret.txt"),
            "link.txt",
            "gone.txt",
            "unpublished.txt",
        ):
            yield bob.check(f"GET_FILE alice {name} out.txt", "c> GET_FILE FAIL / FILE NOT EXIST")
            self.assertFalse((bob.cwd / "out.txt").exists(), name)
        yield bob.check("GET_FILE nobody x out.txt", "c> GET_FILE FAIL")
        yield bob.check("GET_FILE alice link.txt no/such/dir/out.txt", "c> GET_FILE FAIL")
        self.assertEqual(list(bob.cwd.glob(".*part*")), [])

    @defer.inlineCallbacks
    def test_files_published_in_an_earlier_session_are_served(self):
        alice, bob = yield self.online("alice", "bob")
        (alice.share / "kept.txt").write_bytes(b"still here")
        yield alice.check("PUBLISH kept.txt survives", "c> PUBLISH OK")
        yield alice.check("DISCONNECT alice", "c> DISCONNECT OK")
        yield alice.quit()
        again = self.stack.shell("alice", cwd=alice.cwd, home=alice.home)
        yield again.check("CONNECT alice", "c> CONNECT OK")
        yield bob.check("GET_FILE alice kept.txt k.txt", "c> GET_FILE OK")
        self.assertEqual((bob.cwd / "k.txt").read_bytes(), b"still here")
        yield again.check("DELETE kept.txt", "c> DELETE OK")
        yield bob.check("GET_FILE alice kept.txt k2.txt", "c> GET_FILE FAIL / FILE NOT EXIST")

    @defer.inlineCallbacks
    def test_serving_client_killed_then_restarted_the_download_resumes(self):
        alice, bob = yield self.online("alice", "bob")
        with (alice.share / "huge.bin").open("wb") as f:
            f.truncate(1024 * MiB)  # sparse: costs no disk to serve
        yield alice.check("PUBLISH huge.bin big", "c> PUBLISH OK")
        before = len(bob.lines)
        bob.proc.write(b"GET_FILE alice huge.bin huge.bin\n")
        state = bob.cwd / ".huge.bin.p2p-part.json"

        def receiving() -> bool:
            return any(p.stat().st_size > 0 for p in bob.cwd.glob(".huge.bin.p2p-part"))

        yield poll_until(receiving, what="bytes arriving at bob")
        # Freeze bob so the transfer cannot finish first, kill alice, let bob go on.
        bob.proc.signal("STOP")
        yield alice.proc.kill()
        bob.proc.signal(signal.SIGCONT)
        yield poll_until(lambda: len(bob.lines) > before, BIG_DEADLINE, what="bob's verdict")
        self.assertEqual(bob.lines[before:], ["c> GET_FILE FAIL"], bob.proc.output())
        self.assertFalse((bob.cwd / "huge.bin").exists())
        held = json.loads(state.read_text())["prefix"]
        self.assertGreater(held, 0)
        # alice comes back (same home: her published files); bob asks again and continues.
        again = self.stack.shell("alice", cwd=alice.cwd, home=alice.home)
        yield again.check("CONNECT alice", "c> CONNECT OK")
        got = yield bob.run("GET_FILE alice huge.bin huge.bin", timeout=BIG_DEADLINE)
        self.assertEqual(got, ["c> GET_FILE OK"], bob.proc.output())
        match = yield bob.proc.wait_for_line(r"^resuming \S*huge\.bin at (\d+) bytes$")
        self.assertEqual(int(match[1]), held)
        self.assertEqual(digest(bob.cwd / "huge.bin"), digest(alice.share / "huge.bin"))
        self.assertEqual(list(bob.cwd.glob(".huge.bin.*")), [])


class ThreeClientTests(TransferTestCase):
    @defer.inlineCallbacks
    def test_two_downloads_from_one_peer_at_once_and_between_all_three(self):
        alice, bob, carol = yield self.online("alice", "bob", "carol")
        big_hash = make_big(alice.share / "big.bin", 200)
        (bob.share / "from-bob.bin").write_bytes(os.urandom(3 * MiB) + b"\x00")
        yield alice.check("PUBLISH big.bin shared", "c> PUBLISH OK")
        yield bob.check("PUBLISH from-bob.bin bob's", "c> PUBLISH OK")
        both = defer.gatherResults(
            [
                bob.run("GET_FILE alice big.bin copy.bin", timeout=BIG_DEADLINE),
                carol.run("GET_FILE alice big.bin copy.bin", timeout=BIG_DEADLINE),
            ]
        )
        results = yield deadline(both, BIG_DEADLINE)
        self.assertEqual(results, [["c> GET_FILE OK"], ["c> GET_FILE OK"]])
        self.assertEqual(digest(bob.cwd / "copy.bin"), big_hash)
        self.assertEqual(digest(carol.cwd / "copy.bin"), big_hash)
        yield carol.check("GET_FILE bob from-bob.bin b.bin", "c> GET_FILE OK")
        yield alice.check("GET_FILE bob from-bob.bin b.bin", "c> GET_FILE OK")
        original = digest(bob.share / "from-bob.bin")
        self.assertEqual(digest(carol.cwd / "b.bin"), original)
        self.assertEqual(digest(alice.cwd / "b.bin"), original)
