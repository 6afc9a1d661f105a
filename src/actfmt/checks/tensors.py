"""ACT4xx: what the shards hold — 2-D tensors of hidden_dim columns, one supported dtype, no waste; with
`deep`, finite values and no all-zero rows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from actfmt.checks.base import WARNING, Finding
from actfmt.checks.context import ShardEntry, ShardRule, SplitContext, SplitRule
from actfmt.layout import SUPPORTED_DTYPES
from actfmt.moments import RowNorms

__all__ = [
    "BloatedShard",
    "DtypeMixed",
    "DtypeUnsupported",
    "HiddenDim",
    "NonFinite",
    "NormOutlier",
    "NotTwoD",
    "ZeroRows",
    "layer_norms",
]


def _grouped(
    ctx: SplitContext,
    bad: Callable[[ShardEntry], bool],
    considered: Callable[[ShardEntry], bool],
    value: Callable[[ShardEntry], object],
) -> tuple[str, list[tuple[str, list[ShardEntry]]]]:
    """Group offending shards: `("split", ...)` when every considered shard of the split is bad the same
    way, else per layer (`("layer", ...)` entries for whole layers) and per shard."""
    shards = [s for s in ctx.all_shards() if considered(s)]
    wrong = [s for s in shards if bad(s)]
    if not wrong:
        return "none", []
    if len(shards) >= 2 and len(wrong) == len(shards) and len({value(s) for s in wrong}) == 1:
        return "split", [("", wrong)]
    groups: list[tuple[str, list[ShardEntry]]] = []
    for layer in ctx.layers:
        mine = [s for s in layer.shards if considered(s)]
        lw = [s for s in mine if bad(s)]
        if not lw:
            continue
        if len(mine) >= 2 and len(lw) == len(mine) and len({value(s) for s in lw}) == 1:
            groups.append((layer.location, lw))
        else:
            groups.extend((s.location, [s]) for s in lw)
    return "parts", groups


class NotTwoD(ShardRule):
    """A shard is not a 2-D tensor.

    Checks that every shard is `[rows, hidden_dim]`.

    Why: a 1-D or 3-D shard (a missing last-token selection, a kept sequence axis) cannot be concatenated with
    the others.

    Fix: re-create the shard as a 2-D tensor (`t.reshape(-1, hidden_dim)` only if that is what it means).
    """

    code = "ACT401"
    name = "not-2d"

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:
        if s.header is not None and len(s.header.shape) != 2:
            yield cls.finding(
                s.location,
                f"{s.name} holds a {len(s.header.shape)}-D tensor of shape {list(s.header.shape)}; "
                f"expected 2-D [rows, hidden_dim]",
                expected=2,
                actual=len(s.header.shape),
            )


class HiddenDim(SplitRule):
    """A shard's column count differs from `hidden_dim`.

    Reported on `metadata.json` when every shard of the split has the same other width (the metadata is
    wrong), on the layer directory when a whole layer does, else on each shard.

    Why: the wrong width means a different model, a hook on the wrong module, or wrong metadata.

    Fix: correct `hidden_dim` in metadata.json, or re-create the offending shards.
    """

    code = "ACT402"
    name = "hidden-dim"
    needs = ("hidden_dim",)

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        h = ctx.good["hidden_dim"]
        kind, groups = _grouped(ctx, lambda s: s.width != h, lambda s: s.width is not None, lambda s: s.width)
        for loc, shards in groups:
            w = shards[0].width
            if kind == "split":
                yield cls.finding(
                    ctx.metadata_location,
                    f"hidden_dim = {h}, but all {len(shards)} shards have {w} columns",
                    expected=h,
                    actual=w,
                )
            elif len(shards) > 1:
                yield cls.finding(
                    loc, f"all {len(shards)} shards of this layer have {w} columns; hidden_dim = {h}", h, w
                )
            else:
                yield cls.finding(loc, f"{shards[0].path.name} has {w} columns; hidden_dim = {h}", h, w)


class DtypeUnsupported(SplitRule):
    """A shard's dtype is not float16, bfloat16 or float32.

    Reported on the split when every shard has the same unsupported dtype, on the layer directory when a
    whole layer does, else on each shard.

    Why: activations are stored in the model's dtype; float64 doubles the size for nothing, integer or
    quantised tensors are not activations actfmt can convert or compare.

    Fix: re-create the shards in the model's dtype (`t.to(torch.bfloat16)`).
    """

    code = "ACT403"
    name = "dtype-unsupported"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        supported = ", ".join(SUPPORTED_DTYPES)
        kind, groups = _grouped(
            ctx, lambda s: s.dtype not in SUPPORTED_DTYPES, lambda s: s.dtype is not None, lambda s: s.dtype
        )
        for loc, shards in groups:
            dt = shards[0].dtype
            where = (
                f"all {len(shards)} shards are"
                if kind == "split"
                else (f"all {len(shards)} shards of this layer are" if len(shards) > 1 else "the shard is")
            )
            yield cls.finding(
                ctx.loc() if kind == "split" else loc,
                f"{where} {dt}; supported: {supported}",
                expected=list(SUPPORTED_DTYPES),
                actual=dt,
            )


class DtypeMixed(SplitRule):
    """Shards of one split disagree on dtype.

    Checks that every shard of a split (all layers) has the same supported dtype; the odd ones out (against
    the most common dtype) are reported, a whole layer once on its directory.

    Why: a split is read as one array per layer; mixing float16 and bfloat16 silently changes values when
    shards are concatenated (the bits mean different numbers).

    Fix: re-create the odd shards in the split's dtype.
    """

    code = "ACT404"
    name = "dtype-mixed"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        ok = [s for s in ctx.all_shards() if s.dtype in SUPPORTED_DTYPES]
        counts = Counter(s.dtype for s in ok)
        if len(counts) < 2:
            return
        top = max(counts.values())
        majority = next(s.dtype for s in ok if counts[s.dtype] == top)
        _, groups = _grouped(
            ctx, lambda s: s.dtype != majority, lambda s: s.dtype in SUPPORTED_DTYPES, lambda s: s.dtype
        )
        for loc, shards in groups:
            dt = shards[0].dtype
            what = (
                f"all {len(shards)} shards of this layer are"
                if len(shards) > 1
                else f"{shards[0].path.name} is"
            )
            yield cls.finding(
                loc,
                f"{what} {dt}, but the split's other shards are {majority} ({counts[majority]} shards)",
                expected=majority,
                actual=dt,
            )


class BloatedShard(ShardRule):
    """A shard file stores more than its tensor (a saved view); says how many bytes are wasted.

    `torch.save` of a view (`acts[:, -1, :]`, a slice of a bigger buffer) writes the whole underlying
    storage.  Checks that each shard's storage is no larger than its tensor.

    Why: the files can be many times larger than their data, and every reader pays for it.

    Fix: save a compact copy: `torch.save(t.contiguous().clone(), path)`; `actfmt convert` writes
    compact shards.
    """

    code = "ACT405"
    name = "bloated-shard"
    severity = WARNING

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:
        h = s.header
        if h is not None and h.storage_nbytes > h.tensor_nbytes:
            wasted = h.storage_nbytes - h.tensor_nbytes
            yield cls.finding(
                s.location,
                f"{s.name} stores {h.storage_nbytes} bytes of storage for a {h.tensor_nbytes}-byte "
                f"tensor {list(h.shape)}: {wasted} bytes wasted ({h.storage_nbytes / max(h.tensor_nbytes, 1):.1f}x)",
                expected=h.tensor_nbytes,
                actual=h.storage_nbytes,
            )


class NonFinite(ShardRule):
    """A shard holds NaN or Inf values (`--deep`).

    Reads every value and counts NaN and ±Inf.

    Why: one non-finite activation poisons every mean, norm and probe trained on the layer; in float16 it
    usually means an overflow in the model.

    Fix: find the inputs concerned (the message gives the rows), re-run them in bfloat16 or float32, or drop
    them from the dataset consistently across splits.
    """

    code = "ACT406"
    name = "non-finite"
    deep = True

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:
        if s.nonfinite:
            yield cls.finding(
                s.location,
                f"{s.name} holds {s.nan} NaN and {s.inf} Inf values",
                expected=0,
                actual=s.nonfinite,
            )


class ZeroRows(ShardRule):
    """A shard holds all-zero rows (`--deep`).

    Reads every value and lists rows whose values are all zero.

    Why: real activations are never exactly zero across a whole row; zero rows come from a preallocated
    buffer that was never filled (a skipped batch, a hook that did not fire).

    Fix: re-create the shard; check the producer's batching for the rows listed.
    """

    code = "ACT407"
    name = "zero-rows"
    severity = WARNING
    deep = True

    @classmethod
    def check_shard(cls, s: ShardEntry) -> Iterable[Finding]:
        if s.zero_rows:
            shown = ", ".join(str(r) for r in s.zero_rows[:10]) + (" ..." if len(s.zero_rows) > 10 else "")
            yield cls.finding(
                s.location,
                f"{s.name}: {len(s.zero_rows)} all-zero row{'s' if len(s.zero_rows) > 1 else ''} "
                f"(rows {shown} of the shard)",
                expected=0,
                actual=len(s.zero_rows),
            )


#: A layer is flagged when its largest row norm exceeds this many times its mean row norm.
NORM_OUTLIER_RATIO = 100.0


def layer_norms(ctx: SplitContext) -> dict[str, tuple[str, RowNorms, str]]:
    """Per layer (its location): ``(name, row norms, where the largest is)`` measured by the deep pass."""
    out: dict[str, tuple[str, RowNorms, str]] = {}
    if ctx.inventory is not None:
        for layer in ctx.layers:
            shards = [s for s in layer.live_shards() if s.norms is not None]
            if not shards or layer.shadowed:
                continue
            total = RowNorms()
            where = ""
            for s in shards:
                assert s.norms is not None
                if s.norms.max > total.max:
                    where = f"row {s.norms.max_row} of {s.name}"
                total.merge(s.norms)
            out[layer.location] = (layer.name, total, where)
    else:
        for name, norms in sorted(ctx.cache.get("norms", {}).items()):
            out[ctx.loc(name)] = (name, norms, f"row {norms.max_row}")
    return out


class NormOutlier(SplitRule):
    """A layer holds a row whose norm exceeds 100x the layer's mean row norm (`--deep`).

    Measures every row's L2 norm ‖xᵢ‖₂ (rows holding NaN or Inf are left out: ACT406 reports them) and
    compares the largest with the mean.

    Why: a row that large is an overflowing hook (float16 / bfloat16 near its range), an attention-sink token
    taken for the last token, or a padding bug; it dominates every mean, norm and scale factor computed from
    the layer (`actfmt stats`, SAE normalisation).

    Fix: look at the row named in the message; re-extract it (in float32, or with the right token position), or
    drop it from every split consistently.
    """

    code = "ACT408"
    name = "norm-outlier"
    severity = WARNING
    deep = True
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        for location, (name, norms, where) in layer_norms(ctx).items():
            mean = norms.mean
            if norms.rows and mean > 0 and norms.max > NORM_OUTLIER_RATIO * mean:
                yield cls.finding(
                    location,
                    f"{name}: a row norm of {norms.max:.4g} ({where}) is {norms.max / mean:.0f}x the mean row norm "
                    f"{mean:.4g} (threshold {NORM_OUTLIER_RATIO:.0f}x)",
                    expected=f"<= {NORM_OUTLIER_RATIO:.0f} x {mean:.4g}",
                    actual=norms.max,
                )
