"""Object storage through fsspec: ``memory://`` (in process) and S3 (moto's server on loopback, ``slow``).

What must hold on object storage as on a disk: validation gives the same findings (header-only with ranged
reads: no shard is downloaded), ``actfmt.open`` reads the same rows bit for bit, conversions into and out of a
bucket round-trip bit-exact and verify, an interrupted store never looks complete, and no secret ever appears in
a message.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import actfmt
from actfmt.checks import validate
from actfmt.cli import cli
from actfmt.conversion import convert, info, verify
from actfmt.errors import (
    ConversionError,
    DestinationExistsError,
    LockedError,
    NotASplitError,
    RemoteStorageError,
)
from actfmt.formats import find_splits
from actfmt.formats.pt.header import HEAD_BYTES, TAIL_BYTES
from actfmt.storage import LocalLocation, Location, is_remote, is_url, parse_storage_options, resolve
from actfmt.storage.fsspec_ import FsspecLocation, redact
from tests.conftest import INVALID, SECRET, VALID, load_expected

TREE = VALID / "real_minilm_bf16_slice"
SPLIT_REL = "Activations/sentence-transformers_all-MiniLM-L6-v2/SP_stdlib_docs_sample/EM"
SPLIT_IN = SPLIT_REL.removeprefix("Activations/")  # where a converted tree puts it


def _upload(local: Path, url: str, storage_options: dict[str, Any] | None = None) -> Location:
    root = resolve(url, storage_options)
    root.put_many(
        {root / f.relative_to(local).as_posix(): f.read_bytes() for f in local.rglob("*") if f.is_file()}
    )
    return root


def _mem(name: str) -> str:
    return f"memory://actfmt-test-{name}-{uuid.uuid4().hex[:8]}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _same_rows(a: actfmt.dataset.Split, b: actfmt.dataset.Split) -> None:
    assert a.layers == b.layers and a.num_examples == b.num_examples and a.dtype == b.dtype
    n = a.num_examples
    picks = [0, n - 1, 3, 3, n // 2, 79, 80, 81, 7]
    for i in a.layers:
        la, lb = a.layer(i), b.layer(i)
        assert torch.equal(_bits(la[:]), _bits(lb[:]))
        assert torch.equal(_bits(la[picks]), _bits(lb[picks]))
        assert torch.equal(_bits(la[10:170]), _bits(lb[10:170]))
        assert torch.equal(_bits(la[n - 1]), _bits(lb[-1]))
    assert torch.equal(_bits(a.example(5)), _bits(b.example(5)))


# ----------------------------------------------------------------------------------------------------------
# URLs, paths, options, redaction


def test_urls_and_paths(tmp_path: Path) -> None:
    assert is_url("s3://b/k") and is_url("memory://x") and is_url("file:///tmp") and not is_url("/tmp/x")
    assert is_remote("gs://b") and not is_remote("file:///tmp") and not is_remote(tmp_path)
    local = resolve(f"file://{tmp_path}")
    assert isinstance(local, LocalLocation) and local == tmp_path and Path(local) == tmp_path
    p = resolve("memory://bucket/Activations", {"anon": True})
    assert isinstance(p, FsspecLocation) and str(p) == "memory://bucket/Activations"
    with pytest.raises(TypeError):  # a remote location is never silently a local path
        Path(p)  # type: ignore[call-overload]
    child = p / "m" / "EM"
    assert (
        str(child) == "memory://bucket/Activations/m/EM" and child.name == "EM" and child.parent.name == "m"
    )
    assert str(child.with_name("EM.zarr")) == "memory://bucket/Activations/m/EM.zarr"
    back = pickle.loads(pickle.dumps(child))
    assert back == child and back.storage_options == {"anon": True}
    assert resolve("memory://bucket/Activations") != p  # other options: another filesystem binding
    assert repr(p) == "FsspecLocation('memory://bucket/Activations')"


def test_storage_options_parsing_never_echoes() -> None:
    assert parse_storage_options(None) is None
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    for bad in (f'{{"secret": "{SECRET}"', f'["{SECRET}"]'):
        with pytest.raises(actfmt.errors.ActfmtError) as err:
            parse_storage_options(bad)
        assert SECRET not in str(err.value)
    res = CliRunner().invoke(
        cli, ["validate", "--storage-options", f'{{"secret": "{SECRET}"', "memory://x/y"]
    )
    assert res.exit_code == 2 and "--storage-options" in res.output and SECRET not in res.output


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret-12345")
    text = f"failed with {SECRET} and envsecret-12345 at endpoint http://host"
    out = redact(text, {"client_kwargs": {"aws_secret_access_key": SECRET}, "endpoint_url": "http://host"})
    assert SECRET not in out and "envsecret-12345" not in out and "http://host" in out


# ----------------------------------------------------------------------------------------------------------
# memory:// (in process)


def test_memory_validate_open_and_round_trip(tmp_path: Path) -> None:
    base = _mem("rt")
    _upload(TREE, base)
    report = validate(f"{base}/Activations")
    local = validate(TREE / "Activations")
    assert report.errors == 0 and report.warnings == 0
    assert (report.splits, report.layers, report.shards) == (local.splits, local.layers, local.shards)

    with actfmt.open(TREE / SPLIT_REL) as a, actfmt.open(f"{base}/{SPLIT_REL}") as b:
        assert b.format == "pt" and str(b.path) == f"{base}/{SPLIT_REL}"
        _same_rows(a, b)

    # local pt -> remote zarr (compressed and not) -> local pt, bit-exact, verified both ways
    res = convert(TREE / "Activations", f"{base}/zarr", to="zarr", jobs=2)
    assert len(res.splits) == 2 and res.layers == 6
    convert(TREE / "Activations", f"{base}/raw", to="zarr", compression="none", chunk_rows=50)
    assert validate(f"{base}/zarr").errors == 0
    assert validate(f"{base}/raw", deep=True).errors == 0
    assert verify(TREE / "Activations", f"{base}/zarr").equal
    back = tmp_path / "back"
    convert(f"{base}/raw", back, to="pt")
    assert verify(TREE / "Activations", back).equal
    for name in ("zarr", "raw"):
        with actfmt.open(TREE / SPLIT_REL) as a, actfmt.open(f"{base}/{name}/{SPLIT_IN}.zarr") as b:
            assert b.format == "zarr"
            _same_rows(a, b)
    # a remote source converts to a local store
    convert(f"{base}/Activations", tmp_path / "z", to="zarr")
    assert verify(f"{base}/Activations", tmp_path / "z").equal
    (row,) = [r for r in info(f"{base}/raw") if r.location.endswith("EM.zarr")]
    assert (row.format, row.layers, row.examples, row.compression, row.complete) == (
        "zarr",
        3,
        200,
        "none",
        True,
    )
    assert row.chunks == [50, 384] and row.bytes_on_disk >= row.raw_bytes


def test_memory_destination_rules() -> None:
    base = _mem("dst")  # a split converts to DST/EM.zarr
    convert(TREE / SPLIT_REL, base, to="zarr")
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        convert(TREE / SPLIT_REL, base, to="zarr")
    assert convert(TREE / SPLIT_REL, base, to="zarr", resume=True).skipped
    res = convert(TREE / SPLIT_REL, base, to="zarr", overwrite=True, compression="zstd")
    assert len(res.splits) == 1 and info(f"{base}/EM.zarr")[0].compression == "zstd level 1"
    # a lock object left by another run refuses, naming the object to delete
    lock = resolve(f"{base}/L/.EM.zarr.actfmt-lock")
    lock.write_text('{"token": "someone else", "host": "elsewhere", "pid": 1}')
    with pytest.raises(LockedError, match=r"L/\.EM\.zarr\.actfmt-lock"):
        convert(TREE / SPLIT_REL, f"{base}/L", to="zarr")
    assert not resolve(f"{base}/L/EM.zarr").exists() and lock.exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "hdf5"])
def test_memory_every_format_writes_and_reads_there(fmt: str, tmp_path: Path) -> None:
    """pt and safetensors are written in place; HDF5 is written locally and uploaded when complete."""
    base = _mem(f"fmt-{fmt}")
    res = convert(TREE / "Activations", base, to=fmt)
    assert len(res.splits) == 2 and res.layers == 6
    assert validate(base, deep=True).errors == 0
    assert verify(TREE / "Activations", base).equal
    (store,) = [loc for loc, _ in find_splits(base) if "/EM" in str(loc)]
    with actfmt.open(TREE / SPLIT_REL) as a, actfmt.open(store) as b:
        assert b.format == fmt
        _same_rows(a, b)
    back = tmp_path / "back"
    convert(base, back, to="pt")
    assert verify(TREE / "Activations", back).equal
    with pytest.raises(NotASplitError, match="no such file"):
        actfmt.open(f"{base}/nothing-here")


class _Interrupt(Exception):
    pass


def test_memory_interrupted_store_is_incomplete_then_resumes() -> None:
    base = _mem("resume")
    dst = f"{base}/EM.zarr"  # (the split goes to DST/EM.zarr)
    seen: list[str] = []

    def progress(ev: Any) -> None:
        if ev.kind == "advance" and ev.task == "convert":
            seen.append("x")
            if len(seen) == 2:
                raise _Interrupt

    with pytest.raises(_Interrupt):
        convert(TREE / SPLIT_REL, base, to="zarr", jobs=1, chunk_rows=64, progress=progress)
    report = validate(dst)  # the layers not written yet: missing chunks; the store: not complete
    assert {f.code for f in report.findings if f.severity == "error"} == {"ACT601", "ACT603"}, report.findings
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        convert(TREE / SPLIT_REL, base, to="zarr")
    state = resolve(f"{base}/.EM.zarr.actfmt-state.jsonl")
    records = [json.loads(line) for line in state.read_text().splitlines()]
    assert state.exists() and [r["layer"] for r in records if "layer" in r] == ["layer_00"]
    res = convert(TREE / SPLIT_REL, base, to="zarr", resume=True, chunk_rows=64)
    assert res.layers < 3  # the layers written before the interruption are kept
    assert validate(dst, deep=True).errors == 0 and not state.exists()
    assert verify(TREE / SPLIT_REL, dst).equal


#: Trees that object storage cannot hold as they are: a symlink, an empty directory (a prefix with no object).
_NOT_REPRESENTABLE = {"ACT001_dangling_symlink", "ACT005_link_cycle"}


def _representable(case: Path) -> bool:
    if case.name in _NOT_REPRESENTABLE:
        return False
    return not any(p.is_dir() and not any(p.iterdir()) for p in case.rglob("*"))


@pytest.mark.parametrize(
    "case", [p for p in sorted(INVALID.iterdir()) if p.is_dir() and _representable(p)], ids=lambda p: p.name
)
def test_memory_invalid_corpus_gives_the_same_findings(case: Path) -> None:
    expected = load_expected(case)
    base = _mem("corpus")
    src = case / "Activations"
    _upload(src, f"{base}/Activations")
    report = validate(base, deep=bool(expected.get("deep", False)))
    got = Counter((f.code, f.location) for f in report.findings)
    want = Counter((f["code"], f["location"]) for f in expected["findings"])
    assert got == want, [f"{f.code} {f.location}: {f.message}" for f in report.findings]
    for f in report.findings:
        assert "actfmt-remote-" not in f.message  # a temporary download's path never leaks into a message


# ----------------------------------------------------------------------------------------------------------
# S3: moto's server on loopback


@pytest.fixture
def s3_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, int]]:
    """Every S3 call s3fs makes: ``(operation, Range, bytes in the response body)``."""
    import s3fs

    calls: list[tuple[str, str | None, int]] = []
    original = s3fs.S3FileSystem._call_s3

    async def spy(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        out = await original(self, method, *args, **kwargs)
        n = int(out.get("ContentLength") or 0) if isinstance(out, dict) and method == "get_object" else 0
        calls.append((method, kwargs.get("Range"), n))
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    return calls


@pytest.mark.slow
def test_s3_header_only_validation_reads_no_whole_shard(s3: dict[str, Any], s3_requests: list[Any]) -> None:
    so, url = s3["options"], f"s3://{s3['bucket']}/tree"
    _upload(TREE, url, so)
    s3_requests.clear()
    report = validate(f"{url}/Activations", storage_options=so)
    assert report.errors == 0 and report.warnings == 0 and report.shards == 18
    shard_bytes = {f.relative_to(TREE).as_posix(): f.stat().st_size for f in TREE.rglob("*.pt")}
    gets = [c for c in s3_requests if c[0] == "get_object"]
    read = sum(n for _, _, n in gets)
    # every shard GET is ranged and small; the whole tree costs a few percent of its shards' bytes
    assert all(rng is not None and n <= max(HEAD_BYTES, TAIL_BYTES) for op, rng, n in gets if n > 400)
    assert read < 0.06 * sum(shard_bytes.values()), (read, sum(shard_bytes.values()))
    assert [op for op, _, _ in s3_requests].count("list_objects_v2") <= 2  # the tree is listed once

    # the same through the CLI, with the endpoint in --storage-options
    res = CliRunner().invoke(
        cli,
        ["validate", f"{url}/Activations", "--storage-options", json.dumps(so), "--output-format", "json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["summary"]["errors"] == 0


@pytest.mark.slow
def test_s3_broken_tree_gives_the_expected_finding(s3: dict[str, Any]) -> None:
    case = INVALID / "ACT302_missing_middle_shard"
    url = f"s3://{s3['bucket']}/broken"
    _upload(case, url, s3["options"])
    report = validate(url, storage_options=s3["options"])
    want = [(f["code"], f["location"]) for f in load_expected(case)["findings"]]
    assert [(f.code, f.location) for f in report.findings] == want


@pytest.mark.slow
def test_s3_open_reads_rows_with_small_ranges(s3: dict[str, Any], s3_requests: list[Any]) -> None:
    so, url = s3["options"], f"s3://{s3['bucket']}/tree"
    _upload(TREE, url, so)
    with actfmt.open(TREE / SPLIT_REL) as a, actfmt.open(f"{url}/{SPLIT_REL}", storage_options=so) as b:
        _same_rows(a, b)
        rows = [3, 150, 77, 199]
        want = a.layer(1)[rows]
        s3_requests.clear()
        got = b.layer(1)[rows]
        assert torch.equal(_bits(want), _bits(got))
        read = sum(n for op, _, n in s3_requests if op == "get_object")
        assert read == len(rows) * 384 * 2  # exactly the rows' bytes: no shard, no header re-read


@pytest.mark.slow
def test_s3_convert_round_trip_bit_exact(s3: dict[str, Any], tmp_path: Path) -> None:
    so, url = s3["options"], f"s3://{s3['bucket']}/out"
    res = convert(TREE / "Activations", url, to="zarr", storage_options=so)
    assert len(res.splits) == 2
    assert validate(url, deep=True, storage_options=so).errors == 0
    with (
        actfmt.open(TREE / SPLIT_REL) as a,
        actfmt.open(f"{url}/{SPLIT_IN}.zarr", storage_options=so) as b,
    ):
        _same_rows(a, b)
    back = tmp_path / "back"
    convert(url, back, to="pt", storage_options=so)
    assert verify(TREE / "Activations", back).equal
    for f in (TREE / "Activations").rglob("*.pt"):  # the seed's files, tensor for tensor
        twin = back / f.relative_to(TREE / "Activations")
        assert torch.equal(
            _bits(torch.load(f, weights_only=True)), _bits(torch.load(twin, weights_only=True))
        )
    res = CliRunner().invoke(
        cli, ["verify", str(TREE / "Activations"), url, "--storage-options", json.dumps(so)]
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["info", url, "--json", "--storage-options", json.dumps(so)])
    assert res.exit_code == 0 and {r["complete"] for r in json.loads(res.output)["splits"]} == {True}


@pytest.mark.slow
def test_s3_endpoint_from_the_environment(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    url = f"s3://{s3['bucket']}/env"
    _upload(TREE / SPLIT_REL, url, s3["options"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    s3fs.S3FileSystem.clear_instance_cache()
    res = CliRunner().invoke(cli, ["validate", url])  # no --storage-options: botocore reads the endpoint
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_s3_credentials_never_appear_in_messages(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import moto.settings

    url = f"s3://{s3['bucket']}/creds"
    _upload(TREE / SPLIT_REL, url, s3["options"])
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks credentials
    so = dict(s3["options"], key="AKIAEXAMPLEKEYID", secret=SECRET)
    with pytest.raises(RemoteStorageError) as err:
        validate(url, storage_options=so)
    assert "access denied" in str(err.value) and url in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in repr(err.value.args)
    for cmd in (["validate", url], ["info", url], ["convert", url, "/nonexistent-dst", "--to", "pt"]):
        res = CliRunner().invoke(cli, [*cmd, "--storage-options", json.dumps(so)])
        assert res.exit_code == 2 and "actfmt: error:" in res.output, res.output
        assert SECRET not in res.output and "Traceback" not in res.output


def test_memory_is_refused_with_dask() -> None:
    with pytest.raises(ConversionError, match="dask workers cannot see it"):
        convert(TREE / SPLIT_REL, _mem("dask"), to="zarr", executor="dask")


@pytest.mark.slow
def test_s3_round_trip_on_dask_workers(s3: dict[str, Any], tmp_path: Path) -> None:
    """Into and out of the bucket with layer tasks on a dask LocalCluster (worker processes of their own:
    they open the bucket from the pickled URL + storage options and the inherited environment)."""
    pytest.importorskip("distributed")
    so, url = s3["options"], f"s3://{s3['bucket']}/dask"
    res = convert(TREE / "Activations", url, to="zarr", executor="dask", jobs=2, storage_options=so)
    assert res.layers == 6
    local = convert(TREE / "Activations", tmp_path / "local", to="zarr")
    assert res.checksums == local.checksums  # the same bytes as a local conversion
    back = tmp_path / "back"
    convert(url, back, to="pt", executor="dask", jobs=2, storage_options=so)
    assert verify(TREE / "Activations", back).equal
    assert validate(url, deep=True, storage_options=so).errors == 0


@pytest.mark.slow
def test_s3_every_fixture_gives_the_same_findings_as_locally(s3: dict[str, Any]) -> None:
    """Every corpus tree (valid and invalid) uploaded to a bucket validates exactly as its local copy."""
    so = s3["options"]
    cases = [p for p in sorted([*INVALID.iterdir(), *VALID.iterdir()]) if p.is_dir() and _representable(p)]
    for case in cases:
        deep = bool(load_expected(case).get("deep", False)) if (case / "expected.json").is_file() else True
        url = f"s3://{s3['bucket']}/corpus/{case.name}"
        _upload(case / "Activations", f"{url}/Activations", so)
        local = validate(case, deep=deep)
        remote = validate(url, deep=deep, storage_options=so)
        assert [(f.code, f.location, f.severity) for f in remote.findings] == [
            (f.code, f.location, f.severity) for f in local.findings
        ], case.name
        assert (remote.splits, remote.layers, remote.shards) == (local.splits, local.layers, local.shards)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "pt", "safetensors", "hdf5"])
def test_s3_to_dask_on_two_worker_processes(s3: dict[str, Any], fmt: str) -> None:
    """``actfmt.open(s3://...).layer(i).to_dask()`` computes on a cluster of two worker processes, which
    open the bucket from the pickled URL and options (credentials from their environment)."""
    distributed = pytest.importorskip("distributed")
    so, url = s3["options"], f"s3://{s3['bucket']}/dask-{fmt}"
    convert(TREE / SPLIT_REL, url, to=fmt, storage_options=so)
    (store,) = [loc for loc, _ in find_splits(url, so)]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
        actfmt.open(TREE / SPLIT_REL) as a,
        actfmt.open(store) as b,
    ):
        for i in a.layers:
            lazy = b.layer(i).to_dask(chunk_rows=64)
            assert len(lazy.chunks[0]) > 1
            got = client.compute(lazy).result()
            assert torch.equal(_bits(torch.from_numpy(got).view(torch.bfloat16)), _bits(a.layer(i)[:]))
