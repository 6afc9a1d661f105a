"""The validation engine: discovery, locations, root causes, selection, I/O failures, jobs, deep, progress."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import actfmt
from actfmt.checks import context as ctxmod
from actfmt.checks import validate
from actfmt.errors import NotASplitError
from actfmt.progress import ProgressEvent
from actfmt.report import Report
from tests._faults import actfmt_cmd, run, run_json, world_readable
from tests._trees import make_split
from tests.conftest import INVALID, VALID

PAIR = VALID / "em_neutral_pair"
PAIR_DS = PAIR / "Activations/org_tiny-pair/pair_ds"
BASE_EM = "Activations/org_tiny-model/toy_ds/EM"


def codes_locs(report: Report) -> list[tuple[str, str]]:
    return sorted((f.code, f.location) for f in report.findings)


def copy_case(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(INVALID / name if (INVALID / name).exists() else VALID / name, dest, symlinks=True)
    return dest


# -- discovery and locations ------------------------------------------------------------------------------
def test_missing_path_raises_not_a_split(tmp_path: Path) -> None:
    with pytest.raises(NotASplitError, match="no such file"):
        validate(tmp_path / "nope")


def test_tree_without_split_raises_not_a_split(tmp_path: Path) -> None:
    (tmp_path / "Activations" / "model").mkdir(parents=True)
    (tmp_path / "Activations" / "README.txt").write_text("x")
    with pytest.raises(NotASplitError, match="no split found"):
        validate(tmp_path)
    with pytest.raises(FileNotFoundError):  # NotASplitError is a FileNotFoundError for callers
        validate(tmp_path / "README.txt")


@pytest.mark.parametrize(
    ("sub", "prefix"),
    [
        ("", "Activations/org_tiny-pair/pair_ds/"),
        ("Activations", "org_tiny-pair/pair_ds/"),
        ("Activations/org_tiny-pair", "pair_ds/"),
        ("Activations/org_tiny-pair/pair_ds", ""),
    ],
)
def test_every_level_of_the_tree_is_a_valid_path(sub: str, prefix: str) -> None:
    report = validate(PAIR / sub if sub else PAIR)
    assert report.splits == [f"{prefix}EM", f"{prefix}Neutral"]
    assert (report.layers, report.shards) == (4, 12)
    assert report.findings == [] and report.root == str(PAIR / sub if sub else PAIR)


def test_split_itself_is_reported_as_dot_and_locations_are_relative() -> None:
    split = INVALID / "ACT302_missing_middle_shard" / BASE_EM
    report = validate(split)
    assert report.splits == ["."]
    assert codes_locs(report) == [("ACT302", "layer_00/shard_001.pt")]
    report = validate(str(split.parent))
    assert codes_locs(report) == [("ACT302", "EM/layer_00/shard_001.pt")]


def test_issue_example_message_shows_the_arithmetic(tmp_path: Path) -> None:
    split = tmp_path / "Activations" / "org_m" / "ds" / "EM"
    make_split(split, total=7049, hidden=2, layers=4, shard_size=512, batch_size=32, dtype=torch.float16)
    meta = json.loads((split / "metadata.json").read_text())
    meta["model_name"] = "org/m"
    (split / "metadata.json").write_text(json.dumps(meta))
    assert validate(tmp_path).findings == []
    (split / "layer_03" / "shard_013.pt").unlink()
    (f,) = validate(tmp_path).findings
    assert (f.code, f.location) == ("ACT301", "Activations/org_m/ds/EM/layer_03/shard_013.pt")
    assert f.message == "layer_03: expected 14 shards = ceil(7049 / 512), found 13; missing shard_013.pt"
    assert (f.expected, f.actual) == (14, 13)


# -- ACT204: which directory levels are compared --------------------------------------------------------
def test_path_mismatch_compares_parents_only_inside_the_layout(tmp_path: Path) -> None:
    em = PAIR_DS / "EM"
    assert validate(em).findings == []  # PATH is the split; its parents are an Activations layout
    lone = tmp_path / "scratch" / "EM"
    shutil.copytree(em, lone)
    assert validate(lone).findings == []  # outside a layout: only the split name is compared
    other = tmp_path / "scratch" / "em-copy"
    shutil.copytree(em, other)
    (f,) = validate(other).findings
    assert (f.code, f.severity, f.location) == ("ACT204", "warning", "metadata.json")
    assert f.actual == {"split": "em-copy"}
    fake = tmp_path / "Activations" / "some_model" / "pair_ds" / "EM"
    shutil.copytree(em, fake)
    (f,) = validate(fake).findings  # a layout above PATH: the model directory is compared too
    assert f.expected == {"model_name": "org_tiny-pair"} and f.actual == {"model_name": "some_model"}


# -- one root cause, one finding; skipped checks ------------------------------------------------------
def test_unparseable_metadata_skips_dependent_checks_and_says_which() -> None:
    report = validate(INVALID / "ACT201_truncated_json")
    assert [f.code for f in report.findings] == ["ACT201"]
    (skipped,) = report.skipped
    assert skipped.location == BASE_EM
    assert {"ACT102", "ACT103", "ACT301", "ACT305", "ACT402"} <= set(skipped.codes)
    assert "ACT201" in skipped.reason
    assert report.partial and report.to_dict()["summary"]["partial"] is True


def test_skipped_lists_only_selected_codes() -> None:
    report = validate(INVALID / "ACT202_missing_key", select=["ACT3", "ACT202"])
    (skipped,) = report.skipped
    assert skipped.codes == ("ACT301", "ACT302", "ACT303", "ACT304", "ACT305", "ACT306")
    assert "batch_size" in skipped.reason and "ACT202" in skipped.reason
    assert validate(INVALID / "ACT202_missing_key", select=["ACT4"]).skipped == []


def test_every_missing_key_in_one_finding(tmp_path: Path) -> None:
    case = copy_case("ACT202_missing_key", tmp_path)
    md = case / BASE_EM / "metadata.json"
    data = json.loads(md.read_text())
    del data["hidden_dim"], data["split"]
    md.write_text(json.dumps(data))
    f, w = sorted(validate(case).findings, key=lambda x: x.code)
    assert f.code == "ACT202" and f.expected == ["batch_size", "hidden_dim"]
    # A producer key is not needed to read the tree: a warning of its own, not part of the error.
    assert w.code == "ACT205" and w.expected == ["split"] and w.severity == "warning"


# -- selection --------------------------------------------------------------------------------------------
def test_select_and_ignore_count_ignored_findings() -> None:
    case = INVALID / "ACT306_stale_shards"
    assert len(validate(case).findings) == 6
    report = validate(case, ignore=["extra-shard"])
    assert report.findings == [] and report.ignored == 6 and report.exit_code() == 0
    report = validate(case, select="ACT1,ACT2")
    assert report.findings == [] and report.ignored == 6
    report = validate(case, select=["ACT3"], ignore=["ACT301"])
    assert len(report.findings) == 6 and report.ignored == 0


# -- I/O failures: ACT001 -----------------------------------------------------------------------------
# Real permission errors: the tree is made unreadable in part, and validated by an unprivileged user (root
# reads everything), through the command line.
def test_permission_denied_on_a_shard_is_act001(open_tmp: Path) -> None:
    case = copy_case("bf16_batch_rounds", open_tmp)
    world_readable(case)
    victim = next(case.rglob("layer_01/shard_001.pt"))
    victim.chmod(0)
    out = _validate_as_nobody(case)
    (f,) = out["issues"]
    assert (f["code"], f["location"]) == (
        "ACT001",
        "Activations/org_tiny-bf16/toy_ds/EM/layer_01/shard_001.pt",
    )
    assert "Permission denied" in f["message"]
    assert out["summary"]["errors"] == 1


def _validate_as_nobody(case: Path) -> dict:
    return run_json(actfmt_cmd("validate", str(case), "--output-format", "json"), unprivileged=True)


def test_directory_where_a_shard_belongs_is_act001(tmp_path: Path) -> None:
    case = copy_case("bf16_batch_rounds", tmp_path)
    victim = next(case.rglob("layer_02/shard_000.pt"))
    victim.unlink()
    victim.mkdir()
    (f,) = validate(case).findings
    assert (f.code, f.location) == ("ACT001", "Activations/org_tiny-bf16/toy_ds/EM/layer_02/shard_000.pt")
    assert "directory" in f.message


def test_unlistable_layer_directory_is_act001(open_tmp: Path) -> None:
    case = copy_case("bf16_batch_rounds", open_tmp)
    world_readable(case)
    victim = next(case.rglob("layer_01"))
    victim.chmod(0)
    out = _validate_as_nobody(case)
    assert [(f["code"], f["location"]) for f in out["issues"]] == [
        ("ACT001", "Activations/org_tiny-bf16/toy_ds/EM/layer_01")
    ]


def test_unlistable_directory_above_the_splits_never_validates_ok(open_tmp: Path) -> None:
    case = copy_case("em_neutral_pair", open_tmp)
    world_readable(case)
    hidden = case / "Activations" / "org_tiny-pair" / "pair_ds"
    hidden.chmod(0)
    res = run(actfmt_cmd("validate", str(case)), unprivileged=True)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "ACT001" in res.stdout and "pair_ds" in res.stdout and "Traceback" not in res.stderr


@pytest.mark.parametrize("victim", ["layer_01/shard_001.pt", "metadata.json"])
def test_a_fifo_is_a_finding_never_a_hang(tmp_path: Path, victim: str) -> None:
    case = copy_case("bf16_batch_rounds", tmp_path)
    split = next(case.rglob("EM"))
    (split / victim).unlink()
    os.mkfifo(split / victim)  # opening it for reading would block until a writer comes
    for deep in ("", "--deep"):
        out = run_json(
            actfmt_cmd("validate", str(case), "--output-format", "json", *([deep] if deep else []))
        )
        assert ("ACT006", f"{BASE_EM.replace('org_tiny-model', 'org_tiny-bf16')}/{victim}") in [
            (f["code"], f["location"]) for f in out["issues"]
        ], out["issues"]
        assert out["summary"]["errors"] >= 1


def test_unreadable_metadata_is_act001_and_skips(tmp_path: Path) -> None:
    case = copy_case("bf16_batch_rounds", tmp_path)
    md = next(case.rglob("metadata.json"))
    md.unlink()
    md.mkdir()
    report = validate(case)
    assert codes_locs(report) == [("ACT001", "Activations/org_tiny-bf16/toy_ds/EM/metadata.json")]
    assert report.skipped and "ACT001" in report.skipped[0].reason


# -- jobs, deep, progress -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["ACT002_truncated_shard", "ACT306_stale_shards", "ACT406_nan_inf", "em_neutral_pair"]
)
def test_jobs_give_identical_reports(name: str) -> None:
    path = INVALID / name if (INVALID / name).exists() else VALID / name
    one = validate(path, deep=True, jobs=1)
    four = validate(path, deep=True, jobs=4)
    assert one.to_dict() == four.to_dict()
    assert one.findings == four.findings  # same order too


def test_deep_emits_progress_with_bytes() -> None:
    events: list[ProgressEvent] = []
    report = validate(PAIR, deep=True, progress=events.append)
    assert report.deep and report.findings == []
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("advance") == 12
    assert {e.task for e in events} == {"validate"}
    assert (
        events[0].total == sum(e.nbytes for e in events) == 2 * 2 * 40 * 8 * 2
    )  # splits*layers*rows*hidden*2B
    header: list[ProgressEvent] = []
    validate(PAIR, progress=header.append)
    assert header == []  # header-only validation reads no data


def test_header_only_does_not_read_data(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    monkeypatch.setattr(ctxmod, "_deep_read", lambda inv, s: called.append(s.location))
    validate(PAIR)
    assert called == []
    validate(PAIR, deep=True)
    assert len(called) == 12


def test_nonfinite_counts_nan_and_inf_even_when_sum_overflows(tmp_path: Path) -> None:
    split = tmp_path / "EM"
    make_split(
        split, total=10, hidden=4, layers=2, shard_size=10, batch_size=10, dtype=torch.bfloat16, split="EM"
    )
    p = split / "layer_00" / "shard_000.pt"
    big = torch.full((10, 4), 3e38, dtype=torch.bfloat16)  # finite, but the float32 sum overflows
    torch.save(big, p)
    report = validate(split, deep=True)
    assert [f.code for f in report.findings] == []
    big[0, 0] = float("-inf")
    torch.save(big, p)
    (f,) = validate(split, deep=True).findings
    assert (f.code, f.actual) == ("ACT406", 1) and "0 NaN and 1 Inf" in f.message


def test_bloated_shard_says_bytes_wasted() -> None:
    (f,) = validate(INVALID / "ACT405_saved_view").findings
    assert f.severity == "warning"
    assert f.expected == 18 * 8 * 2 and f.actual == 50 * 8 * 2
    assert f"{(50 - 18) * 8 * 2} bytes wasted" in f.message


def test_split_mismatch_reports_the_odd_split() -> None:
    (f,) = validate(INVALID / "ACT502_split_mismatch").findings
    assert f.expected == {"total_examples": 50} and f.actual == {"total_examples": 44}
    # validating one split alone has no sibling to compare with
    assert (
        validate(INVALID / "ACT502_split_mismatch" / "Activations/org_tiny-model/toy_ds/Neutral").findings
        == []
    )


def test_api_is_exported_lazily() -> None:
    assert actfmt.validate is validate


def test_header_probe_without_torch_matches_torch() -> None:
    from actfmt.formats.pt.header import _data_offset, fast_probe, load_shard
    from actfmt.storage import LocalLocation

    fast = slow = 0
    for shard in sorted((VALID.parent).rglob("*.pt")):
        if shard.is_symlink() or not shard.is_file():
            continue
        header = fast_probe(LocalLocation(shard))
        try:
            t = load_shard(LocalLocation(shard))  # torch's own reading, the reference
        except Exception:
            assert header is None, shard  # damaged or unsafe files are left to torch
            slow += 1
            continue
        if header is None:
            assert shard.read_bytes()[:2] != b"PK", (
                shard
            )  # only the legacy format needs torch among loadable files
            slow += 1
            continue
        assert header.shape == tuple(t.shape) and header.dtype == str(t.dtype).removeprefix("torch."), shard
        assert header.tensor_nbytes == t.numel() * t.element_size(), shard
        assert header.storage_nbytes == t.untyped_storage().nbytes(), shard
        assert header.file_nbytes == shard.stat().st_size and not header.legacy, shard
        assert header.data_offset == _data_offset(shard, t), shard
        fast += 1
    assert fast > 300 and slow >= 6


def test_header_only_validation_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from actfmt.checks import validate; "
        f"r = validate({str(PAIR)!r}); assert r.shards == 12 and not r.findings; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"total_examples": 10**15}, "ACT305"),
        ({"num_layers": 10**9}, "ACT102"),
        ({"shard_size": 10**12}, "ACT303"),
    ],
)
def test_absurd_metadata_is_one_finding_and_fast(tmp_path: Path, change: dict[str, int], code: str) -> None:
    case = copy_case("bf16_batch_rounds", tmp_path)
    md = next(case.rglob("metadata.json"))
    md.write_text(json.dumps({**json.loads(md.read_text()), **change}))
    (f,) = validate(case).findings
    assert (f.code, f.location) == (code, "Activations/org_tiny-bf16/toy_ds/EM/metadata.json")
