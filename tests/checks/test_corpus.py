"""The fixture corpus: every invalid tree gives exactly its expected findings, every valid tree none."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from actfmt.checks import RULES, validate
from tests.conftest import INVALID, VALID, load_expected

INVALID_CASES = sorted(p for p in INVALID.iterdir() if p.is_dir())
VALID_CASES = sorted(p for p in VALID.iterdir() if p.is_dir())
DEEP_CODES = {code for code, rule in RULES.items() if rule.deep}


def test_corpus_is_present() -> None:
    assert len(INVALID_CASES) >= len(RULES)
    assert {"fp16_batch_divides", "bf16_batch_rounds", "fp32_single_shard", "em_neutral_pair"} <= {
        p.name for p in VALID_CASES
    }


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda p: p.name)
def test_invalid_fixture_gives_exactly_expected_findings(case: Path) -> None:
    expected = load_expected(case)
    deep = bool(expected.get("deep", False))
    report = validate(case, deep=deep)
    got = Counter((f.code, f.location) for f in report.findings)
    want = Counter((f["code"], f["location"]) for f in expected["findings"])
    assert got == want, [f"{f.code} {f.location}: {f.message}" for f in report.findings]
    # the directory name's code is among the findings, and every finding points inside the fixture
    assert case.name.split("_")[0] in {c for c, _ in got}
    for f in report.findings:
        assert f.message
        assert not Path(f.location).is_absolute()
        assert "\\" not in f.location
        assert (case / f.location).parent.exists()
    assert report.exit_code() == (1 if report.errors else 0)


@pytest.mark.parametrize(
    "case",
    [p for p in INVALID_CASES if load_expected(p).get("deep")],
    ids=lambda p: p.name,
)
def test_deep_only_fixture_is_clean_without_deep(case: Path) -> None:
    report = validate(case)
    assert not {f.code for f in report.findings} & DEEP_CODES
    assert report.findings == []


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda p: p.name)
@pytest.mark.parametrize("deep", [False, True], ids=["header", "deep"])
def test_valid_fixture_is_clean(case: Path, deep: bool) -> None:
    report = validate(case, deep=deep)
    assert [f"{f.code} {f.location}: {f.message}" for f in report.findings] == []
    assert report.splits and report.layers and report.shards
    assert not report.skipped
    assert report.exit_code(strict=True) == 0


def test_malicious_pickle_payload_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    case = INVALID / "ACT003_malicious_pickle"
    evil = case / "Activations/org_tiny-model/toy_ds/EM/layer_01/shard_000.pt"
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("ACTFMT_PAYLOAD_MARKER", str(marker))
    for deep in (False, True):
        report = validate(case, deep=deep, jobs=2)
        assert [f.code for f in report.findings] == ["ACT003"]
        assert not marker.exists()
    # The payload is real: an unsafe load (what actfmt never does) runs it.
    import torch

    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "payload ran"


def test_real_slice_is_real_bf16_data() -> None:
    """The committed real slice keeps the producer's 80-row shards and bf16 dtype."""
    report = validate(VALID / "real_minilm_bf16_slice", deep=True)
    assert report.findings == []
    assert len(report.splits) == 2 and report.layers == 6 and report.shards == 18
    split = VALID / "real_minilm_bf16_slice/Activations/sentence-transformers_all-MiniLM-L6-v2"
    assert sorted(p.name for p in split.glob("*/*")) == ["EM", "Neutral"]


def test_shared_real_sample_is_clean(real_sample: Path) -> None:
    for deep in (False, True):
        report = validate(real_sample, deep=deep, jobs=2)
        assert report.findings == [], [f.message for f in report.findings]
        assert (len(report.splits), report.layers, report.shards) == (2, 12, 96)


def test_fixture_files_are_small() -> None:
    total = sum(p.stat().st_size for p in (VALID.parent).rglob("*") if p.is_file() and not p.is_symlink())
    assert total < 5 * 2**20
    assert os.path.islink(
        INVALID / "ACT001_dangling_symlink/Activations/org_tiny-model/toy_ds/EM/layer_01/shard_001.pt"
    )
