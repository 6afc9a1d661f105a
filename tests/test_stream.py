"""actfmt.streaming: the permutation, determinism, resume and rank invariants, labels, pairs, dtypes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actfmt
from actfmt.conversion import convert as actfmt_convert
from actfmt.errors import ActfmtError
from actfmt.formats import find_splits
from actfmt.streaming import Stream, StreamError, mixing, stream
from actfmt.torch import ActivationDataset

from ._trees import bits, make_tree

TOTAL, HIDDEN, LAYERS = 203, 16, 3
BASE = "org_Tiny-Model/SP_test"


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same two splits (EM, Neutral) in every format, with the reference tensors."""
    root = tmp_path_factory.mktemp("stream")
    ref = make_tree(root / "pt", total=TOTAL, hidden=HIDDEN, layers=LAYERS, shard_size=64, batch_size=20)
    out: dict[str, Any] = {"ref": ref, "root": root}
    for label, fmt, comp, chunk in (
        ("zarr", "zarr", None, 32),  # the default codec, chunks of 32 rows (not a multiple of the shards)
        ("zarr-raw", "zarr", "none", 48),
        ("hdf5", "hdf5", None, 40),
        ("safetensors", "safetensors", None, None),
        ("npy", "npy", None, None),
    ):
        actfmt_convert(root / "pt", root / label, to=fmt, compression=comp, chunk_rows=chunk)
    for label in ("pt", "zarr", "zarr-raw", "hdf5", "safetensors", "npy"):
        found = {Path(str(loc)).name.split(".")[0]: str(loc) for loc, _ in find_splits(root / label)}
        out[label] = [found["EM"], found["Neutral"]]
    return out


def rows_of(trees: dict[str, Any], split: int, layer: int) -> torch.Tensor:
    return trees["ref"][f"{BASE}/{('EM', 'Neutral')[split]}"][f"layer_{layer:02d}"]


def collect(s: Stream) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in b.items()} for b in s]


