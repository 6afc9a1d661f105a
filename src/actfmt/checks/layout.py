"""ACT1xx: the split's directory layout (metadata.json, layer_XX/, shard_XXX.pt, nothing else)."""

from __future__ import annotations

from collections.abc import Iterable

from actfmt.checks.base import WARNING, Finding
from actfmt.checks.context import LayerEntry, ShardEntry, SplitContext, SplitRule
from actfmt.layout import layer_name, shard_name

__all__ = ["BadName", "ExtraLayer", "MissingLayer", "MissingMetadata", "StrayFile"]

#: Beyond this many missing layers, ACT102 reports one finding on metadata.json (num_layers is wrong).
MAX_MISSING_LAYERS = 64


class MissingMetadata(SplitRule):
    """A split directory has no `metadata.json`.

    Checks that every directory holding `layer_XX` directories also holds `metadata.json`.

    Why: without it the number of rows, layers and the shard arithmetic are unknown; the checks that need
    it are skipped (and the report says which).

    Fix: restore `metadata.json` (the producer writes it at the end of a run, even after a crash), or
    write it by hand with the producer's keys: model_name, dataset_name, split, load_in_4bit,
    total_examples, shard_size, batch_size, hidden_dim, num_layers.
    """

    code = "ACT101"
    name = "missing-metadata"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.metadata_state == "missing":
            yield cls.finding(
                ctx.metadata_location,
                f"split {ctx.path.name!r} has {len(ctx.layers)} layer directories but no metadata.json; "
                f"the checks that need it are skipped",
                expected="metadata.json",
                actual=None,
            )


class _LayerCountRule(SplitRule):
    """Rules about the layer directories against ``num_layers`` (stores included)."""

    needs = ("num_layers",)
    needs_inventory = False

    @classmethod
    def applies(cls, ctx: SplitContext) -> bool:
        """Not on a store whose layers cannot be read (the store rules report why, once)."""
        return "layers_error" not in ctx.cache


class MissingLayer(_LayerCountRule):
    """Layer directories are not contiguous from `layer_00` to `num_layers - 1`.

    Checks that `layer_00` ... `layer_{num_layers-1}` all exist as directories (a badly spelled name such
    as `layer_3` is reported once, as ACT104, not also as missing).

    Why: a missing layer is usually a failed copy or a hook that never fired; every consumer assumes all
    layers are there.

    Fix: re-copy or re-create the missing layer, or correct `num_layers` if the metadata is wrong.
    """

    code = "ACT102"
    name = "missing-layer"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if not cls.applies(ctx):
            return
        n = ctx.good["num_layers"]
        dirs = {layer.index for layer in ctx.layers if layer.is_dir}
        files = {layer.index: layer for layer in ctx.layers if not layer.is_dir}
        present = sorted(dirs)
        missing = n - len([i for i in dirs if i < n])
        if missing > MAX_MISSING_LAYERS:  # the metadata is wrong, not dozens of layers lost: one finding
            yield cls.finding(
                ctx.metadata_location,
                f"num_layers = {n}, but only {len(present)} layer directories exist ({missing} missing); "
                f"is num_layers wrong?",
                expected=n,
                actual=len(present),
            )
            return
        for i in range(n):
            if i in dirs:
                continue
            if i in files:
                yield cls.finding(
                    files[i].location,
                    f"{layer_name(i)} is a file, not a directory (num_layers = {n})",
                    expected="directory",
                    actual="file",
                )
                continue
            yield cls.finding(
                ctx.loc(layer_name(i)),
                f"{layer_name(i)} is missing: num_layers = {n} needs layer_00 .. {layer_name(n - 1)}; "
                f"found {len(present)} layer directories",
                expected=layer_name(i),
                actual=None,
            )


class ExtraLayer(_LayerCountRule):
    """A layer directory's index is `num_layers` or more.

    Checks that no `layer_XX` directory has an index beyond `num_layers - 1`.

    Why: extra layers come from an earlier run of a bigger model into the same directory, or from wrong
    metadata; consumers that trust `num_layers` silently ignore them, others break.

    Fix: remove the stale layer directories, or correct `num_layers`.
    """

    code = "ACT103"
    name = "extra-layer"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if not cls.applies(ctx):
            return
        n = ctx.good["num_layers"]
        for layer in ctx.layers:
            if layer.is_dir and layer.index >= n and not layer.shadowed:
                yield cls.finding(
                    layer.location,
                    f"{layer.name} is beyond num_layers = {n} (layers are layer_00 .. {layer_name(n - 1)})",
                    expected=f"< {n}",
                    actual=layer.index,
                )


class BadName(SplitRule):
    """A layer or shard name is off the pattern (`layer_3`, `shard_1.pt`, `shard_000.pth`).

    Checks that layer directories are named `layer_XX` (two digits or more, as `f"layer_{i:02d}"`) and
    shards `shard_XXX.pt` (three digits or more, as `f"shard_{i:03d}.pt"`).

    Why: readers find layers and shards by their exact names and sort them as strings; `shard_10.pt`
    sorts before `shard_2.pt`.  A badly named entry still counts for its index in the other checks, so
    one misnamed file gives one finding.

    Fix: rename the entry to the pattern (`mv layer_3 layer_03`).
    """

    code = "ACT104"
    name = "bad-name"

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        named: list[tuple[str, LayerEntry | ShardEntry, str]] = [
            ("layer directory", layer, layer_name(layer.index)) for layer in ctx.layers
        ]
        named += [("shard file", s, shard_name(s.index)) for layer in ctx.layers for s in layer.shards]
        for what, entry, canonical in sorted(named, key=lambda t: t[1].location):
            if not entry.exact:
                extra = f" (and {canonical} exists too)" if entry.shadowed else ""
                yield cls.finding(
                    entry.location,
                    f"{what} {entry.name!r} should be named {canonical!r}{extra}",
                    expected=canonical,
                    actual=entry.name,
                )


class StrayFile(SplitRule):
    """An unexpected file or directory inside a split.

    Checks that a split holds only `metadata.json` and `layer_XX/` directories, and that a layer
    directory holds only `shard_XXX.pt` files.

    Why: leftovers (`.tmp` files of an interrupted write, notes, a nested copy) confuse tools that glob
    the tree and may hide an incomplete write.

    Fix: move the entry out of the split, or delete it.
    """

    code = "ACT105"
    name = "stray-file"
    severity = WARNING

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        for loc, is_dir in ctx.strays:
            kind = "directory" if is_dir else "file"
            yield cls.finding(
                loc, f"unexpected {kind} in a split (expected metadata.json and layer_XX/ only)"
            )
        for layer in ctx.layers:
            for loc, is_dir in layer.strays:
                kind = "directory" if is_dir else "file"
                yield cls.finding(
                    loc, f"unexpected {kind} in {layer.name}/ (expected shard_XXX.pt files only)"
                )
