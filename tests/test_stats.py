"""actfmt stats: the figures against a plain float64 numpy reference, for every format and storage, and the
command's outputs (text, json, csv, plot)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actfmt
import actfmt.formats as formats_registry
from actfmt.cli import cli
from actfmt.conversion import convert
from actfmt.moments import LAYER_FIELDS, PAIR_FIELDS, Moments, Projection, RowNorms, direction
from actfmt.statistics import parse_layers
from tests._trees import make_split, make_tree, seed_load
from tests.conftest import VALID

REAL = VALID / "real_minilm_bf16_slice" / "Activations" / "sentence-transformers_all-MiniLM-L6-v2"
REAL_DS = REAL / "SP_stdlib_docs_sample"
FORMATS = list(formats_registry.FORMATS)  # every registered format, a new one by itself
SUFFIX = {f: (formats_registry.get_format(f).suffixes or ("",))[0] for f in FORMATS}
RTOL = 1e-9


# ---------------------------------------------------------------------------------------------- the reference


def ref_split(x: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """The per-split figures as the README defines them, with plain numpy in float64 (and the mean)."""
    fin = np.isfinite(x)
    good = fin.all(axis=1)
    xz = np.where(fin, x, 0.0)
    n = fin.sum(axis=0)
    mean = np.where(n > 0, xz.sum(axis=0) / np.maximum(n, 1), 0.0)
    var = np.where(n > 0, (np.where(fin, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(n, 1), 0.0)
    norms = np.sqrt((x[good] ** 2).sum(axis=1))
    return {
        "rows": x.shape[0],
        "mean_norm": float(np.linalg.norm(mean)),
        "rms": float(np.sqrt((xz**2).sum() / fin.sum())),
        "std": float(np.sqrt(var.mean())),
        "row_norm_mean": float(norms.mean()),
        "row_norm_max": float(norms.max()),
        "abs_max": float(np.abs(xz).max()),
        "nonfinite": int((~fin).sum()),
        "zero_rows": int((x == 0).all(axis=1).sum()),
        "scale_factor": math.sqrt(x.shape[1]) / float(norms.mean()),
    }, mean


def ref_pair(xa: np.ndarray, xb: np.ndarray) -> dict[str, Any]:
    _, ma = ref_split(xa)
    _, mb = ref_split(xb)
    d = ma - mb
    w = d / np.linalg.norm(d)
    pa, pb = xa @ w, xb @ w
    pa, pb = pa[np.isfinite(pa)], pb[np.isfinite(pb)]
    t = (ma @ w + mb @ w) / 2
    return {
        "diff_of_means_norm": float(np.linalg.norm(d)),
        "cosine_of_means": float(ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb)),
        "cohens_d": float((pa.mean() - pb.mean()) / np.sqrt((pa.var() + pb.var()) / 2)),
        "midpoint_accuracy": float(((pa > t).sum() + (pb <= t).sum()) / (pa.size + pb.size)),
    }


def close(got: dict[str, Any], want: dict[str, Any], rtol: float = RTOL) -> list[str]:
    """The names of the figures that differ by more than ``rtol`` (integers: exactly)."""
    bad = []
    for k, v in want.items():
        g = got[k]
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            if g != v:
                bad.append(f"{k}: {g} != {v}")
        elif not math.isclose(g, v, rel_tol=rtol, abs_tol=1e-300):
            bad.append(f"{k}: {g!r} != {v!r}")
    return bad


def as64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def stored_bits(x: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as actfmt hands rows to the kernels: the stored numpy dtype (bfloat16 as its bits)."""
    name = str(x.dtype).removeprefix("torch.")
    if name == "bfloat16":
        return x.contiguous().view(torch.int16).numpy().view(np.uint16), name
    return x.contiguous().numpy(), name


