"""actfmt: validate, convert and read sharded model-activation trees.

``import actfmt`` is light: torch, zarr and h5py are imported only when a function needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from actfmt._version import __version__

__all__ = ["__version__", "convert", "info", "open", "open_tree", "stats", "stream", "validate", "verify"]

if TYPE_CHECKING:  # pragma: no cover
    from actfmt.checks import validate
    from actfmt.conversion import convert, info, verify
    from actfmt.dataset import open, open_tree
    from actfmt.statistics import stats
    from actfmt.streaming import stream

_LAZY = {
    "validate": "actfmt.checks:validate",
    "convert": "actfmt.conversion:convert",
    "verify": "actfmt.conversion:verify",
    "info": "actfmt.conversion:info",
    "open": "actfmt.dataset:open",
    "open_tree": "actfmt.dataset:open_tree",
    "stats": "actfmt.statistics:stats",
    "stream": "actfmt.streaming:stream",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'actfmt' has no attribute {name!r}")

    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
