"""The package's floors, read from the imports: nothing imports upward or in a circle.

Foundation (``wire``, ``console``, ``logcontract``, ``listening``,
``twisted_internals``, ``oncrpc``) imports no service; services (``indexer``,
``logger``, ``timews``, ``peer``) import only the foundation, never each other;
the client and the stack sit on top. Every import counts, including those
inside functions (imported lazily is still imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import TestCase

PACKAGE = Path(__file__).resolve().parent.parent / "p2p"

FLOORS = {
    "wire": 0,
    "console": 0,
    "logcontract": 0,
    "listening": 0,
    "tls": 0,
    "twisted_internals": 0,
    "oncrpc": 0,
    "logs": 0,
    "startup": 0,
    "keepalive": 0,
    "metrics": 0,
    "indexer": 1,
    "logger": 1,
    "timews": 1,
    "peer": 1,
    "client": 2,
    "stack": 2,
}


def _part(module: str) -> str | None:
    """``p2p.indexer.store`` -> ``indexer``; None outside the package."""
    pieces = module.split(".")
    return pieces[1] if pieces[0] == "p2p" and len(pieces) > 1 else None


def imports() -> dict[str, set[str]]:
    """For every module of the package (dotted), the p2p modules it imports."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[name] = {t for t in targets if t.startswith("p2p.")}
    return found


class LayoutTests(TestCase):
    def test_every_part_has_a_floor(self):
        parts = {_part(name) for name in imports()} - {None}
        self.assertEqual(parts - set(FLOORS), set())

    def test_no_import_runs_upward_or_sideways_between_services(self):
        wrong = []
        for module, targets in imports().items():
            here = _part(module)
            if here is None:
                continue
            for target in targets:
                there = _part(target)
                if there is None or there == here or there not in FLOORS:
                    continue
                if FLOORS[there] > FLOORS[here] or (FLOORS[there] == FLOORS[here] == 1):
                    wrong.append(f"{module} imports {target}")
        self.assertEqual(sorted(wrong), [])

    def test_no_circle_between_parts(self):
        graph: dict[str, set[str]] = {}
        for module, targets in imports().items():
            here = _part(module)
            if here is not None:
                graph.setdefault(here, set()).update(
                    p for p in (_part(t) for t in targets) if p not in (None, here)
                )
        visiting, done = set(), set()

        def visit(node: str, path: list[str]) -> None:
            if node in done:
                return
            self.assertNotIn(node, visiting, " -> ".join([*path, node]))
            visiting.add(node)
            for nxt in sorted(graph.get(node, ())):
                visit(nxt, [*path, node])
            visiting.discard(node)
            done.add(node)

        for node in sorted(graph):
            visit(node, [])
