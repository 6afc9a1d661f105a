"""Issue 16, the formats side: crafted headers give a finding from ``validate`` and a clean error from the readers
and ``convert`` -- within seconds and bounded memory, never an internal error or a read outside the store.

Every crafted store is made here by code (a valid fixture converted, then one header edited).  The memory bombs
run in a subprocess under ``RLIMIT_AS`` and a timeout.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import actfmt
from actfmt.cli import cli
from actfmt.errors import ActfmtError
from tests.conftest import VALID

SRC = VALID / "em_neutral_pair"
DS = "Activations/org_tiny-pair/pair_ds"
SRC_SPLIT = SRC / DS / "EM"
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5", "safetensors": ""}
#: Address space a bounded subprocess may use: the interpreter with numpy, zarr, h5py and torch imported fits,
#: a bomb (GBs) does not.
LIMIT_MB = 1200
REPO = Path(__file__).resolve().parent.parent


# -- helpers -------------------------------------------------------------------------------------------------
def convert_to(tmp_path: Path, fmt: str, **options: Any) -> Path:
    """The valid EM/Neutral pair converted to ``fmt`` (chunks of 16 rows); returns its EM split."""
    from actfmt.conversion import convert

    dst = tmp_path / fmt
    convert(SRC, dst, to=fmt, chunk_rows=options.pop("chunk_rows", 16), **options)
    return dst / DS / f"EM{SUFFIX[fmt]}"


def tree(store: Path) -> Path:
    """The tree a converted split belongs to (``<fmt>/Activations/org/ds/EM.zarr`` -> ``<fmt>``)."""
    return store.parents[3]


def validate_json(path: Path, *extra: str) -> tuple[int, list[tuple[str, str]], list[dict[str, Any]]]:
    """``actfmt validate PATH --output-format json``: exit code, sorted (code, location) and the issues."""
    result = CliRunner().invoke(cli, ["validate", str(path), "--output-format", "json", *extra])
    assert "internal error" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    doc = json.loads(result.stdout)
    issues = doc["issues"]
    return result.exit_code, sorted((i["code"], i["location"]) for i in issues), issues


def codes(path: Path, *extra: str) -> set[str]:
    code, found, _ = validate_json(path, *extra)
    assert code == 1, found
    return {c for c, _ in found}


def open_clean(split: Path) -> str:
    """``actfmt.open`` and a read either work or raise an ``ActfmtError``: its message, or ``"read"``."""
    try:
        with actfmt.open(split) as s:
            s.layer(0)[0:2]
            s.metadata  # noqa: B018
    except ActfmtError as exc:
        return str(exc)
    return "read"


def drop_shard_rows(store: Path, fmt: int, layer: str) -> None:
    """Remove the shard rows recorded for ``layer`` (array attribute and actfmt block)."""
    if fmt == 3:
        edit_json(store / layer / "zarr.json", lambda d: d["attributes"].pop("actfmt_shard_rows", None))
        edit_json(
            store / "zarr.json", lambda d: d["attributes"]["actfmt"].get("shard_rows", {}).pop(layer, None)
        )
    else:
        edit_json(store / layer / ".zattrs", lambda d: d.pop("actfmt_shard_rows", None))
        edit_json(store / ".zattrs", lambda d: d["actfmt"].get("shard_rows", {}).pop(layer, None))


def open_error(split: Path) -> str:
    """The clean error ``actfmt.open`` (or the first read) raises on a crafted split."""
    with pytest.raises(ActfmtError) as info, actfmt.open(split) as s:
        s.layer(0)[0:2]
        s.layer(s.num_layers - 1)[0:2]
    return str(info.value)


def convert_error(src: Path, dst: Path, to: str = "pt") -> str:
    """``actfmt convert`` exits 2 with a clean message (nothing published)."""
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), "--to", to, "-q"])
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output, result.output
    return result.output


def _limits() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_MB << 20, LIMIT_MB << 20))


def bounded(
    args: list[str], cwd: Path, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python args...`` under an address-space limit and a timeout; returns the process and seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    env["OPENBLAS_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limits,
    )
    return proc, time.perf_counter() - t0


OPEN_SNIPPET = """
import sys, actfmt
from actfmt.errors import ActfmtError
try:
    with actfmt.open(sys.argv[1]) as s:
        for i in range(s.num_layers):
            s.layer(i)[0:2]
        s.layer(0).read()
