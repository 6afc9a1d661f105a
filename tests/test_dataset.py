"""actfmt.open / Split / LayerView / ActivationDataset over every format, compared with the seed loader."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import actfmt
from actfmt.conversion import convert
from actfmt.formats import FORMATS, get_format
from actfmt.torch import ActivationDataset

from ._trees import bits, make_split, make_tree, seed_load


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One split (bf16, producer's 80-row shards, last 43) in every format."""
    root = tmp_path_factory.mktemp("stores")
    make_split(root / "src" / "EM", total=203, hidden=16, layers=3)
    out = {"pt": root / "src" / "EM"}
    for fmt in FORMATS:
        if fmt != "pt":
            convert(root / "src" / "EM", root / fmt, to=fmt, chunk_rows=32, force=True)
            out[fmt] = get_format(fmt).destination(root / fmt / "EM")
    return out


@pytest.fixture(params=list(FORMATS))
def fmt(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def split_path(fmt: str, stores: dict[str, Path]) -> Path:
    return stores[fmt]


def expected(stores: dict[str, Path], layer: int) -> torch.Tensor:
    return seed_load(stores["pt"], f"layer_{layer:02d}")


def test_split_properties(split_path: Path, fmt: str) -> None:
    with actfmt.open(split_path) as s:
        assert (s.num_layers, s.num_examples, s.hidden_dim, s.dtype) == (3, 203, 16, torch.bfloat16)
        assert s.metadata["total_examples"] == 203 and "actfmt" not in s.metadata
        assert s.layers == [0, 1, 2]
        assert s.format == fmt


def test_layer_indexing_matches_seed_loader(split_path: Path, stores: dict[str, Path]) -> None:
    want = expected(stores, 1)
    with actfmt.open(split_path) as s:
        lv = s.layer(1)
        assert len(lv) == 203 and lv.shape == (203, 16) and lv.dtype == torch.bfloat16
        assert torch.equal(bits(lv[:]), bits(want))
        assert torch.equal(bits(lv[5]), bits(want[5]))
        assert torch.equal(bits(lv[-1]), bits(want[-1]))
        assert torch.equal(bits(lv[70:170]), bits(want[70:170]))
        assert torch.equal(bits(lv[10:200:7]), bits(want[10:200:7]))
        ids = [202, 3, 3, 0, 81, 80, 79]
        assert torch.equal(bits(lv[ids]), bits(want[ids]))
        assert torch.equal(bits(lv[np.array(ids)]), bits(want[ids]))
        assert torch.equal(bits(lv[torch.tensor(ids)]), bits(want[ids]))
        with pytest.raises(IndexError):
            lv[203]
        with pytest.raises(IndexError):
            lv[[0, 500]]


def test_iter_batches(split_path: Path, stores: dict[str, Path]) -> None:
    want = expected(stores, 2)
    with actfmt.open(split_path) as s:
        batches = list(s.layer(2).iter_batches(50))
        assert [len(b) for b in batches] == [50, 50, 50, 50, 3]
        assert torch.equal(bits(torch.cat(batches)), bits(want))
        shuffled = torch.cat(list(s.layer(2).iter_batches(64, shuffle=True, seed=7)))
        perm = np.random.default_rng(7).permutation(203)
        assert torch.equal(bits(shuffled), bits(want[perm]))
        assert [len(b) for b in s.layer(2).iter_batches(64, shuffle=True, seed=1, drop_last=True)] == [64] * 3


def test_example_across_layers(split_path: Path, stores: dict[str, Path]) -> None:
    with actfmt.open(split_path) as s:
        e = s.example(100)
    assert e.shape == (3, 16)
    for layer in range(3):
        assert torch.equal(bits(e[layer]), bits(expected(stores, layer)[100]))


def test_open_tree_keys(tmp_path: Path) -> None:
    make_tree(tmp_path, total=20, hidden=4, layers=1)
    tree = actfmt.open_tree(tmp_path)
    assert sorted(tree) == [("org/Tiny-Model", "SP_test", "EM"), ("org/Tiny-Model", "SP_test", "Neutral")]
    for s in tree.values():
        s.close()


def test_activation_dataset_pickles_and_loads_with_workers(stores: dict[str, Path]) -> None:
    ds = ActivationDataset([stores["pt"], stores["zarr"]], layer=1, labels=[1, 0])
    assert len(ds) == 406
    x, y = ds[210]
    assert torch.equal(bits(x), bits(expected(stores, 1)[7])) and int(y) == 0
    clone = pickle.loads(pickle.dumps(ds))
    loader = torch.utils.data.DataLoader(clone, batch_size=64, shuffle=True, num_workers=2)
    seen = 0
    labels = 0
    for xb, yb in loader:
        assert xb.shape[1:] == (16,) and xb.dtype == torch.bfloat16
        seen += len(xb)
        labels += int(yb.sum())
    assert (seen, labels) == (406, 203)
