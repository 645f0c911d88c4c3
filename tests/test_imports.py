"""Imports go one way (docs/architecture.md):

    config -> storage -> runformat -> schema -> stats -> metrics -> export -> record | analysis | importers
    -> alerts -> commands, cli, report, demo, integrations, app

A module may import its own package and any lower layer, never a higher layer nor a sibling package of its
own layer (the recorder never reads runs, the reader never writes them). The graph is built with ``ast`` from
every import statement, function-local ones included (only ``if TYPE_CHECKING:`` blocks are left out: they
never run), and must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, ...], ...] = (
    ("rldiag.config",),
    ("rldiag.storage",),
    ("rldiag.runformat",),
    ("rldiag.schema",),
    ("rldiag.stats",),
    ("rldiag.metrics",),
    ("rldiag.export",),  # trackers and Prometheus: fed by the recorder (log_to=) and the watch/export commands
    ("rldiag.record", "rldiag.analysis", "rldiag.importers"),
    ("rldiag.alerts",),
    (
        "rldiag.commands",
        "rldiag.cli",
        "rldiag.__main__",
        "rldiag.report",
        "rldiag.precompile",
        "rldiag.demo",
        "rldiag.record.integrations",
        "app",
    ),
)
"""Packages (or modules) by layer, lowest first. The longest matching prefix decides a module's package."""
SEPARATE: frozenset[int] = frozenset({6})
"""Layers whose packages may not import each other (the others are one unit each, cycles aside)."""

ALLOWED: dict[tuple[str, str], str] = {
    ("rldiag.record.recorder", "rldiag.alerts"): (
        "Recorder(alerts=True | path | config) builds the online evaluator; the import is function-local and runs "
        "only when alerts are asked for, so recording never loads the alerts package otherwise"
    ),
    ("rldiag.importers", "rldiag.record"): "an importer writes its run through the Recorder",
    ("rldiag.record.importer", "rldiag.importers"): "the importers' old import path, kept as a re-export",
}
"""Edges against the layering that are deliberate, each with its reason (importer module, imported package)."""


def _package(module: str) -> str | None:
    best = None
    for layer in LAYERS:
        for pkg in layer:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best)):
                best = pkg
    return best


def _layer(pkg: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("rldiag", "app"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "sample_logs" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this project that ``module`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (got := resolve(alias.name)) is not None:
                    found.add(got)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                got = full if full in known else resolve(base)
                if got is not None:
                    found.add(got)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (the root package ``rldiag``, lazy by design, is left out)."""
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) - {"rldiag"} for m, p in mods.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(graph.items()):
        src = _package(mod)
        if src is None:
            continue
        for tgt in sorted(targets):
            dst = _package(tgt)
            if dst is None or dst == src:
                continue
            if any(mod.startswith(a) and (dst == b or dst.startswith(b + ".")) for a, b in ALLOWED):
                continue
            if _layer(dst) > _layer(src) or (_layer(dst) == _layer(src) and _layer(src) in SEPARATE):
                out.append(f"{mod} imports {tgt} ({src} may not import {dst})")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_module_has_a_layer() -> None:
    assert [m for m in import_graph() if _package(m) is None and m != "rldiag"] == []


def test_imports_go_one_way() -> None:
    assert violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    "source, edge",
    [
        ("from rldiag.analysis.io import open_run\n", "rldiag.analysis.io"),  # module level
        ("def f():\n    from rldiag.alerts import engine\n", "rldiag.alerts.engine"),  # function-local
        ("def f():\n    import rldiag.analysis.lens\n", "rldiag.analysis.lens"),
    ],
)
def test_the_checker_sees_backward_edges(tmp_path: Path, source: str, edge: str) -> None:
    """A backward edge written any of these ways is caught (the checker itself can fail)."""
    path = tmp_path / "m.py"
    path.write_text(source)
    known = set(_modules())
    graph = {"rldiag.stats.probe": _imports("rldiag.stats.probe", path, known)}
    assert edge in graph["rldiag.stats.probe"]
    assert violations(graph) and "rldiag.stats.probe imports" in violations(graph)[0]
    full = import_graph()
    graph = full | {"rldiag.stats.kernel": full["rldiag.stats.kernel"] | {"rldiag.metrics.registry"}}
    assert cycles(graph)  # registry imports the kernel: the added edge closes a cycle


def test_subpackages_are_attributes_of_the_package_and_import_rldiag_stays_free_of_torch() -> None:
    """``import rldiag; rldiag.alerts.AlertConfig(...)`` works (each subpackage imported on first use), and
    neither that nor ``import rldiag`` imports torch (the analysis side runs without it)."""
    import subprocess
    import sys

    script = (
        "import sys, rldiag\n"
        "assert 'torch' not in sys.modules and 'rldiag.alerts' not in sys.modules\n"
        "assert rldiag.alerts.AlertConfig(stop_on=('critical',)).stop_on == ('critical',)\n"
        "assert rldiag.storage.location('runs/x').name == 'x'\n"
        "assert callable(rldiag.precompile.precompile)\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    rldiag.no_such_name\nexcept AttributeError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]