except ActfmtError as exc:
    print("CLEAN", type(exc).__name__, exc)
    sys.exit(2)
print("READ")
"""


def bounded_checks(store: Path, want: str, deep: bool = False) -> None:
    """validate (json) finds ``want``, and ``actfmt.open`` fails cleanly, each in a bounded subprocess."""
    args = ["-m", "actfmt", "validate", str(store), "--output-format", "json"] + (["--deep"] if deep else [])
    proc, seconds = bounded(args, store.parent)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert want in {i["code"] for i in json.loads(proc.stdout)["issues"]}, proc.stdout
    assert seconds < 30
    proc, seconds = bounded(["-c", OPEN_SNIPPET, str(store)], store.parent)
    assert proc.returncode == 2 and proc.stdout.startswith("CLEAN"), (proc.stdout, proc.stderr[-2000:])
    assert seconds < 30


def edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- zarr ----------------------------------------------------------------------------------------------------
@pytest.fixture(params=[3, 2], ids=["v3", "v2"])
def zarr_em(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, int]:
    return convert_to(tmp_path, "zarr", zarr_format=request.param), request.param


def array_doc(store: Path, layer: str, fmt: int) -> Path:
    return store / layer / ("zarr.json" if fmt == 3 else ".zarray")


def set_chunks(doc: dict[str, Any], fmt: int, chunks: list[int]) -> None:
    if fmt == 3:
        doc["chunk_grid"]["configuration"]["chunk_shape"] = chunks
    else:
        doc["chunks"] = chunks


def test_zarr_trillion_rows_is_bounded_act606(zarr_em: tuple[Path, int]) -> None:
    store, fmt = zarr_em
    edit_json(array_doc(store, "layer_01", fmt), lambda d: d["shape"].__setitem__(0, 10**12))
    bounded_checks(store, "ACT606")
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM.zarr")]
    assert "declares 62500000000 chunks" in issues[0]["message"]  # 10**12 rows / 16 per chunk


def test_zarr_trillion_rows_in_big_chunks_counts_missing_without_looping(zarr_em: tuple[Path, int]) -> None:
    """[10**12, 8] in chunks of 10**6 rows is within the chunk bound: 10**6 chunks missing, counted at once."""
    store, fmt = zarr_em

    def edit(d: dict[str, Any]) -> None:
        d["shape"][0] = 10**12
        set_chunks(d, fmt, [10**6, d["shape"][1]])

    edit_json(array_doc(store, "layer_01", fmt), edit)
    drop_shard_rows(store, fmt, "layer_01")
    t0 = time.perf_counter()
    _, found, issues = validate_json(tree(store))
    assert time.perf_counter() - t0 < 10
    assert ("ACT601", f"{DS}/EM.zarr/layer_01") in found
    missing = next(i for i in issues if i["code"] == "ACT601")
    assert missing["actual"] == 10**6 - 3  # the 3 chunks of the original 40 rows are there


@pytest.mark.parametrize(
    "shape, chunks",
    [
        (None, [0, 8]),
        (None, [-1, 8]),
        ([40, 0], None),
        ([-5, 8], None),
        ([40, 8, 1], None),
        (None, [2**40, 8]),
        ([40, "8"], None),
    ],
    ids=["chunk0", "chunk-1", "width0", "rows-5", "3d", "chunk2**40", "string"],
)
def test_zarr_bad_shapes_are_findings_and_clean_errors(
    zarr_em: tuple[Path, int], tmp_path: Path, shape: list[Any] | None, chunks: list[int] | None
) -> None:
    store, fmt = zarr_em

    def edit(d: dict[str, Any]) -> None:
        if shape is not None:
            d["shape"] = shape
        if chunks is not None:
            set_chunks(d, fmt, chunks)

    edit_json(array_doc(store, "layer_00", fmt), edit)
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM.zarr")], found
    assert "layer_00" in issues[0]["message"]
    open_error(store)
    convert_error(tree(store), tmp_path / "out")


def test_zarr_separator_outside_the_store_is_act007_and_never_read(
    zarr_em: tuple[Path, int], tmp_path: Path
) -> None:
    store, fmt = zarr_em

    def edit(d: dict[str, Any]) -> None:
        if fmt == 3:
            d["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/../../"}}
        else:
            d["dimension_separator"] = "/../../"

    edit_json(array_doc(store, "layer_00", fmt), edit)
    # what the crafted keys would read: c/../../0/../../0 -> files beside the store
    secret = "TOP-SECRET-BESIDE-THE-STORE"
    for name in ("0", "c"):
        (store.parent / name).mkdir(exist_ok=True)
    (store / "layer_00" / "c").mkdir(exist_ok=True)
    (store.parent / "0" / "0").write_text(secret * 10)
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT007", f"{DS}/EM.zarr")]
    assert secret not in json.dumps(issues)
    assert "separator" in open_error(store)


@pytest.mark.parametrize("codec", ["pickle", "json2", "nonsense"], ids=["pickle", "json2", "unknown"])
def test_zarr_unknown_or_object_codec_is_act606(zarr_em: tuple[Path, int], codec: str) -> None:
    store, fmt = zarr_em

    def edit(d: dict[str, Any]) -> None:
        if fmt == 3:
            d["codecs"].append({"name": f"numcodecs.{codec}", "configuration": {}})
        else:
            d["filters"] = [{"id": codec}]

    edit_json(array_doc(store, "layer_01", fmt), edit)
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM.zarr")]
    assert codec in issues[0]["message"]
    assert "codec" in open_error(store)


def _group_doc(store: Path, fmt: int) -> Path:
    return store / ("zarr.json" if fmt == 3 else ".zattrs")


def _set_array_attr(store: Path, fmt: int, layer: str, key: str, value: Any) -> None:
    if fmt == 3:
        edit_json(
            store / layer / "zarr.json", lambda d: d.setdefault("attributes", {}).__setitem__(key, value)
        )
    else:
        path = store / layer / ".zattrs"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = value
        path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "rows", ["million", "negative", "wrong-sum"], ids=["1e6-entries", "negative", "wrong-sum"]
)
def test_zarr_shard_rows_are_bounded(zarr_em: tuple[Path, int], tmp_path: Path, rows: str) -> None:
    store, fmt = zarr_em
    value = {"million": [0] * (10**6 - 1) + [200], "negative": [-40, 240], "wrong-sum": [80, 80]}[rows]
    _set_array_attr(store, fmt, "layer_00", "actfmt_shard_rows", value)
    t0 = time.perf_counter()
    _, found, _ = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM.zarr")]
    assert time.perf_counter() - t0 < 10
    assert "shard" in open_error(store)
    convert_error(tree(store), tmp_path / "out")


def test_zarr_zero_row_layer_is_a_finding(zarr_em: tuple[Path, int]) -> None:
    store, fmt = zarr_em
    edit_json(array_doc(store, "layer_00", fmt), lambda d: d["shape"].__setitem__(0, 0))
    drop_shard_rows(store, fmt, "layer_00")
    _, found, issues = validate_json(tree(store))
    assert ("ACT605", f"{DS}/EM.zarr/layer_00") in found
    assert any("0 rows" in i["message"] for i in issues)
    with actfmt.open(store) as s:  # a 0-row layer reads as 0 rows, not an error
        assert s.layer(0)[0:2].shape[0] == 0


def _gzip_store(tmp_path: Path, fmt: int, dtype: str | None = None) -> Path:
    return convert_to(tmp_path, "zarr", zarr_format=fmt, compression="gzip", dtype=dtype)


def _deflate_zeros(nbytes: int, wbits: int) -> bytes:
    """A deflate stream of ``nbytes`` zero bytes, made in 1 MiB pieces (never ``nbytes`` in memory)."""
    z = zlib.compressobj(9, zlib.DEFLATED, wbits)
    piece = bytes(1 << 20)
    out = [z.compress(piece) for _ in range(nbytes >> 20)]
    out.append(z.flush())
    return b"".join(out)


@pytest.mark.parametrize("fmt", [3, 2])
def test_zarr_chunk_inflating_beyond_its_shape_is_refused_in_bounded_memory(tmp_path: Path, fmt: int) -> None:
    store = _gzip_store(tmp_path, fmt)
    chunk = store / "layer_00" / ("c.0.0" if fmt == 3 else "0.0")
    chunk.write_bytes(_deflate_zeros(1100 << 20, 31))  # 1.1 GB of zeros where 16 rows belong
    assert chunk.stat().st_size < 2 << 20
    proc, seconds = bounded(["-c", OPEN_SNIPPET, str(store)], tmp_path)
    assert proc.returncode == 2 and "CLEAN FormatError" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert "more than" in proc.stdout and seconds < 30
    proc, seconds = bounded(
        ["-m", "actfmt", "validate", str(store), "--deep", "--output-format", "json"], tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    issues = json.loads(proc.stdout)["issues"]
    assert [(i["code"], i["location"]) for i in issues] == [("ACT602", "layer_00")]
    assert "cannot be read" in issues[0]["message"]


def test_zarr_zstd_frame_without_content_size_is_refused(tmp_path: Path) -> None:
    store = convert_to(tmp_path, "zarr", compression="zstd")
    chunk = store / "layer_00" / "c.0.0"
    raw = bytearray(chunk.read_bytes())
    # the frame header descriptor: clear the content-size flag and single-segment bit (a streamed frame)
    raw[4] = raw[4] & 0x1F & ~0x20
    chunk.write_bytes(bytes(raw))
    msg = open_error(store)
    assert "layer_00" in msg


def test_zarr_flipped_byte_is_not_laundered_by_convert(tmp_path: Path) -> None:
    store = convert_to(tmp_path, "zarr", compression="none")
    chunk = store / "layer_01" / "c.1.0"
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0x10
    chunk.write_bytes(bytes(raw))
    _, found, _ = validate_json(tree(store))
    assert found == []  # header-only: nothing to see
    out = convert_error(tmp_path / "zarr", tmp_path / "pt")
    assert "layer_01" in out and "checksum" in out and "not published" in out
    assert not (tmp_path / "pt" / DS / "EM").exists()
    # and with a cast on the way (the source's bytes are still checked)
    result = CliRunner().invoke(
        cli,
        ["convert", str(tmp_path / "zarr"), str(tmp_path / "h5"), "--to", "hdf5", "--dtype", "float32", "-q"],
    )
    assert result.exit_code == 2 and "checksum" in result.output, result.output
    _, found, _ = validate_json(tree(store), "--deep")
    assert found == [("ACT602", f"{DS}/EM.zarr/layer_01")]


def test_zarr_shape_disagreeing_with_metadata_is_act605_and_not_converted(tmp_path: Path) -> None:
    store = convert_to(tmp_path, "zarr")
    edit_json(store / "zarr.json", lambda d: d["attributes"].__setitem__("hidden_dim", 7))
    _, found, _ = validate_json(tree(store), "--deep")
    assert ("ACT605", f"{DS}/EM.zarr/layer_00") in found
    assert ("ACT605", f"{DS}/EM.zarr/layer_01") in found
    convert_error(tmp_path / "zarr", tmp_path / "pt")


# -- JSON ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        '{"total_examples": ' + "9" * 5000 + "}",
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 65 + "1" + "}" * 65,
    ],
    ids=["5000-digits", "100k-deep", "65-deep"],
)
def test_crafted_metadata_json_is_act201(tmp_path: Path, text: str) -> None:
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(SRC, tree)
    (tree / DS / "EM" / "metadata.json").write_text(text)
    _, found, _ = validate_json(tree)
    assert ("ACT201", f"{DS}/EM/metadata.json") in found
    assert "metadata.json" in open_clean(tree / DS / "EM")


@pytest.mark.parametrize("fmt", [3, 2])
def test_crafted_zarr_documents_are_findings(tmp_path: Path, fmt: int) -> None:
    store = convert_to(tmp_path, "zarr", zarr_format=fmt)
    doc = store / "layer_00" / ("zarr.json" if fmt == 3 else ".zattrs")
    doc.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, found, _ = validate_json(tree(store))
    assert code == 1 and found
    open_error(store)
    group = store / ("zarr.json" if fmt == 3 else ".zattrs")
    group.write_text('{"attributes": {"total_examples": ' + "9" * 5000 + "}}")
    code, found, _ = validate_json(tree(store))
    assert code == 1 and found


def test_the_json_loader_bounds() -> None:
    from actfmt.layout import JSONLimitError, loads_json

    assert loads_json(b'{"a": [1, 2.5, NaN]}')["a"][:2] == [1, 2.5]
    assert loads_json("9" * 30) == int("9" * 30)
    for bad in ("9" * 31, "[" * 65 + "]" * 65, "[" * 100_000 + "]" * 100_000):
        with pytest.raises(JSONLimitError):
            loads_json(bad)
    assert loads_json("[" * 64 + "]" * 64)
    with pytest.raises(JSONLimitError):
        loads_json(b" " * 11, max_bytes=10)


# -- HDF5 ----------------------------------------------------------------------------------------------------
def _h5(tmp_path: Path) -> Path:
    return convert_to(tmp_path, "hdf5")


def _replace_layer(path: Path, name: str, make: Any) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        make(f, name)
        obj = f.get(name, getlink=True)
        if isinstance(obj, h5py.HardLink):
            for k, v in attrs.items():
                f[name].attrs[k] = v


@pytest.mark.parametrize("target", ["absolute", "relative-fifo"])
def test_hdf5_external_storage_is_act007_and_never_read(tmp_path: Path, target: str) -> None:
    store = _h5(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"TOP-SECRET" * 64)
    if target == "absolute":
        ext = str(secret)
    else:  # relative paths resolve against the current directory: a FIFO there would hang a read
        ext = "ext.fifo"
        os.mkfifo(tmp_path / ext)
    _replace_layer(
        store,
        "layer_01",
        lambda f, n: f.create_dataset(n, shape=(40, 8), dtype="<u2", external=[(ext, 0, 640)]),
    )
    proc, seconds = bounded(
        ["-m", "actfmt", "validate", str(store), "--deep", "--output-format", "json"], tmp_path, 30
    )
    assert proc.returncode == 1 and seconds < 30, proc.stderr[-2000:]
    issues = json.loads(proc.stdout)["issues"]
    assert [i["code"] for i in issues] == ["ACT007"]
    assert "TOP-SECRET" not in proc.stdout
    proc, _ = bounded(["-c", OPEN_SNIPPET, str(store)], tmp_path, 30)
    assert proc.returncode == 2 and "CLEAN ExternalDataError" in proc.stdout, (proc.stdout, proc.stderr)
    result = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "hdf5"), str(tmp_path / "pt"), "--to", "pt", "-q"]
    )
    assert result.exit_code == 2 and "TOP-SECRET" not in result.output


def test_hdf5_virtual_dataset_and_external_link_are_act007(tmp_path: Path) -> None:
    import h5py

    store = _h5(tmp_path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[[7] * 8] * 40, dtype="<u2")

    def virtual(f: Any, n: str) -> None:
        layout = h5py.VirtualLayout(shape=(40, 8), dtype="<u2")
        layout[:] = h5py.VirtualSource(str(other), "x", shape=(40, 8))
        f.create_virtual_dataset(n, layout)

    _replace_layer(store, "layer_00", virtual)
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT007", f"{DS}/EM.h5")] and "virtual" in issues[0]["message"]
    assert "virtual" in open_error(store)
    _replace_layer(store, "layer_00", lambda f, n: f.__setitem__(n, h5py.ExternalLink(str(other), "/x")))
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT007", f"{DS}/EM.h5")] and "external link" in issues[0]["message"]
    assert "external link" in open_error(store)


def test_hdf5_soft_link_cycle_is_act606(tmp_path: Path) -> None:
    import h5py

    store = _h5(tmp_path)
    with h5py.File(store, "r+") as f:
        del f["layer_01"]
        f["layer_01"] = h5py.SoftLink("/layer_02")
        f["layer_02"] = h5py.SoftLink("/layer_01")
    t0 = time.perf_counter()
    _, found, issues = validate_json(tree(store))
    assert ("ACT606", f"{DS}/EM.h5") in found and "soft link" in issues[0]["message"]
    assert time.perf_counter() - t0 < 10
    assert "soft link" in open_error(store)


@pytest.mark.parametrize("layout", ["chunked", "contiguous"])
def test_hdf5_declared_2_40_rows_is_bounded_act606(tmp_path: Path, layout: str) -> None:
    store = _h5(tmp_path)
    chunks = (1024, 8) if layout == "chunked" else None
    _replace_layer(
        store, "layer_01", lambda f, n: f.create_dataset(n, shape=(2**40, 8), dtype="<u2", chunks=chunks)
    )
    assert store.stat().st_size < 1 << 20
    bounded_checks(store, "ACT606")


def test_hdf5_gzip_chunk_inflating_to_1_1_gb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    import h5py

    store = _h5(tmp_path)  # gzip + shuffle, chunks of 16 rows
    with h5py.File(store, "r+") as f:
        assert f["layer_00"].compression == "gzip"
        f["layer_00"].id.write_direct_chunk((0, 0), _deflate_zeros(1100 << 20, 15), filter_mask=0)
    assert store.stat().st_size < 4 << 20
    proc, seconds = bounded(["-c", OPEN_SNIPPET, str(store)], tmp_path)
    assert proc.returncode == 2 and "CLEAN FormatError" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert "more than" in proc.stdout and seconds < 30
    proc, seconds = bounded(
        ["-m", "actfmt", "validate", str(store), "--deep", "--output-format", "json"], tmp_path
    )
    assert proc.returncode == 1 and seconds < 30, proc.stderr[-2000:]
    assert [i["code"] for i in json.loads(proc.stdout)["issues"]] == ["ACT602"]


def test_hdf5_shard_rows_are_bounded(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    store = _h5(tmp_path)
    with h5py.File(store, "r+") as f:
        f["layer_00"].attrs["actfmt_shard_rows"] = np.array([-1] * 10 + [250], dtype=np.int64)
    _, found, _ = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM.h5")]
    assert "shard" in open_error(store)


# -- safetensors ---------------------------------------------------------------------------------------------
def _st_file(path: Path, header: dict[str, Any], data: bytes, raw: bytes | None = None) -> None:
    body = raw if raw is not None else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)


GOOD = {"dtype": "BF16", "shape": [40, 8], "data_offsets": [0, 640]}
CRAFTED_ST = {
    "shape-1e400": ({**GOOD, "shape": [1e400, 8]}, None),
    "shape-strings": ({**GOOD, "shape": ["40", "8"]}, None),
    "shape-bool": ({**GOOD, "shape": [True, 8]}, None),
    "shape-float": ({**GOOD, "shape": [40.0, 8]}, None),
    "shape-negative": ({**GOOD, "shape": [-40, -8]}, None),
    "dtype-unknown": ({**GOOD, "dtype": "Q8"}, None),
    "offsets-inconsistent": ({**GOOD, "data_offsets": [0, 600]}, None),
    "offsets-start": ({**GOOD, "data_offsets": [40, 680]}, None),
    "offsets-strings": ({**GOOD, "data_offsets": ["0", "640"]}, None),
    "trailing-bytes": (GOOD, b"\0" * 64),
    "digits": (
        None,
        b'{"activations": {"dtype": "BF16", "shape": [' + b"9" * 5000 + b', 8], "data_offsets": [0, 640]}}',
    ),
    "deep": (None, b'{"__metadata__": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_ST))
def test_safetensors_headers_as_strict_as_the_library(tmp_path: Path, case: str) -> None:
    from safetensors import safe_open

    store = convert_to(tmp_path, "safetensors")
    layer = store / "layer_01.safetensors"
    header, extra = CRAFTED_ST[case]
    if header is None:
        _st_file(layer, {}, bytes(640), raw=extra)
    else:
        _st_file(layer, {"activations": header}, bytes(640) + (extra or b""))
    # the library refuses it (whatever its exception type)
    with pytest.raises(Exception), safe_open(str(layer), framework="pt") as f:  # noqa: B017
        f.get_tensor("activations")
    _, found, _ = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM")], found
    open_error(store)
    convert_error(tmp_path / "safetensors", tmp_path / "pt")


def test_safetensors_valid_header_is_accepted_by_both(tmp_path: Path) -> None:
    from safetensors import safe_open

    store = convert_to(tmp_path, "safetensors")
    layer = store / "layer_01.safetensors"
    with safe_open(str(layer), framework="pt") as f:
        assert list(f.get_tensor("activations").shape) == [40, 8]
    _, found, _ = validate_json(tree(store))
    assert found == []


def test_safetensors_header_length_beyond_the_file_is_act606(tmp_path: Path) -> None:
    store = convert_to(tmp_path, "safetensors")
    layer = store / "layer_00.safetensors"
    layer.write_bytes((10**12).to_bytes(8, "little") + b"{}      ")
    _, found, _ = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM")]
    open_error(store)


# -- pt ------------------------------------------------------------------------------------------------------
def _rezip(src: Path, dst: Path, edit_pickle: Any = None, deflate: bool = False) -> None:
    import zipfile

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if edit_pickle is not None and info.filename.endswith("/data.pkl"):
                data = edit_pickle(data)
            method = zipfile.ZIP_DEFLATED if deflate and "/data/" in info.filename else zipfile.ZIP_STORED
            out.writestr(info.filename, data, compress_type=method)


@pytest.mark.parametrize("crafted", ["negative-offset", "deflated-record"])
def test_pt_shards_torch_would_misread_are_act002(tmp_path: Path, crafted: str) -> None:
    import shutil

    import torch

    tree = tmp_path / "tree"
    shutil.copytree(SRC, tree)
    shard = tree / DS / "EM" / "layer_01" / "shard_000.pt"
    good = tmp_path / "good.pt"
    shutil.copy(shard, good)
    if crafted == "negative-offset":
        # the storage offset is the pickle's first BININT1 0 after the storage: make it -32 (BININT)
        def edit(data: bytes) -> bytes:
            assert b"QK\x00K" in data
            return data.replace(b"QK\x00K", b"QJ\xe0\xff\xff\xffK", 1)

        _rezip(good, shard, edit_pickle=edit)
        with pytest.raises(RuntimeError, match="storage offset"):
            torch.load(shard, weights_only=True)
    else:
        _rezip(good, shard, deflate=True)
        # what torch's memory-mapped loader does with it: reads the compressed bytes as values
        assert not torch.equal(
            torch.load(shard, weights_only=True, mmap=True), torch.load(good, weights_only=True)
        )
    _, found, issues = validate_json(tree)
    assert found == [("ACT002", f"{DS}/EM/layer_01/shard_000.pt")], found
    assert ("compressed" in issues[0]["message"]) == (crafted == "deflated-record")
    msg = open_error(tree / DS / "EM")
    assert ("compressed" in msg) == (crafted == "deflated-record")


@pytest.mark.parametrize("shuffle", [False, True])
def test_hdf5_gzip_bomb_in_another_layout_is_refused_before_hdf5_inflates_it(
    tmp_path: Path, shuffle: bool
) -> None:
    """Chunks narrower than a row (not actfmt's layout) are decoded by HDF5's own pipeline: each is inflated
    with a bound first."""
    import h5py
    import numpy as np

    store = _h5(tmp_path)
    _replace_layer(
        store,
        "layer_00",
        lambda f, n: f.create_dataset(
            n, data=np.zeros((40, 8), np.uint16), chunks=(16, 4), compression="gzip", shuffle=shuffle
        ),
    )
    with h5py.File(store, "r+") as f:
        f["layer_00"].id.write_direct_chunk((16, 4), _deflate_zeros(1100 << 20, 15), filter_mask=0)
    proc, seconds = bounded(["-c", OPEN_SNIPPET, str(store)], tmp_path)
    assert proc.returncode == 2 and "CLEAN FormatError" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert "row 16, column 4" in proc.stdout and seconds < 30
    with actfmt.open(store) as s:  # rows in the chunks that are sound still read
        assert s.layer(0)[0:16].shape == (16, 8)
        with pytest.raises(ActfmtError, match="inflates to more than"):
            s.layer(0)[[3, 20]]


ZARR_PYTHON_HEADERS = {
    "no-array-bytes-codec": (3, lambda d: {**d, "codecs": []}),
    "fill-value-nan-on-ints": (3, lambda d: {**d, "fill_value": "NaN"}),
    "unknown-chunk-grid": (
        3,
        lambda d: {**d, "chunk_grid": {"name": "rectilinear", "configuration": {"chunk_shape": [16, 8]}}},
    ),
    "compressor-a-string": (2, lambda d: {**d, "compressor": "blosc"}),
}


@pytest.mark.parametrize("case", sorted(ZARR_PYTHON_HEADERS))
def test_zarr_headers_left_to_zarr_python_are_act606_not_internal_errors(tmp_path: Path, case: str) -> None:
    fmt, edit = ZARR_PYTHON_HEADERS[case]
    store = convert_to(tmp_path, "zarr", zarr_format=fmt)
    doc = array_doc(store, "layer_00", fmt)
    doc.write_text(json.dumps(edit(json.loads(doc.read_text()))))
    _, found, issues = validate_json(tree(store))
    assert found == [("ACT606", f"{DS}/EM.zarr")], found
    assert "zarr-python cannot read" in issues[0]["message"]
    assert "zarr-python" in open_error(store)
    convert_error(tree(store), tmp_path / "pt")


def test_zarr_chunk_zarr_python_cannot_decode_is_a_clean_error(tmp_path: Path) -> None:
    """A sharded array whose index checksum does not match: zarr-python's ValueError is a FormatError."""
    # float16: a dtype zarr-python reads (it has no bfloat16), so the sharded array is left to it
    store = convert_to(tmp_path, "zarr", dtype="float16")
    sharding = {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [4, 8],
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        },
    }
    edit_json(array_doc(store, "layer_00", 3), lambda d: d.__setitem__("codecs", [sharding]))
    _, found, _ = validate_json(tree(store))
    assert found == []  # the header is one zarr-python reads
    _, found, issues = validate_json(tree(store), "--deep")
    assert found == [("ACT602", f"{DS}/EM.zarr/layer_00")]
    assert "zarr-python cannot read" in issues[0]["message"]
    assert "zarr-python cannot read" in open_error(store)
    convert_error(tree(store), tmp_path / "pt")