def keys(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """``label * 1e6 + index`` of every row, in stream order."""
    if not batches:
        return np.zeros(0, np.int64)
    lab = [b.get("label", torch.zeros_like(b["index"])) for b in batches]
    return (torch.cat(lab) * 1_000_000 + torch.cat([b["index"] for b in batches])).numpy()


def check_rows(trees: dict[str, Any], batches: list[dict[str, torch.Tensor]], layer: int) -> None:
    for b in batches:
        for k in (0, 1):
            m = b["label"] == k
            assert torch.equal(bits(b["x"][m]), bits(rows_of(trees, k, layer)[b["index"][m]]))


# -- the permutation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize(("block_rows", "buffer_rows"), [(16, 16), (16, 80), (24, 10_000), (None, None)])
def test_every_row_once_per_epoch_over_ranks(
    trees: dict[str, Any], world: int, block_rows: int | None, buffer_rows: int | None
) -> None:
    got = []
    for rank in range(world):
        s = Stream(
            trees["pt"], 1, 13, block_rows=block_rows, buffer_rows=buffer_rows, rank=rank, world_size=world
        )
        batches = collect(s)
        assert len(batches) == len(s)
        assert all(len(b["index"]) == 13 for b in batches[:-1])
        check_rows(trees, batches, 1)
        got.append(keys(batches))
    allk = np.concatenate(got)
    assert allk.size == 2 * TOTAL and np.unique(allk).size == 2 * TOTAL  # disjoint, every row once
    assert set(allk.tolist()) == {k * 1_000_000 + i for k in (0, 1) for i in range(TOTAL)}


def test_a_block_still_being_read_is_not_given_away(
    trees: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 2 of 3 never needs block 0, so block 0 is free at once; while one loader is still reading it, the
    other must not read the next block into the same ring slot (the slow read used to land on top of it)."""
    import actfmt.streaming.ring as module

    real = module._Run._read_block
    lock, reading, clashes = threading.Lock(), set(), []

    def slow_first(self: Any, readers: Any, positions: Any, j: int, ring: int) -> None:
        with lock:
            if ring in reading:
                clashes.append(j)
            reading.add(ring)
        try:
            if j == 0:
                time.sleep(0.3)
            real(self, readers, positions, j, ring)
        finally:
            with lock:
                reading.discard(ring)

    monkeypatch.setattr(module._Run, "_read_block", slow_first)
    s = Stream(trees["pt"], 1, 13, block_rows=16, buffer_rows=16, rank=2, world_size=3)
    check_rows(trees, collect(s), 1)
    assert clashes == []  # two reads into one ring slot at once


def test_drop_last_keeps_whole_steps_only(trees: dict[str, Any]) -> None:
    world, batch = 3, 7
    per_rank = [
        collect(Stream(trees["pt"], 0, batch, rank=r, world_size=world, drop_last=True, block_rows=16))
        for r in range(world)
    ]
    assert {len(b) for b in per_rank} == {2 * TOTAL // (batch * world)}
    assert all(len(b["index"]) == batch for bs in per_rank for b in bs)
    allk = np.concatenate([keys(bs) for bs in per_rank])
    assert np.unique(allk).size == allk.size == 2 * TOTAL // 21 * 21


def test_global_order_does_not_depend_on_world_size(trees: dict[str, Any]) -> None:
    one = keys(collect(Stream(trees["pt"], 2, 30, block_rows=16, buffer_rows=48)))
    ranks = [
        collect(Stream(trees["pt"], 2, 10, block_rows=16, buffer_rows=48, rank=r, world_size=3))
        for r in range(3)
    ]
    steps = max(len(r) for r in ranks)
    interleaved = np.concatenate([keys([r[k]]) for k in range(steps) for r in ranks if k < len(r)])
    assert np.array_equal(one, interleaved)


def test_deterministic_for_a_seed_and_new_each_epoch(trees: dict[str, Any]) -> None:
    a = Stream(trees["pt"], 0, 50, seed=3, block_rows=16, buffer_rows=64)
    e0, e1 = keys(collect(a)), keys(collect(a))  # the second pass is epoch 1
    b = Stream(trees["pt"], 0, 50, seed=3, block_rows=16, buffer_rows=64)
    assert np.array_equal(e0, keys(collect(b)))
    assert np.array_equal(e1, keys(collect(b)))
    assert not np.array_equal(e0, e1) and np.array_equal(np.sort(e0), np.sort(e1))
    c = Stream(trees["pt"], 0, 50, seed=4, block_rows=16, buffer_rows=64)
    assert not np.array_equal(e0, keys(collect(c)))
    # the order is the documented pure function
    split, rows = a.order(0)
    assert np.array_equal(split * 1_000_000 + rows, e0)


def test_no_shuffle_is_storage_order(trees: dict[str, Any]) -> None:
    got = keys(collect(Stream(trees["pt"], 0, 64, shuffle=False)))
    assert np.array_equal(got, np.r_[np.arange(TOTAL), 1_000_000 + np.arange(TOTAL)])


def test_mixing_figures(trees: dict[str, Any]) -> None:
    ordered = Stream(trees["pt"], 0, 32, shuffle=False, block_rows=16)
    full = Stream(trees["pt"], 0, 32, block_rows=16, buffer_rows=10_000)
    small = Stream(trees["pt"], 0, 32, block_rows=16, buffer_rows=16)
    fig = {}
    for name, s in (("ordered", ordered), ("full", full), ("small", small)):
        split, rows = s.order(0)
        fig[name] = mixing(split, rows, 16, 32, [0, TOTAL])
    assert fig["ordered"]["corr"] > 0.99 and fig["full"]["corr"] < 0.2
    assert fig["full"]["same_block"] < 2 < fig["small"]["same_block"] < fig["ordered"]["same_block"]


# -- resume -------------------------------------------------------------------------------------------------

RESUME = r"""
import json, sys, torch
from actfmt.streaming import Stream
cases = json.loads(sys.argv[1])
out = {}
for name, c in cases.items():
    streams = [Stream(c["paths"], c["layers"], c["batch"], seed=5, block_rows=c["block_rows"],
                      buffer_rows=c["buffer_rows"], rank=r, world_size=c["world"]) for r in range(c["world"])]
    for s in streams:
        s.load_state_dict(c["state"])
    per = [[{k: v.clone() for k, v in b.items()} for b in s] for s in streams]
    steps = max(len(p) for p in per)
    seq = [p[k] for k in range(steps) for p in per if k < len(p)]
    out[name] = {"batches": seq, "first_block": streams[0].counters.first_block,
                 "rows_read": streams[0].counters.rows_read}
torch.save(out, sys.argv[2])
"""


def _bits_of(batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    return [(bits(b["x"]), b["index"], b.get("label", torch.zeros(0))) for b in batches]


def test_resume_in_a_fresh_process_is_bit_for_bit(trees: dict[str, Any], tmp_path: Path) -> None:
    """Every format, and a world size changed between save and restore: the restored tail equals the
    uninterrupted run's, and the restored stream reads neither from the start of the epoch nor every block."""
    cases: dict[str, Any] = {}
    expect: dict[str, list[dict[str, torch.Tensor]]] = {}
    for fmt in ("pt", "zarr", "zarr-raw", "hdf5", "safetensors", "npy"):
        common = {"paths": trees[fmt], "layers": [0, 2], "batch": 11, "block_rows": 16, "buffer_rows": 64}
        s = Stream(common["paths"], common["layers"], 11, seed=5, block_rows=16, buffer_rows=64)
        it = iter(s)
        [next(it) for _ in range(23)]
        state = s.state_dict()
        it.close()
        json.dumps(state)  # plain data
        full = collect(Stream(common["paths"], common["layers"], 11, seed=5, block_rows=16, buffer_rows=64))
        expect[fmt] = full[23:]
        cases[fmt] = {**common, "state": state, "world": 1}
    # saved by 2 ranks after 9 steps (batch 7 each), restored on 3 ranks: the same global sequence
    s2 = [
        Stream(trees["pt"], 1, 7, seed=5, block_rows=16, buffer_rows=64, rank=r, world_size=2)
        for r in range(2)
    ]
    states = []
    for s in s2:
        it = iter(s)
        [next(it) for _ in range(9)]
        states.append(s.state_dict())
        it.close()
    assert states[0] == states[1] and states[0]["position"] == 9 * 14
    one = collect(Stream(trees["pt"], 1, 1, seed=5, block_rows=16, buffer_rows=64))
    expect["world 2->3"] = one[9 * 14 :]
    cases["world 2->3"] = {
        "paths": trees["pt"],
        "layers": 1,
        "batch": 7,
        "block_rows": 16,
        "buffer_rows": 64,
        "state": states[0],
        "world": 3,
    }
    out = tmp_path / "tail.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(actfmt.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", RESUME, json.dumps(cases), str(out)], check=True, env=env)
    got = torch.load(out)
    for name, want in expect.items():
        tail = got[name]["batches"]
        if name == "world 2->3":  # compare row by row: the batches are cut differently
            cat = {k: torch.cat([b[k] for b in tail]) for k in ("x", "index", "label")}
            ref = {k: torch.cat([b[k] for b in want]) for k in ("x", "index", "label")}
            assert all(
                torch.equal(bits(cat[k]) if k == "x" else cat[k], bits(ref[k]) if k == "x" else ref[k])
                for k in cat
            ), name
        else:
            assert len(tail) == len(want), name
            for a, b in zip(_bits_of(tail), _bits_of(want), strict=True):
                assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), name
        assert got[name]["first_block"] > 0, name  # did not start from the epoch's first block
        assert got[name]["rows_read"] < 2 * TOTAL, name


