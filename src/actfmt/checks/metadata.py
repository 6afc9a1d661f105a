"""ACT2xx: `metadata.json` — parseable, complete, valid, and consistent with where it lives."""

from __future__ import annotations

import json
from collections.abc import Iterable

from actfmt.checks.base import WARNING, Finding
from actfmt.checks.context import SplitContext, SplitRule
from actfmt.formats.registry import split_name
from actfmt.storage import Location

__all__ = [
    "MetadataBadValue",
    "MetadataMissingKey",
    "MetadataMissingProducerKey",
    "MetadataPathMismatch",
    "MetadataUnparseable",
]


class MetadataUnparseable(SplitRule):
    """`metadata.json` is not valid JSON, or not a JSON object.

    Checks that the file decodes as UTF-8 JSON holding one object.

    Why: nothing about the split can be checked without it: the checks that need the metadata are skipped
    (the report lists them), so this one finding stands for the whole split.

    Fix: repair the file (a truncated write often lacks the closing `}`) or re-create it with the
    producer's keys.
    """

    code = "ACT201"
    name = "metadata-unparseable"
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        if ctx.metadata_state == "unparseable":
            yield cls.finding(
                ctx.metadata_location,
                f"metadata.json is unusable: {ctx.metadata_detail}; the checks that need it are skipped",
                expected="a JSON object",
                actual=ctx.metadata_detail,
            )


def _missing_keys(rule: type[SplitRule], ctx: SplitContext, kind: str, what: str) -> Iterable[Finding]:
    """One finding naming every key of ``kind`` that ``metadata.json`` lacks."""
    missing = [p.key for p in ctx.problems if p.kind == kind]
    if missing:
        keys = ", ".join(repr(k) for k in missing)
        yield rule.finding(
            ctx.metadata_location,
            f"{what}{'s' if len(missing) > 1 else ''} {keys} missing from metadata.json",
            expected=missing,
            actual=None,
        )


class MetadataMissingKey(SplitRule):
    """A required key is absent from `metadata.json`.

    Checks that the keys the layout arithmetic needs are present: total_examples, shard_size, batch_size,
    hidden_dim and num_layers (extra keys are fine; the producer's other keys are ACT205).  All missing keys
    of one file are reported in one finding.

    Why: the shard arithmetic needs total_examples, shard_size and batch_size; the shape checks need
    hidden_dim and num_layers.  The checks that need a missing key are skipped.

    Fix: add the key with the value the producer used.
    """

    code = "ACT202"
    name = "metadata-missing-key"
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        yield from _missing_keys(cls, ctx, "missing-key", "required key")


class MetadataMissingProducerKey(SplitRule):
    """A key the producer writes (`model_name`, `dataset_name`, `split`, `load_in_4bit`) is absent.

    Checks that the producer's descriptive keys are present.  Reading, validating and converting never need
    them, so a missing one is a warning: the checks that compare it (ACT204, ACT502) are skipped.

    Why: they say what the activations are (which model, which dataset, which split, whether the model was
    quantised); a split without them is hard to tell apart from its siblings later.

    Fix: add the key with the value the producer used.
    """

    code = "ACT205"
    name = "metadata-missing-producer-key"
    severity = WARNING
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        yield from _missing_keys(cls, ctx, "missing-producer-key", "the producer's key")


class MetadataBadValue(SplitRule):
    """A `metadata.json` value has the wrong type, is null, or is not positive where it must be.

    Checks the types: strings for model_name, dataset_name and split; a boolean for load_in_4bit; positive
    integers for total_examples, shard_size, batch_size, hidden_dim and num_layers.  All bad values of one
    file are reported in one finding.

    Why: the producer writes metadata in a `finally:` block, so a run that crashed before its first batch
    leaves `hidden_dim` and `num_layers` as null; a string `"600"` breaks arithmetic in consumers.
    The checks that need a bad key are skipped.

    Fix: write the right value (or re-run the producer when the run crashed).
    """

    code = "ACT203"
    name = "metadata-bad-value"
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        bad = [p for p in ctx.problems if p.kind == "bad-value"]
        if not bad:
            return
        crashed = {p.key for p in bad if p.actual is None} >= {"hidden_dim", "num_layers"}
        hint = " (the producer crashed before its first batch?)" if crashed else ""
        yield cls.finding(
            ctx.metadata_location,
            "; ".join(p.message for p in bad) + hint,
            expected={p.key: p.expected for p in bad},
            actual={p.key: p.actual for p in bad},
        )


class MetadataPathMismatch(SplitRule):
    """`split`, `dataset_name` or `model_name` disagree with the directory names.

    The seed layout is `Activations/{model_name with / -> _}/{dataset_name}/{split}/`.  Checks the split
    directory's own name against `split` always (a store's `.zarr` / `.h5` suffix removed), and the
    two parent directories against `dataset_name` and `model_name` when they are part of the layout:
    inside the PATH validated, or, above it, when the directory three levels up is named `Activations`.
    Validating a lone split copied elsewhere (`/tmp/x/EM`) therefore compares the split name only.

    Why: a split copied or renamed into the wrong place (EM data under `Neutral/`) poisons every
    comparison made downstream.

    Fix: move the split to where its metadata says it belongs, or correct the metadata.
    """

    code = "ACT204"
    name = "metadata-path-mismatch"
    severity = WARNING
    needs = ("split", "dataset_name", "model_name")
    needs_inventory = False

    @classmethod
    def check(cls, ctx: SplitContext) -> Iterable[Finding]:
        split_dir, root = ctx.path, ctx.root
        dataset_dir, model_dir = split_dir.parent, split_dir.parent.parent
        in_layout = model_dir.parent.name == "Activations"

        def inside(p: Location) -> bool:
            return p != root and p.is_relative_to(root)

        pairs = [("split", split_name(split_dir.name), ctx.good["split"])]
        if inside(split_dir) or in_layout:
            pairs.append(("dataset_name", dataset_dir.name, ctx.good["dataset_name"]))
        if inside(dataset_dir) or in_layout:
            pairs.append(("model_name", model_dir.name, ctx.good["model_name"].replace("/", "_")))
        wrong = [(k, d, m) for k, d, m in pairs if d != m]
        if wrong:
            parts = [
                f"{k} = {json.dumps(ctx.good[k])} but the directory is {d!r}"
                + (f" (expected {m!r})" if k == "model_name" else "")
                for k, d, m in wrong
            ]
            yield cls.finding(
                ctx.metadata_location,
                "; ".join(parts),
                expected={k: m for k, _, m in wrong},
                actual={k: d for k, d, _ in wrong},
            )