@pytest.mark.parametrize("link", ["external", "soft-loop"])
def test_hdf5_links_in_the_statistics_group_are_findings_header_only(tmp_path: Path, link: str) -> None:
    import h5py

    store = _h5(tmp_path)
    with h5py.File(store, "r+") as f:
        del f["actfmt_stats"]
        target = (
            h5py.ExternalLink("/etc/passwd", "/x") if link == "external" else h5py.SoftLink("/actfmt_stats")
        )
        f["actfmt_stats"] = target
    _, found, _ = validate_json(tree(store))
    assert found == [("ACT007" if link == "external" else "ACT606", f"{DS}/EM.h5")]
    open_error(store)


def test_writers_refuse_chunks_the_readers_would_refuse() -> None:
    from actfmt.errors import ConversionError
    from actfmt.formats.base import MAX_CHUNK_BYTES, MAX_CHUNKS, LayerInfo, check_write_chunks

    wide = LayerInfo("layer_00", 0, 10**7, 4096, "bfloat16")
    check_write_chunks("x", MAX_CHUNK_BYTES // wide.row_bytes, wide)  # at the bound: fine
    with pytest.raises(ConversionError, match="--chunk-rows 32768 or less"):
        check_write_chunks("x", MAX_CHUNK_BYTES // wide.row_bytes + 1, wide)
    tall = LayerInfo("layer_00", 0, 4 * MAX_CHUNKS, 8, "float16")
    with pytest.raises(ConversionError, match="--chunk-rows 4 or more"):
        check_write_chunks("x", 2, tall)


def test_pt_zip_record_beyond_the_file_is_act002(tmp_path: Path) -> None:
    import shutil
    import struct

    tree = tmp_path / "tree"
    shutil.copytree(SRC, tree)
    shard = tree / DS / "EM" / "layer_00" / "shard_001.pt"
    data = bytearray(shard.read_bytes())
    p = data.rindex(b"PK\x05\x06")  # end of central directory: where the directory starts
    cd = struct.unpack_from("<I", data, p + 16)[0]
    while data[cd : cd + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", data, cd + 28)
        if data[cd + 46 : cd + 46 + n].decode().endswith("/data/0"):
            struct.pack_into("<II", data, cd + 20, 10**9, 10**9)  # compressed and uncompressed sizes
        cd += 46 + n + e + c
    shard.write_bytes(bytes(data))
    _, found, issues = validate_json(tree)
    assert found == [("ACT002", f"{DS}/EM/layer_00/shard_001.pt")], found
    assert "beyond the end of the file" in issues[0]["message"]
    assert "beyond the end" in open_error(tree / DS / "EM")


@pytest.mark.parametrize("fmt", [3, 2])
def test_zarr_bomb_in_a_layout_left_to_zarr_python_is_refused_in_bounded_memory(
    tmp_path: Path, fmt: int
) -> None:
    """A fill value other than 0 makes actfmt leave the array to zarr-python: its chunks are checked first."""
    store = _gzip_store(tmp_path, fmt, dtype="float16")  # a dtype zarr-python reads (it has no bfloat16)
    edit_json(array_doc(store, "layer_00", fmt), lambda d: d.__setitem__("fill_value", 3))
    chunk = store / "layer_00" / ("c.0.0" if fmt == 3 else "0.0")
    with actfmt.open(store) as s:  # the layout reads through zarr-python as it is
        assert s.layer(0)[0:2].shape == (2, 8)
    chunk.write_bytes(_deflate_zeros(1100 << 20, 31))
    proc, seconds = bounded(["-c", OPEN_SNIPPET, str(store)], tmp_path)
    assert proc.returncode == 2 and "CLEAN FormatError" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert "more than" in proc.stdout and seconds < 30