# ---------------------------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_moments_match_the_reference_for_any_blocking(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    # known moments: per-dimension offsets far from zero (the cancellation a naive formula suffers)
    offset = torch.linspace(-50, 200, 48)
    x = (torch.randn(1000, 48, generator=g) * torch.linspace(0.1, 5, 48) + offset).to(dtype)
    x[17] = 0  # one all-zero row
    bits, name = stored_bits(x)
    want, mean = ref_split(as64(x))
    results = []
    for cuts in ([1000], [1, 999], [300, 300, 400], [64] * 15 + [40], [999, 1]):
        parts = []
        start = 0
        for n in cuts:
            m = Moments(48)
            m.update(bits[start : start + n], name)
            parts.append(m)
            start += n
        whole = parts[0]
        for p in parts[1:]:
            whole.merge(p)
        results.append(whole)
        assert close(whole.summary(), want) == [], cuts
        np.testing.assert_allclose(whole.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(whole.variance, as64(x).var(axis=0), rtol=1e-9)
    # merging in another order gives the same figures to float64 rounding
    reverse = Moments(48)
    for a in range(900, -1, -100):
        m = Moments(48)
        m.update(bits[a : a + 100], name)
        reverse.merge(m)
    assert close(reverse.summary(), results[0].summary(), 1e-12) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nan_and_inf_are_counted_and_left_out(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 16, generator=g).to(dtype)
    x[3, 4] = float("nan")
    x[70, 0] = float("inf")
    x[71, 15] = float("-inf")
    x[150] = float("nan")  # a whole row
    bits, name = stored_bits(x)
    m = Moments(16)
    m.update(bits[:100], name)
    rest = Moments(16)
    rest.update(bits[100:], name)
    m.merge(rest)
    got = m.summary()
    want, mean = ref_split(as64(x))
    assert got["nonfinite"] == 3 + 16
    assert close(got, want) == []
    assert all(math.isfinite(got[k]) for k in LAYER_FIELDS if got[k] is not None)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12)
    # the row norms skip the same rows
    n = RowNorms()
    n.update(bits, name)
    assert n.rows == 200 - 4
    assert math.isclose(n.mean, want["row_norm_mean"], rel_tol=1e-6)


def test_moments_state_round_trips_and_pickles() -> None:
    import pickle

    x = torch.randn(64, 8).to(torch.bfloat16)
    bits, name = stored_bits(x)
    m = Moments(8)
    m.update(bits, name)
    again = Moments.from_state(json.loads(json.dumps(m.state())))
    assert again.summary() == m.summary()
    assert pickle.loads(pickle.dumps(m)).summary() == m.summary()


def test_moments_state_is_compact_exact_and_refuses_damage() -> None:
    """A conversion's journal keeps each layer's state: its vectors are base64 bytes (not 4096 JSON floats),
    exact; a list state (earlier versions) still loads; a damaged or crafted one is a ValueError."""
    x = (torch.randn(300, 64) * 3).to(torch.float32)
    x[5, 7] = float("nan")  # a per-dimension count that is not one number
    bits, name = stored_bits(x)
    m = Moments(64)
    m.update(bits, name)
    state = json.loads(json.dumps(m.state()))
    assert isinstance(state["mean"], dict) and isinstance(state["m2"]["<f8"], str)
    assert isinstance(state["count"], dict)
    again = Moments.from_state(state)
    assert np.array_equal(again.mean, m.mean) and np.array_equal(again.m2, m.m2)
    assert np.array_equal(again.count, m.count) and again.summary() == m.summary()
    legacy = {**state, "mean": m.mean.tolist(), "m2": m.m2.tolist(), "count": m.count.tolist()}
    assert Moments.from_state(legacy).summary() == m.summary()
    for bad in (
        {**state, "mean": {"<f8": state["mean"]["<f8"][:-8]}},  # too short
        {**state, "mean": {"<f8": "not base64!"}},
        {**state, "m2": {"<f4": state["m2"]["<f8"]}},  # another dtype
        {**state, "m2": [1.0, 2.0]},  # a list of the wrong length
        {**state, "count": "many"},
    ):
        with pytest.raises(ValueError):
            Moments.from_state(bad)


def test_a_damaged_journal_state_is_computed_again_from_the_store(tmp_path: Path) -> None:
    from actfmt.conversion.split import ConvertResult, _layer_moments
    from actfmt.conversion.tasks import LayerResult
    from actfmt.formats.base import SplitSpec
    from actfmt.storage import resolve

    make_split(tmp_path / "ds" / "EM", total=120, hidden=16, layers=2)
    convert(tmp_path / "ds" / "EM", tmp_path / "out", to="zarr")
    store = tmp_path / "out" / "EM.zarr"
    want = {s.layer: s for s in actfmt.stats([store], recompute=True).splits[0].layers}
    with formats_registry.open_reader(resolve(store)) as reader:
        layers = list(reader.layers)
    good = Moments(16)
    done = {
        layers[0].name: LayerResult(
            layers[0].name, "x", 0, {"moments": {**good.state(), "mean": {"<f8": "AA=="}}}
        ),
        layers[1].name: LayerResult(layers[1].name, "x", 0, {"moments": {**good.state(), "hidden": 3}}),
    }
    got = _layer_moments(resolve(store), "zarr", SplitSpec({}, layers), done, ConvertResult())
    for li in layers:
        summary = got[li.name].summary()
        assert summary["rows"] == 120
        assert math.isclose(summary["rms"], want[li.name].rms, rel_tol=1e-12)


