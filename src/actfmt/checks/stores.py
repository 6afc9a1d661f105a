"""ACT6xx: converted stores (``.zarr``, ``.h5``, safetensors directories) — complete, every chunk present, and
(with ``deep``) the data still matching the checksums recorded at conversion.

The scan opens each store's Reader once (:func:`actfmt.checks.context.scan_split`); the deep pass
(:func:`actfmt.checks.context.deep_read`) reads each layer once: it hashes it the way ``actfmt convert`` did, measures its row norms
and recomputes the statistics the store keeps.  The metadata and layer-layout
rules (ACT2xx, ACT102, ACT103, ACT502) also apply to stores; shard rules do not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from actfmt.checks.base import Finding
from actfmt.checks.context import SplitContext, SplitRule, store_info
from actfmt.errors import BadHeaderError, ExternalDataError
from actfmt.formats import get_format
from actfmt.moments import LAYER_FIELDS, Moments

__all__ = [
    "BadStoreHeader",
    "ChecksumMismatch",
    "Incomplete",
    "MissingChunk",
    "StatsMismatch",
    "StoreShapeMismatch",
    "refusal",
    "store_info",
    "store_units",
]


def refusal(ctx: SplitContext, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The error of one of ``kinds`` that opening the store or reading its layers raised, if any: a header
    refused by the format (ACT606) or data outside the store (ACT007), reported by its own rule."""
    for exc in (ctx.reader_error, store_info(ctx)["error"]):
        if isinstance(exc, kinds):
            return exc
    return None


def refusal_message(ctx: SplitContext, exc: BaseException) -> str:
    """The refusal's message with the store's own path left out (the finding's location names it)."""
    msg = str(exc)
    for prefix in (f"{ctx.path}: ", f"{ctx.path}/"):
        msg = msg.replace(prefix, "")
    return msg


#: What a store's header refusals are reported by (ACT606, ACT007) instead of ACT001 / ACT603.
REFUSED = (BadHeaderError, ExternalDataError)


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


