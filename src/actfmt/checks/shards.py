"""ACT3xx: the shard arithmetic — count, numbering and rows of every layer, as the producer writes them.

The producer flushes a shard once its buffer holds at least `shard_size` rows, so every full shard holds
`R = ceil(shard_size / batch_size) * batch_size` rows, a layer has `ceil(total_examples / R)` shards and
the last holds the rest.  The analysis is done once per split (cached) and each rule reports its part.

One root cause, one finding:

* when every full shard of every layer holds the same `R'` rows but the metadata gives `R`, the
  metadata's `shard_size` / `batch_size` are wrong: one ACT303 on `metadata.json`, and the rest of the
  analysis uses `R'`;
* when every layer (two or more) is internally consistent with the producer's arithmetic for the same
  `N < total_examples` rows (metadata written after a crash: the producer's `finally:` block records the
  number of inputs): one ACT305 on `metadata.json` instead of a shard-count finding per layer.  More rows
  than announced is not folded this way: stale shards of an earlier run (ACT306) look exactly like that.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from actfmt.checks.base import Finding
from actfmt.checks.context import LayerEntry, ShardEntry, SplitContext, SplitRule
from actfmt.layout import shard_name

__all__ = ["ExtraShard", "LastShardRows", "MissingShard", "ShardCount", "ShardRows", "TotalRows", "analyse"]

_NEEDS = ("total_examples", "shard_size", "batch_size")


def _live(layer: LayerEntry) -> list[ShardEntry]:
    """One shard per index (the correctly named one first)."""
    seen: dict[int, ShardEntry] = {}
    for s in layer.live_shards():
        seen.setdefault(s.index, s)
    return [seen[i] for i in sorted(seen)]


def _names(indices: range) -> str:
    if len(indices) > 4:
        return f"{shard_name(indices[0])} .. {shard_name(indices[-1])} ({len(indices)} files)"
    return ", ".join(shard_name(j) for j in indices)


def analyse(ctx: SplitContext) -> dict[str, list[Finding]]:
    """All ACT3xx findings of a split, by code (computed once)."""
    cached = ctx.cache.get("shards")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    out: dict[str, list[Finding]] = defaultdict(list)
    ctx.cache["shards"] = out
    plan = ctx.plan
    if plan is None:
        return out
    total, full = plan.total, plan.full_rows
    layers = [layer for layer in ctx.live_layers() if layer.list_error is None]
    lives = {layer.index: _live(layer) for layer in layers}

    # 1. the full-shard size the data actually uses
    observed: list[int] = []
    layers_observed = 0
    for layer in layers:
        live = lives[layer.index]
        if len(live) < 2:
            continue
        top = live[-1].index
        rows = [s.rows for s in live if s.index < top and s.rows is not None]
        observed += rows
        layers_observed += bool(rows)
    if observed and len(set(observed)) == 1 and observed[0] != full and layers_observed >= 2:
        actual = observed[0]
        out["ACT303"].append(
            ShardRows.finding(
                ctx.metadata_location,
                f"every full shard holds {actual} rows, but shard_size = {plan.shard_size} and batch_size = "
                f"{plan.batch_size} give {plan.explain_full_rows()}; shard_size or batch_size in metadata.json "
                f"is wrong",
                expected=full,
                actual=actual,
            )
        )
        full = actual

    # 2. every layer consistent with the same number of rows, which is not total_examples
    layer_rows: dict[int, int] = {}
    for layer in layers:
        live = lives[layer.index]
        maybe = [s.rows for s in live]
        if not live or [s.index for s in live] != list(range(len(live))) or None in maybe:
            break
        counts = [r for r in maybe if r is not None]
        if any(r != full for r in counts[:-1]) or not 0 < counts[-1] <= full:
            break
        layer_rows[layer.index] = sum(counts)
    else:
        values = set(layer_rows.values())
        if len(layers) >= 2 and len(values) == 1 and (found := values.pop()) < total:
            k = math.ceil(found / full)
            out["ACT305"].append(
                TotalRows.finding(
                    ctx.metadata_location,
                    f"all {len(layers)} layers hold {found} rows ({k} shards of up to {full}), but total_examples "
                    f"= {total} (metadata written after a crash, or edited?)",
                    expected=total,
                    actual=found,
                )
            )
            return out

    # 3. per layer
    count = math.ceil(total / full)
    last_rows = total - (count - 1) * full
    explain_count = f"{count} shards = ceil({total} / {full})"
    for layer in layers:
        live = lives[layer.index]
        name = layer.canonical
        if not live:
            out["ACT301"].append(
                ShardCount.finding(
                    layer.location,
                    f"{name}: expected {explain_count}, found none",
                    expected=count,
                    actual=0,
                )
            )
            continue
        within = [s for s in live if s.index < count]
        for s in live:
            if s.index >= count:
                out["ACT306"].append(
                    ExtraShard.finding(
                        s.location,
                        f"{name}: {s.path.name} is beyond the expected {explain_count} "
                        f"(shard_000 .. {shard_name(count - 1)}); a stale shard from an earlier run?",
                        expected=f"< {count}",
                        actual=s.index,
                    )
                )
        present = {s.index for s in within}
        top = max(present) if present else -1
        for j in range(top):
            if j not in present:
                out["ACT302"].append(
                    MissingShard.finding(
                        layer.shard_location(j),
                        f"{name}: {shard_name(j)} is missing ({len(present)} of {count} shards present); "
                        f"rows {j * full} .. {min((j + 1) * full, total) - 1} are lost",
                        expected=shard_name(j),
                        actual=None,
                    )
                )
        trailing = range(top + 1, count)  # a range: total_examples may be absurdly large
        if trailing:
            out["ACT301"].append(
                ShardCount.finding(
                    layer.shard_location(trailing[0]),
                    f"{name}: expected {explain_count}, found {len(live)}; missing {_names(trailing)}",
                    expected=count,
                    actual=len(live),
                )
            )
        for s in within:
            if s.rows is None:
                continue
            if s.index < count - 1 and s.rows != full:
                explain = plan.explain_full_rows() if full == plan.full_rows else f"{full}"
                out["ACT303"].append(
                    ShardRows.finding(
                        s.location,
                        f"{name}: {s.path.name} holds {s.rows} rows; a full shard holds {explain}",
                        expected=full,
                        actual=s.rows,
                    )
                )
            elif s.index == count - 1 and s.rows != last_rows:
                out["ACT304"].append(
                    LastShardRows.finding(
                        s.location,
                        f"{name}: the last shard {s.path.name} holds {s.rows} rows; expected "
                        f"{last_rows} = {total} - {count - 1} * {full}",
                        expected=last_rows,
                        actual=s.rows,
                    )
                )
    return out


class _ShardRule(SplitRule):
    needs = _NEEDS

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        return analyse(ctx).get(cls.code, [])


class ShardCount(_ShardRule):
    """The number of shards in a layer differs from `ceil(total_examples / R)`: trailing shards are missing.

    `R` is the full-shard size, `ceil(shard_size / batch_size) * batch_size`.  Reported once per layer,
    on the first missing shard (or on the layer directory when it holds no shard at all); a gap in the middle
    is ACT302 and a shard beyond the count is ACT306.

    Why: the layer is incomplete: its last rows are lost (a failed copy, a deleted file).

    Fix: re-copy or re-create the missing shards.
    """

    code = "ACT301"
    name = "shard-count"


class MissingShard(_ShardRule):
    """A gap in the shard numbering: `shard_005.pt` is missing while later shards exist.

    Checks that shard indices run from `shard_000` without holes up to the last shard present.

    Why: every row after the gap shifts: row `i` of the layer no longer matches input `i`, silently.

    Fix: re-copy or re-create the missing shard.
    """

    code = "ACT302"
    name = "missing-shard"


class ShardRows(_ShardRule):
    """A full (non-last) shard's row count differs from the full-shard size.

    The full-shard size is `shard_size` when `batch_size` divides it, else
    `ceil(shard_size / batch_size) * batch_size` (the producer flushes once the buffer holds at least
    `shard_size` rows).  When every full shard of every layer disagrees with the metadata the same way, one
    finding on `metadata.json` says that shard_size / batch_size are wrong.

    Why: a short shard means lost rows (row `i` no longer matches input `i`).

    Fix: re-create the shard; or correct shard_size / batch_size in metadata.json.
    """

    code = "ACT303"
    name = "shard-rows"


class LastShardRows(_ShardRule):
    """The last shard's row count differs from the remainder `total_examples - (count - 1) * R`.

    Why: the last shard was truncated, or `total_examples` is wrong.

    Fix: re-create the last shard, or correct total_examples.
    """

    code = "ACT304"
    name = "last-shard-rows"


class TotalRows(_ShardRule):
    """The rows in the layers differ from `total_examples`.

    Reported once on `metadata.json` when every layer is internally consistent (contiguous shards of the
    full size, a partial last one) and they all hold the same number of rows, which is not
    `total_examples`: the producer writes metadata in a `finally:` block with total_examples = the number
    of inputs, so a run that crashed midway leaves fewer rows than announced.

    Why: consumers trust total_examples to pair rows with inputs and splits with each other.

    Fix: re-run the producer to completion, or set total_examples to the rows actually present.
    """

    code = "ACT305"
    name = "total-rows"


class ExtraShard(_ShardRule):
    """A shard beyond the expected count (a stale file from an earlier, longer run).

    The producer reuses output directories without clearing them: when a run writes fewer shards than an
    earlier one, the earlier run's higher-numbered shards survive.

    Why: readers that glob the layer read stale rows belonging to other inputs.

    Fix: delete the stale shards (`shard_{count}.pt` and higher).
    """

    code = "ACT306"
    name = "extra-shard"