def test_state_of_another_order_is_refused(trees: dict[str, Any]) -> None:
    s = Stream(trees["pt"], 0, 10, seed=1, block_rows=16)
    state = s.state_dict()
    with pytest.raises(StreamError, match="another order"):
        Stream(trees["pt"], 0, 10, seed=2, block_rows=16).load_state_dict(state)
    with pytest.raises(StreamError, match="another order"):
        Stream(trees["pt"], 0, 10, seed=1, block_rows=32).load_state_dict(state)


def test_state_after_the_last_batch_starts_the_next_epoch(trees: dict[str, Any]) -> None:
    s = Stream(trees["pt"], 0, 100, block_rows=16)
    it = iter(s)
    for _ in range(len(s)):
        next(it)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 0


# -- what a batch holds -------------------------------------------------------------------------------------


def test_several_layers_bf16_kept_and_labels(trees: dict[str, Any]) -> None:
    s = Stream(trees["zarr"], [2, 0], 17, block_rows=32)
    assert s.splits == ["EM.zarr", "Neutral.zarr"]
    for b in s:
        assert b["x"].dtype == torch.bfloat16 and b["x"].shape[1:] == (2, HIDDEN)
        assert b["index"].dtype == torch.int64 and b["label"].dtype == torch.int64
        for k in (0, 1):
            m = b["label"] == k
            for li, layer in enumerate((2, 0)):
                assert torch.equal(bits(b["x"][m, li]), bits(rows_of(trees, k, layer)[b["index"][m]]))


def test_one_split_has_no_label(trees: dict[str, Any]) -> None:
    b = next(iter(Stream(trees["safetensors"][:1], 1, 8)))
    assert set(b) == {"x", "index"} and b["x"].shape == (8, HIDDEN)


