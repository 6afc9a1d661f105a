"""The shape of the package: imports run one way, with no cycle, counting every import statement (function-local
and ``TYPE_CHECKING`` ones included), and the layers depend only downward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "actfmt"

#: The floors, bottom first: a module may import only from its own floor or below.
LAYERS = [
    {
        "actfmt._version",
        "actfmt._escape",
        "actfmt.errors",
        "actfmt.progress",
        "actfmt.layout",
        "actfmt.kernel",
    },
    {"actfmt.storage"},
    {"actfmt.formats", "actfmt.checksum", "actfmt.moments"},
    {"actfmt.report"},  # the result of a validation (Finding, severities): below the rules that make it
    {"actfmt.checks", "actfmt.conversion", "actfmt.statistics", "actfmt._dask"},
    {"actfmt.dataset", "actfmt.torch", "actfmt.streaming"},
    {"actfmt.reporters"},
    {"actfmt.cli", "actfmt.cli_base", "actfmt.__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the actfmt modules its import statements name (``from pkg import mod`` names ``pkg.mod``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t.startswith("actfmt"):
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t != mod:
                        graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            visit(v)
    return out


def _floor(mod: str) -> int:
    for i, floor in enumerate(LAYERS):
        if any(mod == f or mod.startswith(f + ".") for f in floor):
            return i
    return -1


def test_no_import_cycle() -> None:
    assert _cycles(import_graph()) == []


def test_every_module_has_a_floor() -> None:
    assert [m for m in _modules() if m != "actfmt" and _floor(m) < 0] == []


def test_imports_run_downward_only() -> None:
    wrong = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in targets
        if m != "actfmt" and t != "actfmt" and _floor(t) > _floor(m)
    ]
    assert wrong == []


#: The floors that hold the data (errors and layout, storage, formats) and what lies above them: an import from
#: one of the first into one of the second is an arrow back up (the issue-20 review found two).
BOTTOM = ("actfmt.errors", "actfmt.layout", "actfmt.storage", "actfmt.formats")
ABOVE = (
    "actfmt.checks",
    "actfmt.conversion",
    "actfmt.statistics",
    "actfmt.dataset",
    "actfmt.streaming",
    "actfmt._dask",
    "actfmt.torch",
    "actfmt.reporters",
    "actfmt.cli",
    "actfmt.cli_base",
)


def _within(mod: str, packages: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("bottom", BOTTOM)
def test_the_bottom_floors_import_nothing_above_them(bottom: str) -> None:
    """errors / layout, storage and formats name no rule, conversion, read API, renderer or command."""
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if _within(m, (bottom,))
        for t in targets
        if _within(t, ABOVE)
    )
    assert wrong == []


def test_the_result_imports_no_rule() -> None:
    """``actfmt.report`` (Finding, the severities, Report) names nothing of ``actfmt.checks``, not even for type
    checking or inside a function: the rules make a report, a report does not know the rules."""
    assert sorted(t for t in import_graph()["actfmt.report"] if _within(t, ("actfmt.checks",))) == []


def _format_rooms() -> list[str]:
    """The module (or package) of every registered format."""
    from actfmt.formats.registry import FORMATS, get_format

    rooms = []
    for name, target in FORMATS.items():
        module = target.partition(":")[0] if isinstance(target, str) else get_format(name).__module__
        rooms.append(module)
    return rooms


#: Imports of a format's own modules from outside actfmt.formats still to be removed; a fixed one must leave
#: this list, so it cannot go stale.  (The last, checks.context -> formats.pt.header, went with issue 20.)
KNOWN_INTERNAL_IMPORTS: set[str] = set()


def test_no_format_is_entered_from_outside_the_formats() -> None:
    """Outside ``actfmt.formats`` a format is reached through the registry (``actfmt.formats``) and the protocols
    (``formats.base`` ...), never through its own module or package."""
    rooms = tuple(_format_rooms())
    found = {
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if not _within(m, ("actfmt.formats",))
        for t in targets
        if _within(t, rooms)
    }
    assert sorted(found) == sorted(KNOWN_INTERNAL_IMPORTS)


def _format_names() -> set[str]:
    from actfmt.formats.registry import ALIASES, FORMATS

    return {*FORMATS, *ALIASES}


def test_no_format_is_named_outside_the_formats() -> None:
    """No string equal to a format's name or alias outside ``actfmt.formats`` (a ``format == "pt"`` branch, a
    ``{"zarr": ...}`` table): what a format does, it declares in its own room."""
    names = _format_names()
    found = [
        f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}"
        for mod, path in _modules().items()
        if not _within(mod, ("actfmt.formats",))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names
    ]
    assert found == []


#: The largest a module may grow (lines): past it, a module holds more than one idea.
MAX_MODULE_LINES = 600


def test_no_module_is_a_house_of_its_own() -> None:
    big = {
        str(p.relative_to(SRC)): n
        for p in _modules().values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_MODULE_LINES
    }
    assert big == {}


def test_no_remote_twin_modules() -> None:
    assert not [p for p in PACKAGE.rglob("*remote*.py")]


@pytest.mark.parametrize(
    "command", ["import actfmt", "import actfmt.cli; actfmt.cli.cli(['--help'], standalone_mode=False)"]
)
def test_startup_imports_no_heavy_library(command: str) -> None:
    code = (
        f"import sys; {command}; "
        "heavy = [m for m in ('torch', 'zarr', 'h5py', 'numpy', 'fsspec', 'dask') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_the_result_imports_alone() -> None:
    """``actfmt.report`` owns Finding and the severities: importing it first pulls in no rule (it once went
    through ``actfmt.checks`` and back, a circular import)."""
    code = "import sys, actfmt.report; assert not [m for m in sys.modules if m.startswith('actfmt.checks')]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_the_command_line_starts_without_the_api_or_a_drawing_library() -> None:
    """``actfmt --help`` imports the renderers (actfmt.reporters) but neither the API modules a command calls
    (they import every format) nor rich or matplotlib (imported when something is drawn)."""
    code = (
        "import sys, actfmt.cli, actfmt.reporters; "
        "late = [m for m in ('actfmt.checks', 'actfmt.conversion', 'actfmt.statistics', 'actfmt.dataset', "
        "'actfmt.streaming', 'rich', 'matplotlib') "
        "if m in sys.modules]; "
        "assert not late, late"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)


def test_the_api_functions_are_not_shadowed_by_a_module() -> None:
    """Importing a submodule binds it as an attribute of its package: no module may share a name with a function of
    the top-level API, or ``actfmt.convert(...)`` stops working once something imported it (it once did)."""
    code = (
        "import importlib, pkgutil, actfmt, inspect; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(actfmt.__path__, 'actfmt.') "
        "if not m.name.endswith('__main__')]; "
        "bad = [n for n in actfmt.__all__ if n != '__version__' and not inspect.isfunction(getattr(actfmt, n))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
