"""ACT6xx: converted stores (``.zarr``, ``.h5``, safetensors directories) — complete, every chunk present, and
(with ``deep``) the data still matching the checksums recorded at conversion.

The scan opens each store's Reader once (:func:`actfmt.checks.context.scan_split`); the deep pass hashes each
layer the way ``actfmt convert`` did (:func:`actfmt.checksum.layer_checksum`).  The metadata and layer-layout
rules (ACT2xx, ACT102, ACT103, ACT502) also apply to stores; shard rules do not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from actfmt.checks.base import Finding
from actfmt.checks.context import SplitContext, SplitRule
from actfmt.checksum import layer_checksum
from actfmt.formats import get_format

__all__ = ["ChecksumMismatch", "Incomplete", "MissingChunk", "store_checksums", "store_info", "store_units"]


def store_info(ctx: SplitContext) -> dict[str, Any]:
    """Layers, missing chunks and the actfmt block of a store, gathered once (cached on the context)."""
    cached = ctx.cache.get("store")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    info: dict[str, Any] = {"layers": [], "missing": {}, "block": None, "error": None}
    ctx.cache["store"] = info
    reader = ctx.reader
    if reader is None:
        return info
    try:
        info["block"] = reader.actfmt
        info["layers"] = list(reader.layers)
        for pos, layer in enumerate(info["layers"]):
            missing = list(reader.missing_chunks(pos))
            if missing:
                info["missing"][layer.name] = missing
    except Exception as exc:  # a damaged store is a finding, never a crash
        info["error"] = exc
    return info


def store_units(ctx: SplitContext) -> tuple[int, int]:
    """``(chunks, layer files)`` of a store: what ACT601 looks for, counted for the summary line.

    Zarr and HDF5 layers count their chunks (a contiguous HDF5 dataset is one); a safetensors layer is one file.
    """
    info = store_info(ctx)
    reader = ctx.reader
    if reader is None or info["error"] is not None:
        return 0, 0
    chunks = files = 0
    described: list[int] | None = None
    for pos, layer in enumerate(info["layers"]):
        try:
            rows = reader.chunk_rows_of(pos)
            if rows is None:
                if described is None:
                    described = list(reader.describe().get("chunks") or [])
                rows = described[0] if described else None
        except Exception:  # a damaged layer is reported by the rules; count what can be counted
            rows = None
        if rows:
            chunks += -(-layer.rows // rows)
        elif get_format(ctx.format).single_file:
            chunks += 1
        else:
            files += 1
    return chunks, files


def store_checksums(ctx: SplitContext, on_bytes: Any = None) -> None:
    """Hash every layer with no missing chunk (deep pass); results in ``ctx.cache["checksums"]``."""
    info = store_info(ctx)
    reader = ctx.reader
    sums: dict[str, str | BaseException] = {}
    ctx.cache["checksums"] = sums
    if reader is None or info["error"] is not None:
        return
    for pos, layer in enumerate(info["layers"]):
        if layer.name in info["missing"]:
            continue
        try:
            sums[layer.name] = layer_checksum(reader, pos, on_bytes)
        except Exception as exc:
            sums[layer.name] = exc


class _StoreRule(SplitRule):
    pt_only = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.format == "pt":
            return ()
        return cls.check_store(ctx, store_info(ctx))

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:  # pragma: no cover
        return ()


class MissingChunk(_StoreRule):
    """A converted store lacks chunks of a layer (they would read back as zeros, silently).

    Zarr reads a missing chunk as the fill value, HDF5 an unallocated chunk likewise, and a short safetensors
    file lacks its last rows.  Checks every layer's chunk list against its shape; one finding per layer,
    listing the chunks.

    Why: a partial copy (rsync interrupted, a quota hit) leaves a store that opens and reads without error,
    with zeros where data was.

    Fix: re-copy the store from its source, or re-run `actfmt convert`.
    """

    code = "ACT601"
    name = "missing-chunk"

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:
        for name, missing in sorted(info["missing"].items()):
            shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            yield cls.finding(
                ctx.loc(name),
                f"{name}: {len(missing)} chunk{'s' if len(missing) > 1 else ''} missing: {shown}",
                expected=0,
                actual=len(missing),
            )


class ChecksumMismatch(_StoreRule):
    """A layer's data no longer matches the checksum recorded at conversion (`--deep`).

    `actfmt convert` records an xxh3_64 checksum of each layer's raw bytes in the store's `actfmt` block;
    this rule re-reads every layer (except those with missing chunks, ACT601) and compares.

    Why: bit rot, a bad copy or an in-place edit changes values without changing shapes.

    Fix: re-copy the store from a good source, or re-run `actfmt convert`.
    """

    code = "ACT602"
    name = "checksum-mismatch"
    deep = True

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:
        block = info["block"] or {}
        recorded = block.get("checksums")
        if not isinstance(recorded, dict):
            return
        for name, got in sorted(ctx.cache.get("checksums", {}).items()):
            want = recorded.get(name)
            if want is None:
                continue
            if isinstance(got, BaseException):
                yield cls.finding(
                    ctx.loc(name), f"{name}: cannot be read to verify its checksum: {got}", want, None
                )
            elif got != want:
                yield cls.finding(
                    ctx.loc(name),
                    f"{name}: checksum of the data is {got}, the conversion recorded {want}",
                    expected=want,
                    actual=got,
                )


class Incomplete(_StoreRule):
    """A converted store is incomplete: its `actfmt` block is missing or not marked `complete: true`.

    `actfmt convert` writes the `actfmt` block (with `complete: true`) last, after every layer; a store
    without it is an interrupted conversion (or was not written by actfmt).

    Why: an interrupted conversion can hold some layers fully, others partly or not at all.

    Fix: re-run `actfmt convert` (with `--resume` to continue the interrupted one).
    """

    code = "ACT603"
    name = "incomplete"

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:
        if ctx.reader is None:
            return
        if info["error"] is not None:
            yield cls.finding(
                ctx.loc(), f"the store cannot be read: {info['error']}", "a readable store", None
            )
            return
        block = info["block"]
        if block is None or block.get("complete") is not True:
            why = "has no actfmt block" if block is None else "is not marked complete"
            yield cls.finding(
                ctx.loc(),
                f"the store {why}: an interrupted conversion? (re-run actfmt convert --resume)",
                expected={"complete": True},
                actual=None if block is None else block.get("complete"),
            )
