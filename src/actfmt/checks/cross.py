"""ACT5xx: comparisons across layers of one split and across sibling splits of one dataset."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable

from actfmt.checks.base import WARNING, Finding
from actfmt.checks.context import SplitContext, SplitRule, TreeRule

__all__ = ["DuplicateLayer", "IdenticalSplits", "SplitMismatch"]

#: Keys sibling splits (EM / Neutral) of one dataset must agree on.
SIBLING_KEYS = ("total_examples", "hidden_dim", "num_layers", "model_name")


class DuplicateLayer(SplitRule):
    """Two layers hold identical data (`--deep`; a hook bug).

    Hashes every layer's bytes (xxh3, shard by shard) and reports each layer identical to an earlier one, on
    the later layer's directory.

    Why: distinct transformer blocks never produce bit-identical outputs; identical layers mean the hooks
    captured the same module twice (or a layer directory was copied over another).

    Fix: re-run the producer with one hook per block.
    """

    code = "ACT501"
    name = "duplicate-layer"
    deep = True

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        first: dict[str, str] = {}
        for layer in sorted(ctx.layers, key=lambda layer: (layer.index, not layer.exact)):
            got = ctx.layer_digests.get(layer.index)
            if got is None or layer.shadowed:
                continue
            digest = got[1]
            if digest in first:
                yield cls.finding(
                    layer.location,
                    f"{layer.name} holds exactly the same data as {first[digest]} (xxh3 {digest})",
                    expected="distinct data",
                    actual=first[digest],
                )
            else:
                first[digest] = layer.name


class SplitMismatch(TreeRule):
    """Sibling splits of one dataset (EM / Neutral) disagree on total_examples, hidden_dim, num_layers or model.

    Splits in the same dataset directory come from the same prompts: row `i` of EM pairs with row `i` of
    Neutral, so both must have the same number of examples, the same model, layers and width.  The split that
    disagrees with the majority (with two splits: the later one in name order) is reported on its
    `metadata.json`.

    Why: comparisons between splits pair rows by index; a mismatch silently pairs the wrong rows.

    Fix: re-run the shorter split, or move a split produced by another model where it belongs.
    """

    code = "ACT502"
    name = "split-mismatch"
    severity = WARNING

    @classmethod
    def check_tree(cls, contexts: list[SplitContext]) -> Iterable[Finding]:
        families: dict[str, list[SplitContext]] = defaultdict(list)
        for ctx in contexts:
            families[str(ctx.path.parent)].append(ctx)
        for family in families.values():
            if len(family) < 2:
                continue
            family = sorted(family, key=lambda c: c.path.name)
            wrong: dict[str, list[tuple[str, object, object, str]]] = defaultdict(list)
            for key in SIBLING_KEYS:
                have = [c for c in family if key in c.good]
                if len(have) < 2:
                    continue
                counts = Counter(json.dumps(c.good[key]) for c in have)
                top = max(counts.values())
                majority = next(
                    json.dumps(c.good[key]) for c in have if counts[json.dumps(c.good[key])] == top
                )
                ref = next(c for c in have if json.dumps(c.good[key]) == majority)
                for c in have:
                    if json.dumps(c.good[key]) != majority:
                        wrong[c.location].append((key, ref.good[key], c.good[key], ref.path.name))
            for c in family:
                items = wrong.get(c.location)
                if not items:
                    continue
                parts = [f"{k} = {json.dumps(a)} but {other} has {json.dumps(e)}" for k, e, a, other in items]
                yield cls.finding(
                    c.metadata_location,
                    f"{c.path.name}: " + "; ".join(parts),
                    expected={k: e for k, e, _, _ in items},
                    actual={k: a for k, _, a, _ in items},
                )


class IdenticalSplits(TreeRule):
    """Sibling splits of one dataset hold identical data at some layer (`--deep`).

    Compares, layer by layer, the digests the deep pass takes of sibling splits (EM / Neutral of one dataset
    directory); reported once per pair of splits, on the later split in name order, naming the layers.

    Why: two runs over different prompts never produce bit-identical activations; identical splits mean a
    pipeline wrote one run twice under two labels, and every EM-vs-Neutral comparison of those layers is void.

    Fix: re-extract the mislabelled split from its own prompts.
    """

    code = "ACT503"
    name = "identical-splits"
    deep = True

    @classmethod
    def check_tree(cls, contexts: list[SplitContext]) -> Iterable[Finding]:
        families: dict[str, list[SplitContext]] = defaultdict(list)
        for ctx in contexts:
            if ctx.deep or ctx.cache.get("checksums"):
                families[str(ctx.path.parent)].append(ctx)
        for family in families.values():
            family = sorted(family, key=lambda c: c.path.name)
            digests = [c.layer_digests for c in family]
            for j, later in enumerate(family):
                for i in range(j):
                    same = sorted(k for k, d in digests[j].items() if k in digests[i] and digests[i][k] == d)
                    if not same:
                        continue
                    names = [f"layer_{k:02d}" for k in same]
                    every = len(same) == len(digests[j]) and len(same) > 1
                    shown = (
                        f"every layer ({len(same)})"
                        if every
                        else ", ".join(names[:8]) + (f" ... ({len(same)} layers)" if len(same) > 8 else "")
                    )
                    yield cls.finding(
                        later.loc(),
                        f"{later.path.name} holds exactly the same data as {family[i].path.name} at {shown}",
                        expected="different data",
                        actual=names,
                    )
