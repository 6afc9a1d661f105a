"""The seed layout: metadata, names, and the producer's shard arithmetic (one place, used by everyone).

A split directory looks like::

    {split}/metadata.json
    {split}/layer_00/shard_000.pt, shard_001.pt, ...
    {split}/layer_01/...

The producer accumulates batches of ``batch_size`` rows and flushes a shard once its buffer holds **at least**
``shard_size`` rows, so a full shard holds ``ceil(shard_size / batch_size) * batch_size`` rows and the last
shard the rest.  This module knows that arithmetic; nothing else re-derives it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actfmt.errors import MetadataError

__all__ = [
    "JSON_MAX_BYTES",
    "JSON_MAX_DEPTH",
    "JSON_MAX_DIGITS",
    "KNOWN_KEYS",
    "LAYER_RE",
    "METADATA_FILE",
    "PRODUCER_KEYS",
    "REQUIRED_KEYS",
    "SHARD_RE",
    "SUPPORTED_DTYPES",
    "JSONLimitError",
    "Metadata",
    "MetadataProblem",
    "ShardPlan",
    "expected_shard_rows",
    "full_shard_rows",
    "layer_index",
    "layer_name",
    "load_metadata",
    "loads_json",
    "parse_metadata",
    "read_json_document",
    "rel",
    "shard_index",
    "shard_name",
    "write_json",
]

METADATA_FILE = "metadata.json"
#: The names, as the producer spells them (``layer_index`` / ``shard_index`` also check the zero padding).
LAYER_RE = re.compile(r"^layer_(\d+)$")
SHARD_RE = re.compile(r"^shard_(\d+)\.pt$")
#: Names spelled off the pattern that still stand for an index (``layer_3``, ``Layer-03``, ``shard_1.pt``,
#: ``shard_000.pth``): a directory holding such layers is a split, and validation reports the spelling.
LOOSE_LAYER_RE = re.compile(r"^layer[_-]?(\d+)$", re.IGNORECASE)
LOOSE_SHARD_RE = re.compile(r"^shard[_-]?(\d+)\.(?:pt|pth)$", re.IGNORECASE)

#: dtype names actfmt stores (torch spelling).
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")

#: The keys the layout arithmetic needs: key -> (python type(s), must be positive).  A missing one is an
#: error (ACT202): without it the shards cannot be checked or read.
REQUIRED_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "total_examples": ((int,), True),
    "shard_size": ((int,), True),
    "batch_size": ((int,), True),
    "hidden_dim": ((int,), True),
    "num_layers": ((int,), True),
}

#: The producer's other keys: checked when present; a missing one is a warning (ACT205), since reading,
#: validating and converting never need them.
PRODUCER_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_name": ((str,), False),
    "dataset_name": ((str,), False),
    "split": ((str,), False),
    "load_in_4bit": ((bool,), False),
}

#: Every key actfmt checks, the producer's first (the order ``metadata.json`` has them in).
KNOWN_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {**PRODUCER_KEYS, **REQUIRED_KEYS}


# -- JSON: the one loader of every document actfmt reads (untrusted input) -----------------------------------
#: Bounds of any JSON document actfmt reads (metadata.json, Zarr documents, the actfmt block, safetensors and
#: HDF5 headers): a document beyond them is refused before it can exhaust memory or the interpreter's stack.
JSON_MAX_BYTES = 100_000_000  # the safetensors library's own header bound
JSON_MAX_DEPTH = 64
JSON_MAX_DIGITS = 30


class JSONLimitError(ValueError):
    """A JSON document beyond :data:`JSON_MAX_BYTES`, :data:`JSON_MAX_DEPTH` or :data:`JSON_MAX_DIGITS`."""


def _bounded_int(text: str) -> int:
    if len(text) - text.startswith("-") > JSON_MAX_DIGITS:
        raise JSONLimitError(f"an integer of {len(text)} digits (at most {JSON_MAX_DIGITS} are read)")
    return int(text)


def _depth_ok(doc: Any) -> bool:
    """Whether ``doc`` nests at most :data:`JSON_MAX_DEPTH` arrays / objects (iterative: no recursion)."""
    todo = [(doc, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > JSON_MAX_DEPTH:
            return False
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def loads_json(raw: bytes | bytearray | memoryview | str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """``raw`` (UTF-8) parsed, within bounds: at most ``max_bytes``, nesting depth :data:`JSON_MAX_DEPTH` and
    :data:`JSON_MAX_DIGITS` digits per integer (``NaN`` / ``Infinity`` are accepted, as zarr-python writes
    them).  Raises ``ValueError``: :class:`JSONLimitError` beyond a bound, ``json.JSONDecodeError`` or
    ``UnicodeDecodeError`` otherwise -- never ``RecursionError``."""
    if len(raw) > max_bytes:
        raise JSONLimitError(f"{len(raw)} bytes of JSON, more than the {max_bytes} actfmt reads")
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
    try:
        doc = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise JSONLimitError(f"JSON nested deeper than {JSON_MAX_DEPTH} levels") from None
    if not _depth_ok(doc):
        raise JSONLimitError(f"JSON nested deeper than {JSON_MAX_DEPTH} levels")
    return doc


def read_json_document(location: Any, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """The JSON document at ``location`` (a :class:`~actfmt.storage.Location`), reading at most
    ``max_bytes + 1`` bytes: a larger file is a :class:`JSONLimitError` without being read whole."""
    raw = location.read_range(0, max_bytes + 1)
    return loads_json(raw, max_bytes)


def read_json_object(location: Any, what: str) -> dict[str, Any]:
    """A JSON object file, with precise errors (missing, not JSON, not an object)."""
    try:
        data = read_json_document(location)
    except FileNotFoundError:
        raise MetadataError(f"{location}: missing; {what}.") from None
    except JSONLimitError as exc:
        raise MetadataError(f"{location}: refused: {exc}; fix the file.") from None
    except ValueError as exc:  # not JSON, not UTF-8
        raise MetadataError(f"{location}: not valid JSON ({exc}); fix the file.") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{location}: must hold a JSON object.")
    return data


def layer_name(index: int) -> str:
    """``layer_name(3) == "layer_03"`` (the producer's ``f"layer_{i:02d}"``)."""
    return f"layer_{index:02d}"


def shard_name(index: int) -> str:
    """``shard_name(13) == "shard_013.pt"``."""
    return f"shard_{index:03d}.pt"


def _exact_index(pattern: re.Pattern[str], spell: Callable[[int], str], name: str) -> int | None:
    m = pattern.match(name)
    return None if m is None or spell(int(m.group(1))) != name else int(m.group(1))


def layer_index(name: str) -> int | None:
    """The index of a correctly spelled layer directory name, else ``None`` (``layer_3`` is not)."""
    return _exact_index(LAYER_RE, layer_name, name)


def shard_index(name: str) -> int | None:
    """The index of a correctly spelled shard file name, else ``None`` (``shard_1.pt`` is not)."""
    return _exact_index(SHARD_RE, shard_name, name)


def full_shard_rows(shard_size: int, batch_size: int) -> int:
    """Rows in every full shard: the first multiple of ``batch_size`` that is ``>= shard_size``."""
    return math.ceil(shard_size / batch_size) * batch_size


@dataclass(frozen=True)
class ShardPlan:
    """The shard rows the producer writes for ``total`` examples, with the arithmetic spelled out."""

    total: int
    shard_size: int
    batch_size: int

    @property
    def full_rows(self) -> int:
        return full_shard_rows(self.shard_size, self.batch_size)

    @property
    def count(self) -> int:
        return math.ceil(self.total / self.full_rows) if self.total > 0 else 0

    @property
    def rows(self) -> list[int]:
        return expected_shard_rows(self.total, self.shard_size, self.batch_size)

    def explain_full_rows(self) -> str:
        if self.full_rows == self.shard_size:
            return f"{self.full_rows}"
        return f"{self.full_rows} = ceil({self.shard_size} / {self.batch_size}) * {self.batch_size}"

    def explain_count(self) -> str:
        return f"{self.count} = ceil({self.total} / {self.full_rows})"


def expected_shard_rows(total: int, shard_size: int, batch_size: int) -> list[int]:
    """Row count of each shard the producer writes for ``total`` examples."""
    if total <= 0:
        return []
    full = full_shard_rows(shard_size, batch_size)
    n = math.ceil(total / full)
    return [full] * (n - 1) + [total - (n - 1) * full]


@dataclass(frozen=True)
class MetadataProblem:
    """One problem found while parsing metadata; ``kind`` is ``unparseable``, ``missing-key`` (a required key),
    ``missing-producer-key`` (a producer key: not fatal) or ``bad-value``."""

    kind: str
    key: str | None
    message: str
    expected: Any = None
    actual: Any = None


@dataclass(frozen=True, eq=True)
class Metadata:
    """A parsed, checked ``metadata.json``.  ``raw`` keeps every key verbatim, extra keys included.  The
    producer's keys (:data:`PRODUCER_KEYS`) are ``None`` when the file lacks them."""

    total_examples: int
    shard_size: int
    batch_size: int
    hidden_dim: int
    num_layers: int
    model_name: str | None = None
    dataset_name: str | None = None
    split: str | None = None
    load_in_4bit: bool | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def shards(self) -> ShardPlan:
        return ShardPlan(self.total_examples, self.shard_size, self.batch_size)

    @classmethod
    def from_dict(cls, data: Any, source: str = METADATA_FILE) -> Metadata:
        """Parse and check; raise :class:`MetadataError` listing every problem."""
        meta, problems = parse_metadata(data)
        if meta is None:
            details = "; ".join(p.message for p in problems)
            raise MetadataError(f"{source}: {details}. Fix the file (see `actfmt rule ACT203`).")
        return meta

    def to_dict(self) -> dict[str, Any]:
        """The original keys and values, verbatim."""
        return dict(self.raw)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_metadata(data: Any) -> tuple[Metadata | None, list[MetadataProblem]]:
    """Check a decoded ``metadata.json``; return the metadata (``None`` if unusable) and every problem."""
    if not isinstance(data, dict):
        return None, [
            MetadataProblem(
                "unparseable",
                None,
                f"metadata must be a JSON object, got {_type_name(data)}",
                "object",
                _type_name(data),
            )
        ]
    problems: list[MetadataProblem] = []
    for key, (types, positive) in KNOWN_KEYS.items():
        if key not in data:
            if key in REQUIRED_KEYS:
                problems.append(
                    MetadataProblem("missing-key", key, f"required key {key!r} is missing", key, None)
                )
            else:
                problems.append(
                    MetadataProblem(
                        "missing-producer-key", key, f"the producer's key {key!r} is missing", key, None
                    )
                )
            continue
        value = data[key]
        wanted = " or ".join(t.__name__ for t in types)
        # bool is an int in Python: refuse it where an int is wanted.
        bad_type = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if bad_type:
            problems.append(
                MetadataProblem(
                    "bad-value",
                    key,
                    f"{key!r} must be {'a positive ' if positive else 'a '}{wanted}, got {json.dumps(value)}",
                    wanted,
                    value,
                )
            )
        elif positive and value <= 0:
            problems.append(
                MetadataProblem("bad-value", key, f"{key!r} must be positive, got {value}", "> 0", value)
            )
        elif isinstance(value, str) and not value.strip():
            problems.append(
                MetadataProblem("bad-value", key, f"{key!r} must not be empty", "non-empty", value)
            )
    if any(p.kind != "missing-producer-key" for p in problems):
        return None, problems
    kwargs = {key: data[key] for key in KNOWN_KEYS if key in data}
    return Metadata(**kwargs, raw=dict(data)), problems


def load_metadata(path: str | Path) -> Metadata:
    """Read and check ``metadata.json`` (a file, or a split directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / METADATA_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetadataError(
            f"{p}: no metadata.json; every split needs one (see `actfmt rule ACT101`)."
        ) from None
    except OSError as exc:
        raise MetadataError(f"{p}: cannot read ({exc.strerror or exc}).") from None
    try:
        data = loads_json(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(
            f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix the file."
        ) from None
    except ValueError as exc:
        raise MetadataError(f"{p}: {exc}; fix the file.") from None
    return Metadata.from_dict(data, source=str(p))


def write_json(path: str | Path, data: Any, fsync: bool = True) -> None:
    """Write JSON atomically (temporary file, fsync, rename), as the producer formats ``metadata.json``:
    ``json.dump(indent=2)``, no trailing newline.  ``fsync=False`` when only a killed process matters (the
    page cache survives it), not a power loss."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, p)


def rel(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators; ``.`` for the root itself."""
    p, r = Path(path), Path(root)
    try:
        out = p.relative_to(r).as_posix()
    except ValueError:
        out = p.as_posix()
    return out or "."