class _StoreRule(SplitRule):
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.inventory is not None:
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
            total = getattr(missing, "total", len(missing))
            shown = ", ".join(missing[:5]) + (f" ... ({total} in all)" if total > 5 else "")
            yield cls.finding(
                ctx.loc(name),
                f"{name}: {total} chunk{'s' if total > 1 else ''} missing: {shown}",
                expected=0,
                actual=total,
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
        if isinstance(info["error"], REFUSED):
            return  # ACT606 / ACT007 say why
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


#: Relative tolerance between the figures a store keeps and the same figures computed again: both are float64
#: sums of the same exact values, in blocks of another size (rounding differs by ~1e-15).
STATS_RTOL = 1e-9


def _differs(kept: Any, got: Any, rtol: float) -> bool:
    if kept is None or got is None:
        return kept is not got
    if isinstance(got, int) and not isinstance(got, bool):
        return bool(kept != got)
    try:
        k, g = float(kept), float(got)
    except (TypeError, ValueError):
        return True
    if k != k or g != g:
        return (k != k) != (g != g)
    return abs(k - g) > rtol * max(abs(k), abs(g), 1e-300)


class StatsMismatch(_StoreRule):
    """The statistics a store keeps disagree with its data (`--deep`).

    `actfmt convert` records each layer's figures (`actfmt stats`) in the store's `actfmt` block and its
    mean and std vectors beside the data; this rule computes them again from the values and compares (figures
    within 1e-9 relative, float32 vectors within 1e-6).  A layer whose data no longer matches its checksum is
    left to ACT602.

    Why: the values are right (ACT602 checks them) but what `actfmt stats`, `split.layer(i).mean()` and
    `ActivationDataset(normalize=...)` read is not: an edited block, or vectors copied from another store.

    Fix: convert the split again (or `actfmt stats --recompute` to ignore what is kept).
    """

    code = "ACT604"
    name = "stats-mismatch"
    deep = True

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:
        import numpy as np

        kept = (info["block"] or {}).get("stats")
        computed: dict[str, Moments] = ctx.cache.get("moments", {})
        if not isinstance(kept, dict) or not computed:
            return
        found = kept.get("layers")
        layers: dict[str, Any] = found if isinstance(found, dict) else {}
        vectors = None
        if ctx.reader is not None:
            try:
                vectors = ctx.reader.stored_vectors()
            except Exception:  # unreadable vectors: reported below as missing
                vectors = None
        recorded = (info["block"] or {}).get("checksums") or {}
        sums = ctx.cache.get("checksums", {})
        for name, m in sorted(computed.items()):
            if isinstance(recorded, dict) and recorded.get(name) not in (None, sums.get(name)):
                continue  # the data changed: ACT602 says so, and the kept figures are no longer expected to fit
            got = m.summary()
            figures = layers.get(name)
            if not isinstance(figures, dict):
                yield cls.finding(
                    ctx.loc(name), f"{name}: the store keeps no figures for it", "figures", None
                )
                continue
            wrong = [k for k in LAYER_FIELDS if _differs(figures.get(k), got[k], STATS_RTOL)]
            if wrong:
                k = wrong[0]
                yield cls.finding(
                    ctx.loc(name),
                    f"{name}: the kept {k} is {figures.get(k)!r}, the data gives {got[k]!r}"
                    + (
                        f" (and {len(wrong) - 1} more figure{'s' if len(wrong) > 2 else ''})"
                        if len(wrong) > 1
                        else ""
                    ),
                    expected=got[k],
                    actual=figures.get(k),
                )
                continue
            if vectors is None:
                yield cls.finding(
                    ctx.loc(name),
                    f"{name}: the store keeps figures but no mean / std vectors",
                    "vectors",
                    None,
                )
                continue
            want = {"mean": m.mean, "std": np.sqrt(m.variance), "mean_f64": m.mean}
            for vec, ref in want.items():
                row = vectors.row(vec, name)
                if row is None:
                    continue
                tol = 1e-12 if vec == "mean_f64" else 1e-6
                ref32 = np.asarray(ref, dtype=row.dtype)
                if row.shape != ref32.shape or not np.allclose(
                    row, ref32, rtol=tol, atol=tol * float(np.abs(ref).max() or 1)
                ):
                    bad = int(np.argmax(np.abs(row - ref32))) if row.shape == ref32.shape else -1
                    yield cls.finding(
                        ctx.loc(name),
                        f"{name}: the kept {vec} vector differs from the data's"
                        + (
                            f" (dimension {bad}: {float(row[bad]):.6g} vs {float(ref32[bad]):.6g})"
                            if bad >= 0
                            else ""
                        ),
                        expected="the data's",
                        actual=vec,
                    )
                    break


class StoreShapeMismatch(_StoreRule):
    """A converted store's layers disagree with its own metadata (rows, hidden_dim, dtype).

    Checks every layer of a `.zarr`, `.h5` or safetensors store against the metadata it carries: rows equal to
    `total_examples`, width equal to `hidden_dim`, one dtype for all layers (and the metadata's `dtype` when
    it records one).  The layer count is ACT102 / ACT103's.

    Why: such a store reads without error but converts into a tree that fails ACT305 / ACT402, and a training
    job reading it gets the wrong number of examples or dimensions.

    Fix: re-convert the store from its source; if the metadata was edited by hand, restore it.
    """

    code = "ACT605"
    name = "store-shape-mismatch"

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:
        if info["error"] is not None:
            return
        layers = info["layers"]
        total, hidden = ctx.good.get("total_examples"), ctx.good.get("hidden_dim")
        declared = (ctx.metadata_raw or {}).get("dtype") if isinstance(ctx.metadata_raw, dict) else None
        declared = declared.removeprefix("torch.") if isinstance(declared, str) else None
        first_dtype = layers[0].dtype if layers else None
        for layer in layers:
            if total is not None and layer.rows != total:
                yield cls.finding(
                    ctx.loc(layer.name),
                    f"{layer.name}: holds {layer.rows} rows, the metadata says total_examples = {total}",
                    expected=total,
                    actual=layer.rows,
                )
            if hidden is not None and layer.hidden_dim != hidden:
                yield cls.finding(
                    ctx.loc(layer.name),
                    f"{layer.name}: {layer.hidden_dim} values per row, the metadata says hidden_dim = {hidden}",
                    expected=hidden,
                    actual=layer.hidden_dim,
                )
            want = declared or first_dtype
            if want is not None and layer.dtype != want:
                yield cls.finding(
                    ctx.loc(layer.name),
                    f"{layer.name}: stored as {layer.dtype}, "
                    + (
                        f"the metadata says dtype = {declared}" if declared else f"{layers[0].name} as {want}"
                    ),
                    expected=want,
                    actual=layer.dtype,
                )


class BadStoreHeader(_StoreRule):
    """A converted store's header declares sizes or structures actfmt refuses to act on.

    Checks, before anything is allocated, looped over or read, every size and structure a `.zarr`, `.h5` or
    safetensors header declares: 2-D shapes of non-negative rows and a positive width, positive chunk shapes,
    at most 2**20 chunks per layer of at most 256 MiB each, raw data that fits in the file, a known chunk key
    encoding and codecs that run nothing from the file (no pickle or object codecs), shard-row lists
    (`actfmt_shard_rows`) of non-negative counts summing to the rows, and safetensors headers as strict as the
    `safetensors` library.

    Why: a few bytes of crafted header (a shape of `[10**12, 8]`, a chunk of `[2**40, 8]`, a million shard
    rows) would otherwise make a header-only `validate` allocate gigabytes or loop for minutes, and a pickle
    codec runs code from the file.

    Fix: re-convert the store from its source with `actfmt convert`; do not trust the file.
    """

    code = "ACT606"
    name = "bad-store-header"

    @classmethod
    def check_store(cls, ctx: SplitContext, info: dict[str, Any]) -> Iterable[Finding]:
        exc = refusal(ctx, (BadHeaderError,))
        if exc is not None:
            yield cls.finding(ctx.loc(), refusal_message(ctx, exc), "a header within bounds", None)