def test_projection_and_pair_figures_match_the_reference() -> None:
    g = torch.Generator().manual_seed(9)
    a = (torch.randn(500, 32, generator=g) + 0.3).to(torch.bfloat16)
    b = torch.randn(400, 32, generator=g).to(torch.bfloat16)
    (ba, name), (bb, _) = stored_bits(a), stored_bits(b)
    ma, mb = Moments(32), Moments(32)
    ma.update(ba, name)
    mb.update(bb, name)
    w, t = direction(ma, mb)
    pa, pb = Projection(w, t), Projection(w, t)
    pa.update(ba[:123], name)
    rest = Projection(w, t)
    rest.update(ba[123:], name)
    pa.merge(rest)
    pb.update(bb, name)
    from actfmt.moments import pair_figures

    got = pair_figures("layer_00", 0, ma, mb, pa, pb).to_dict()
    assert close(got, ref_pair(as64(a), as64(b))) == []


def test_parse_layers() -> None:
    assert parse_layers("0,5,10-12") == [0, 5, 10, 11, 12]
    assert parse_layers(" 3, 1-2 ,3") == [1, 2, 3]
    assert parse_layers(None) is None
    assert parse_layers([2, 1]) == [1, 2]
    for bad in ("x", "3-1", "-1", ","):
        with pytest.raises(actfmt.errors.StatsError):
            parse_layers(bad)


# ---------------------------------------------------------------------------------------------- the API


def reference_tree(root: Path) -> dict[str, dict[str, Any]]:
    """Per layer: the reference figures of EM, Neutral and the pair, from the seed loader."""
    out = {}
    em, neutral = root / "EM", root / "Neutral"
    for layer in sorted(p.name for p in em.iterdir() if p.is_dir()):
        a, b = as64(seed_load(em, layer)), as64(seed_load(neutral, layer))
        out[layer] = {"EM": ref_split(a)[0], "Neutral": ref_split(b)[0], "pair": ref_pair(a, b)}
    return out


def check_result(result: Any, ref: dict[str, dict[str, Any]], rtol: float = RTOL) -> None:
    assert {s.split for s in result.splits} == {"EM", "Neutral"}
    for s in result.splits:
        for li in s.layers:
            assert close(li.to_dict(), ref[li.layer][s.split], rtol) == [], (s.path, li.layer)
    (pair,) = result.pairs
    assert (pair.a, pair.b) == ("EM", "Neutral")
    for pl in pair.layers:
        assert close(pl.to_dict(), ref[pl.layer]["pair"], rtol) == [], pl.layer
    best = max(pair.layers, key=lambda p: (p.midpoint_accuracy, abs(p.cohens_d), -p.index))
    assert pair.best_layer == best.layer


@pytest.fixture(scope="module")
def real_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {"pt": REAL_DS}
    base = tmp_path_factory.mktemp("real")
    for fmt in [f for f in FORMATS if f != "pt"]:
        convert(REAL, base / fmt, to=fmt)
        out[fmt] = base / fmt / "SP_stdlib_docs_sample"
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_minilm_sample_matches_the_reference_in_every_format(
    real_stores: dict[str, Path], fmt: str
) -> None:
    ref = reference_tree(REAL_DS)
    kept = actfmt.stats(real_stores[fmt])
    check_result(kept, ref)
    assert {s.source for s in kept.splits} == {"computed" if fmt == "pt" else "stored"}
    again = actfmt.stats(real_stores[fmt], recompute=True, jobs=1)
    check_result(again, ref)
    assert {s.source for s in again.splits} == {"computed"}