@pytest.mark.parametrize("layers", [1, [0, 1]])
def test_paired_rows_come_together(trees: dict[str, Any], layers: Any) -> None:
    s = Stream(trees["hdf5"], layers, 19, paired=True, block_rows=40)
    n = 0
    for b in s:
        assert "label" not in b
        x = b["x"] if isinstance(layers, list) else b["x"].unsqueeze(2)
        assert x.shape[1:] == (2, len(x[0, 0]), HIDDEN)
        for k in (0, 1):
            for li, layer in enumerate([layers] if isinstance(layers, int) else layers):
                assert torch.equal(bits(x[:, k, li]), bits(rows_of(trees, k, layer)[b["index"]]))
        n += len(b["index"])
    assert n == TOTAL


@pytest.mark.parametrize("normalize", ["scale", "standardize"])
def test_normalization_equals_activation_dataset(trees: dict[str, Any], normalize: str) -> None:
    s = Stream(trees["zarr"], 1, 50, normalize=normalize)
    ds = ActivationDataset(trees["zarr"], layer=1, normalize=normalize)
    for b in s:
        assert b["x"].dtype == torch.float32
        want = torch.stack([x for x, _ in ds.__getitems__((b["label"] * TOTAL + b["index"]).tolist())])
        assert torch.equal(b["x"], want)


def test_dtype_casts(trees: dict[str, Any]) -> None:
    b = next(iter(Stream(trees["pt"], 1, 20, dtype=torch.float32)))
    assert b["x"].dtype == torch.float32
    for k in (0, 1):
        m = b["label"] == k
        assert torch.equal(b["x"][m], rows_of(trees, k, 1)[b["index"][m]].float())


def test_batches_kept_by_the_caller_are_not_overwritten(trees: dict[str, Any]) -> None:
    kept = list(Stream(trees["pt"], 0, 9, block_rows=16, buffer_rows=32))
    check_rows(trees, kept, 0)


# -- errors ---------------------------------------------------------------------------------------------------


def test_damaged_chunk_names_the_layer_and_rows(trees: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "EM.zarr"
    shutil.copytree(trees["zarr"][0], store)
    chunk = next(p for p in sorted((store / "layer_01").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage" * 10)
    s = Stream([store], 1, 16)
    with pytest.raises(ActfmtError, match=r"layer_01: rows \d+-\d+ cannot be read"):
        list(s)


def test_unknown_layer_and_mismatched_pairs(trees: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(StreamError, match="no layer 9"):
        Stream(trees["pt"], 9)
    with pytest.raises(StreamError, match="paired"):
        Stream(trees["pt"][:1], 0, paired=True)


def test_callable_module_and_lazy_name() -> None:
    import actfmt.streaming as module

    assert actfmt.stream is module or actfmt.stream is stream
    assert callable(actfmt.stream)
    code = "import sys, actfmt; actfmt.__dir__(); assert 'torch' not in sys.modules; print('stream' in dir(actfmt))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "True"


# -- DataLoader -----------------------------------------------------------------------------------------------


def test_inside_a_dataloader_with_spawned_workers(trees: dict[str, Any]) -> None:
    s = Stream(trees["safetensors"], 2, 16, block_rows=16, buffer_rows=48)
    loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    batches = [{k: v.clone() for k, v in b.items()} for b in loader]
    check_rows(trees, batches, 2)
    allk = keys(batches)
    assert allk.size == np.unique(allk).size == 2 * TOTAL
    # two workers are two sub-ranks of one global order: the loader's round robin gives it back
    assert np.array_equal(
        allk, keys(collect(Stream(trees["safetensors"], 2, 32, block_rows=16, buffer_rows=48)))
    )


# -- the command line -----------------------------------------------------------------------------------------


def test_cli_prints_throughput_and_mixing(trees: dict[str, Any]) -> None:
    from click.testing import CliRunner

    from actfmt.cli import cli

    res = CliRunner().invoke(cli, ["stream", *trees["pt"], "--layers", "1", "--batch-size", "50", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["rows"] == 2 * TOTAL and rep["bytes"] == 2 * TOTAL * HIDDEN * 2 and rep["gb_per_s"] > 0
    assert 0 <= rep["mixing"]["corr"] < 0.5
    res = CliRunner().invoke(
        cli, ["stream", trees["pt"][0], "--layers", "0,2", "--no-shuffle", "--epochs", "2"]
    )
    assert res.exit_code == 0, res.output
    assert (
        f"{2 * TOTAL:,} rows in" in res.output
        and "GB/s of x" in res.output
        and "corr(position, row)| 1.000" in res.output
    )
    res = CliRunner().invoke(cli, ["stream", trees["pt"][0], "--layers", "7"])
    assert res.exit_code == 2 and "no layer 7" in res.output
