"""A plain (non-editable) install ships the twistd plugins and the logger's ``.x`` file."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support import REPO, deadline, run_command

PLUGINS = [f"twisted/plugins/p2p_{name}.py" for name in ("indexer", "logger", "time", "stack")]


class Wheel(TestCase):
    @defer.inlineCallbacks
    def test_wheel_contains_plugin(self):
        # Build from a copy so the checkout's own egg-info and build/ are left alone.
        src = Path(self.mktemp()).resolve() / "src"
        src.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        shutil.copytree(REPO / "p2p", src / "p2p", ignore=ignore)
        shutil.copytree(REPO / "twisted", src / "twisted", ignore=ignore)
        out = src.parent / "wheels"
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        argv += ["--no-index", "-q", str(src), "-w", str(out)]
        _, stderr, code = yield deadline(run_command(argv, cwd=src.parent), 120)
        # the test extras bring ``wheel``, so this builds offline, without isolation
        self.assertEqual(code, 0, stderr.decode(errors="replace"))
        [wheel] = out.glob("p2p-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        for plugin in PLUGINS:
            self.assertIn(plugin, names)
        self.assertIn("p2p/listening.py", names)
        self.assertIn("p2p/twisted_internals.py", names)
        self.assertIn("p2p/logger/logger.x", names)
        self.assertIn("p2p/indexer/service.py", names)
        self.assertIn("p2p/wire.py", names)
        # twisted/plugins is a namespace: shipping an __init__.py would hide Twisted's own
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