def test_result_does_not_depend_on_jobs_or_layers_selected(tmp_path: Path) -> None:
    make_tree(tmp_path, total=333, hidden=24, layers=4, shard_size=50, batch_size=10)
    ds = tmp_path / "org_Tiny-Model" / "SP_test"
    ref = reference_tree(ds)
    one = actfmt.stats(ds, jobs=1)
    two = actfmt.stats(ds, jobs=2)
    check_result(one, ref)
    assert one.to_dict() == two.to_dict()
    some = actfmt.stats(ds, layers="1,3")
    assert [li.layer for li in some.splits[0].layers] == ["layer_01", "layer_03"]
    assert [pl.layer for pl in some.pairs[0].layers] == ["layer_01", "layer_03"]
    by_name = {(s.split, li.layer): li for s in one.splits for li in s.layers}
    for s in some.splits:
        for li in s.layers:
            assert li == by_name[(s.split, li.layer)]
    assert actfmt.stats(ds, pairs=False).pairs == []
    with pytest.raises(actfmt.errors.StatsError, match="no such layer"):
        actfmt.stats(ds, layers="9")


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_keeps_the_statistics_and_no_stats_skips_them(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    make_tree(src, total=150, hidden=16, layers=2, shard_size=40, batch_size=10)
    with_stats = tmp_path / "with"
    convert(src, with_stats, to=fmt)
    ds = with_stats / "org_Tiny-Model" / "SP_test"
    ref = reference_tree(src / "org_Tiny-Model" / "SP_test")
    kept = actfmt.stats(ds)
    assert {s.source for s in kept.splits} == {"stored"}
    check_result(kept, ref)
    with actfmt.open(ds / f"EM{SUFFIX[fmt]}") as split:
        block_stats = split._reader.actfmt["stats"]
        assert block_stats["schema_version"] == 1 and set(block_stats["layers"]) == {"layer_00", "layer_01"}
        x = as64(seed_load(src / "org_Tiny-Model" / "SP_test" / "EM", "layer_01"))
        np.testing.assert_allclose(
            split.layer(1).mean().numpy(), x.mean(axis=0).astype(np.float32), rtol=1e-6
        )
        np.testing.assert_allclose(split.layer(1).std().numpy(), x.std(axis=0).astype(np.float32), rtol=1e-6)
        assert split.layer(1).mean().dtype == torch.float32
        assert close(split.layer(1).stats().to_dict(), ref["layer_01"]["EM"]) == []
    without = tmp_path / "without"
    res = convert(src, without, to=fmt, stats=False)
    assert res.timings.get("stats", 0.0) == 0.0
    ds2 = without / "org_Tiny-Model" / "SP_test"
    with actfmt.open(ds2 / f"EM{SUFFIX[fmt]}") as split:
        assert "stats" not in split._reader.actfmt
        assert split._reader.stored_vectors() is None
        np.testing.assert_allclose(split.layer(0).std().numpy(), split.layer(0).std(recompute=True).numpy())
    computed = actfmt.stats(ds2)
    assert {s.source for s in computed.splits} == {"computed"}
    check_result(computed, ref)
    assert not list(without.rglob(".actfmt_stats*")) and not list(without.rglob("actfmt_stats"))


def test_stats_on_object_storage_match_local(s3: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, total=120, hidden=8, layers=2, shard_size=40, batch_size=10)
    ref = reference_tree(src / "org_Tiny-Model" / "SP_test")
    url = f"s3://{s3['bucket']}/stats"
    convert(src, url + "/pt", to="pt", storage_options=s3["options"])
    convert(src, url + "/zarr", to="zarr", storage_options=s3["options"])
    for sub, source in (("pt", "stored"), ("zarr", "stored")):
        res = actfmt.stats(f"{url}/{sub}", storage_options=s3["options"])
        check_result(res, ref)
        assert {s.source for s in res.splits} == {source}
    res = actfmt.stats(f"{url}/zarr", storage_options=s3["options"], recompute=True)
    check_result(res, ref)


@pytest.mark.slow
def test_dask_executor_gives_the_same_numbers(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    make_tree(tmp_path, total=200, hidden=16, layers=3, shard_size=64, batch_size=16)
    ds = tmp_path / "org_Tiny-Model" / "SP_test"
    local = actfmt.stats(ds)
    on_dask = actfmt.stats(ds, executor="dask", jobs=2)
    for a, b in zip(local.splits, on_dask.splits, strict=True):
        for x, y in zip(a.layers, b.layers, strict=True):
            assert close(y.to_dict(), x.to_dict(), 1e-12) == []
    for x, y in zip(local.pairs[0].layers, on_dask.pairs[0].layers, strict=True):
        assert close(y.to_dict(), x.to_dict(), 1e-12) == []


def test_normalized_dataset(tmp_path: Path) -> None:
    from actfmt.torch import ActivationDataset

    make_tree(tmp_path, total=90, hidden=8, layers=2, shard_size=30, batch_size=10)
    ds = tmp_path / "org_Tiny-Model" / "SP_test"
    x = torch.cat([seed_load(ds / s, "layer_01") for s in ("EM", "Neutral")]).to(torch.float64)
    scaled = ActivationDataset([ds / "EM", ds / "Neutral"], layer=1, normalize="scale")
    norm = x.norm(dim=1).mean().item()
    assert math.isclose(scaled.scale, math.sqrt(8) / norm, rel_tol=1e-9)
    rows = torch.stack([r for r, _ in scaled.__getitems__(list(range(len(scaled))))]).double()
    assert math.isclose(rows.norm(dim=1).mean().item(), math.sqrt(8), rel_tol=1e-5)
    std = ActivationDataset([ds / "EM", ds / "Neutral"], layer=1, normalize="standardize")
    rows = torch.stack([std[i][0] for i in range(len(std))]).double()
    assert rows.dtype == torch.float64 and std[0][0].dtype == torch.float32
    assert torch.allclose(rows.mean(dim=0), torch.zeros(8, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(rows.std(dim=0, unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        ActivationDataset([ds / "EM"], layer=1, normalize="minmax")


# ---------------------------------------------------------------------------------------------- the command


def test_cli_text_json_csv(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["stats", str(REAL_DS), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "best layer: layer_" in res.output and "EM" in res.output and "Neutral" in res.output
    out = tmp_path / "s.json"
    res = runner.invoke(cli, ["stats", str(REAL_DS), "--output-format", "json", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["tool"]["name"] == "actfmt"
    assert [s["split"] for s in doc["splits"]] == ["EM", "Neutral"]
    assert set(doc["splits"][0]["layers"][0]) == {"layer", "index", *LAYER_FIELDS}
    assert set(doc["pairs"][0]["layers"][0]) == {"layer", "index", *PAIR_FIELDS}
    assert doc["pairs"][0]["best_layer"].startswith("layer_")
    check_result(actfmt.stats(REAL_DS), reference_tree(REAL_DS))
    res = runner.invoke(cli, ["stats", str(REAL_DS), "--output-format", "csv", "--layers", "0-1"])
    import csv as csv_module

    rows = list(csv_module.DictReader(res.output.splitlines()))
    assert list(rows[0])[:9] == ["kind", "path", "split", "pair", "a", "b", "layer", "index", "rows"]
    assert all(len(r) == len(rows[0]) and None not in r for r in rows)  # every row as wide as the header
    splits = [r for r in rows if r["kind"] == "split"]
    pairs = [r for r in rows if r["kind"] == "pair"]
    assert len(splits) == 4 and {r["split"] for r in splits} == {"EM", "Neutral"}
    assert all(r["pair"] == "" and r["midpoint_accuracy"] == "" for r in splits)
    assert len(pairs) == 2 and {r["pair"] for r in pairs} == {"EM vs Neutral"}
    assert all((r["a"], r["b"], r["split"], r["rows"]) == ("EM", "Neutral", "", "") for r in pairs)


def test_cli_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["stats", str(REAL_DS), "--layers", "4-x"])
    assert res.exit_code == 2 and "--layers" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["stats", str(tmp_path)])
    assert res.exit_code == 2 and "no split found" in res.output
    broken = tmp_path / "broken" / "ds"
    make_split(broken / "EM", total=40, hidden=8, layers=1, shard_size=20, batch_size=10)
    shard = broken / "EM" / "layer_00" / "shard_001.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    res = runner.invoke(cli, ["stats", str(broken)])
    assert res.exit_code == 2, res.output
    assert "shard_001.pt" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".svg", b"<svg")])
def test_plot_is_a_real_image(tmp_path: Path, suffix: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / f"stats{suffix}"
    res = CliRunner().invoke(cli, ["stats", str(REAL_DS), "--plot", str(target), "-q"])
    assert res.exit_code == 0, res.output
    data = target.read_bytes()
    assert magic in data[:400]
    if suffix == ".svg":
        text = data.decode()
        assert "layer" in text and "sentence-transformers/all-MiniLM-L6-v2" in text
    bad = CliRunner().invoke(cli, ["stats", str(REAL_DS), "--plot", str(tmp_path / "x.pdf")])
    assert bad.exit_code == 2 and ".png or .svg" in bad.output


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from actfmt.cli import main\n"
        f"sys.argv = ['actfmt', 'stats', {str(REAL_DS)!r}, '--plot', {str(tmp_path / 'p.png')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "actfmt[plot]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p.png").exists()
