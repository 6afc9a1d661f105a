"""Count the function-local imports of non-optional modules in ``src/actfmt`` (issue #20).

An ``import`` / ``from ... import`` inside a function body counts unless its top-level module is one of
:data:`OPTIONAL` (heavy or optional dependencies, imported where they are needed so that ``import actfmt`` and
the header-only paths stay light).  ``TYPE_CHECKING`` blocks are module level and never count.

numpy is a required dependency but is kept out of ``import actfmt``, ``actfmt --help`` and every header-only
path (format probes, ``actfmt validate`` without ``--deep``, ``actfmt info``); the tests enforce it
(tests/test_architecture.py, tests/formats/test_hdf5.py), so its local imports are counted apart:
``--with-numpy`` counts them too.

    python scripts/count_local_imports.py            # the count
    python scripts/count_local_imports.py --list     # and every counted import, file:line: module
    python scripts/count_local_imports.py --with-numpy
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

#: Heavy or optional dependencies: a local import of one of these is the point, not a smell.
OPTIONAL = frozenset(
    {
        "torch",
        "zarr",
        "numcodecs",
        "h5py",
        "hdf5plugin",
        "safetensors",
        "dask",
        "distributed",
        "fsspec",
        "s3fs",
        "botocore",
        "aiohttp",
        "aiobotocore",
        "matplotlib",
        "tensorstore",
        "xarray",
        "ml_dtypes",
        "rich",
        "click",
        "xxhash",
        "psutil",
    }
)

SRC = Path(__file__).resolve().parent.parent / "src" / "actfmt"


def _local_imports(path: Path, optional: frozenset[str]) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:
                    names = ["actfmt" if child.level else (child.module or "")]
                for name in names:
                    if name.split(".")[0] not in optional:
                        label = (
                            name
                            if isinstance(child, ast.Import)
                            else f"from {'.' * child.level}{child.module or ''}"
                        )
                        out.append((child.lineno, label))
            visit(child, inside)

    visit(tree, False)
    return out


def count(root: Path = SRC, with_numpy: bool = False) -> list[tuple[str, int, str]]:
    """Every counted import as ``(file relative to src/, line, module)``."""
    optional = OPTIONAL if with_numpy else OPTIONAL | {"numpy"}
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root.parent))
        found += [(rel, line, name) for line, name in _local_imports(path, optional)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every counted import")
    parser.add_argument("--with-numpy", action="store_true", help="count numpy's local imports too")
    args = parser.parse_args(argv)
    found = count(with_numpy=args.with_numpy)
    if args.list:
        for rel, line, name in found:
            print(f"{rel}:{line}: {name}")
    print(len(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
