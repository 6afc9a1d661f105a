"""The seed layout: the producer's shard arithmetic, exact names and metadata parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actfmt.errors import MetadataError
from actfmt.layout import (
    Metadata,
    ShardPlan,
    expected_shard_rows,
    full_shard_rows,
    layer_index,
    layer_name,
    load_metadata,
    parse_metadata,
    rel,
    shard_index,
    shard_name,
)

GOOD = {
    "model_name": "org/Model-1B",
    "dataset_name": "ds",
    "split": "EM",
    "load_in_4bit": False,
    "total_examples": 600,
    "shard_size": 64,
    "batch_size": 20,
    "hidden_dim": 384,
    "num_layers": 6,
}


@pytest.mark.parametrize(
    ("total", "shard_size", "batch_size", "rows"),
    [
        (7049, 512, 32, [512] * 13 + [393]),  # batch divides the shard size
        (600, 64, 20, [80] * 7 + [40]),  # producer's rounding: ceil(64/20)*20 = 80
        (600, 64, 64, [64] * 9 + [24]),
        (80, 64, 20, [80]),  # exactly one full shard
        (12, 64, 4, [12]),  # one partial shard
        (1, 1, 1, [1]),
        (50, 16, 6, [18, 18, 14]),
        (0, 64, 20, []),
    ],
)
def test_expected_shard_rows(total: int, shard_size: int, batch_size: int, rows: list[int]) -> None:
    assert expected_shard_rows(total, shard_size, batch_size) == rows
    plan = ShardPlan(total, shard_size, batch_size)
    assert plan.rows == rows and plan.count == len(rows)
    assert sum(rows) == total


def test_full_shard_rows_and_explanations() -> None:
    assert full_shard_rows(512, 32) == 512
    assert full_shard_rows(64, 20) == 80
    assert full_shard_rows(64, 7) == 70
    plan = ShardPlan(7049, 512, 32)
    assert plan.explain_count() == "14 = ceil(7049 / 512)"
    assert plan.explain_full_rows() == "512"
    plan = ShardPlan(600, 64, 20)
    assert plan.explain_count() == "8 = ceil(600 / 80)"
    assert plan.explain_full_rows() == "80 = ceil(64 / 20) * 20"


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("layer_00", 0),
        ("layer_03", 3),
        ("layer_27", 27),
        ("layer_100", 100),
        ("layer_3", None),
        ("layer_003", None),
    ],
)
def test_layer_index_exact_names_only(name: str, index: int | None) -> None:
    assert layer_index(name) == index
    if index is not None:
        assert layer_name(index) == name


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("shard_000.pt", 0),
        ("shard_013.pt", 13),
        ("shard_1000.pt", 1000),
        ("shard_1.pt", None),
        ("shard_0001.pt", None),
        ("shard_000.pth", None),
        ("shard_000.pt.tmp", None),
    ],
)
def test_shard_index_exact_names_only(name: str, index: int | None) -> None:
    assert shard_index(name) == index
    if index is not None:
        assert shard_name(index) == name


def test_parse_good_metadata_keeps_extra_keys() -> None:
    meta, problems = parse_metadata({**GOOD, "act_type": "last_token"})
    assert problems == [] and meta is not None
    assert meta.shards.rows == [80] * 7 + [40]
    assert meta.to_dict()["act_type"] == "last_token"


@pytest.mark.parametrize(
    ("data", "kinds", "keys"),
    [
        ([GOOD], ["unparseable"], [None]),
        ("text", ["unparseable"], [None]),
        ({k: v for k, v in GOOD.items() if k != "batch_size"}, ["missing-key"], ["batch_size"]),
        (
            {**GOOD, "hidden_dim": None, "num_layers": None},
            ["bad-value", "bad-value"],
            ["hidden_dim", "num_layers"],
        ),
        ({**GOOD, "total_examples": "600"}, ["bad-value"], ["total_examples"]),
        ({**GOOD, "total_examples": 600.0}, ["bad-value"], ["total_examples"]),
        ({**GOOD, "shard_size": 0}, ["bad-value"], ["shard_size"]),
        ({**GOOD, "batch_size": -20}, ["bad-value"], ["batch_size"]),
        ({**GOOD, "num_layers": True}, ["bad-value"], ["num_layers"]),  # a bool is not an int here
        ({**GOOD, "load_in_4bit": "false"}, ["bad-value"], ["load_in_4bit"]),
        ({**GOOD, "split": "  "}, ["bad-value"], ["split"]),
    ],
)
def test_parse_metadata_problems(data: object, kinds: list[str], keys: list[str | None]) -> None:
    meta, problems = parse_metadata(data)
    assert meta is None
    assert [p.kind for p in problems] == kinds
    assert [p.key for p in problems] == keys
    assert all(p.message for p in problems)


def test_metadata_from_dict_raises_with_every_problem() -> None:
    with pytest.raises(MetadataError, match=r"hidden_dim.*num_layers"):
        Metadata.from_dict({**GOOD, "hidden_dim": None, "num_layers": None})


def test_load_metadata_messages_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match=r"no metadata\.json"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text('{"model_name": ')
    with pytest.raises(MetadataError, match=r"metadata.json: not valid JSON \(line 1"):
        load_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text(json.dumps(GOOD))
    assert load_metadata(tmp_path).num_layers == 6


def test_rel() -> None:
    assert rel("/a/b/c", "/a") == "b/c"
    assert rel("/a", "/a") == "."
