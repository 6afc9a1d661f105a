#!/usr/bin/env python
"""Generate the fixture trees under fixtures/ (deterministic: seeded data, pinned torch.save ids).

    python scripts/make_fixtures.py            # rewrite fixtures/valid and fixtures/invalid

fixtures/valid/<case>/Activations/<model>/<dataset>/<split>/   trees that must give zero findings
fixtures/invalid/<CODE>_<slug>/...  + expected.json            one mutation of a valid tree each; expected.json
    lists the exact findings ({"code", "location"} relative to the fixture directory) and "deep": true when
    the rule needs --deep.

fixtures/valid/real_minilm_bf16_slice is a slice of ../shared/data/real-minilm-bf16 (both splits, 3 layers,
200 rows = shards of 80, 80, 40) copied when that sample is present; without it the committed slice is kept.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from actfmt.layout import expected_shard_rows, layer_name, shard_name

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real-minilm-bf16" / "Activations"
REAL_SLICE = "real_minilm_bf16_slice"
PAYLOAD_ENV = "ACTFMT_PAYLOAD_MARKER"

# -- writing ----------------------------------------------------------------------------------------------


def pin_serialization_id(path: Path, value: str) -> None:
    """torch.save writes a random `.data/serialization_id`; replace it (same length) so files are reproducible."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next((i for i in zf.infolist() if i.filename.endswith(".data/serialization_id")), None)
        if info is None:
            return
        old = zf.read(info)
        start_dir = zf.start_dir  # type: ignore[attr-defined]
    new = value.encode().ljust(len(old), b"0")[: len(old)]
    crc = zlib.crc32(new)
    lh = info.header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, lh + 26)
    off = lh + 30 + name_len + extra_len
    data[off : off + len(old)] = new
    struct.pack_into("<I", data, lh + 14, crc)
    p = start_dir
    while data[p : p + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", data, p + 28)
        if data[p + 46 : p + 46 + n].decode() == info.filename:
            struct.pack_into("<I", data, p + 16, crc)
        p += 46 + n + e + c
    path.write_bytes(bytes(data))


def pin_legacy_keys(path: Path) -> None:
    """The legacy format names storages by memory address (`str(storage._cdata)`); renumber them 1, 2, ..."""
    import io
    import pickletools

    data = path.read_bytes()
    f = io.BytesIO(data)
    pickles = [list(pickletools.genops(f)) for _ in range(5)]  # magic, protocol, sys_info, data, storage keys
    head_end = f.tell()
    keys = [arg for op, arg, _ in pickles[4] if isinstance(arg, str)]
    head = data[:head_end]
    for k, key in enumerate(keys, 1):
        head = head.replace(key.encode(), str(k).rjust(len(key), "0").encode())
    path.write_bytes(head + data[head_end:])


def save(obj: Any, path: Path, legacy: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
        pin_legacy_keys(path)
        return
    torch.save(obj, path)
    pin_serialization_id(path, "actfmt-fixture")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def layer_data(seed: int, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, hidden, generator=g) * 2 + 0.5).to(dtype)


def meta(
    model: str,
    dataset: str,
    split: str,
    total: int,
    shard_size: int,
    batch_size: int,
    hidden: int,
    layers: int,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "model_name": model,
        "dataset_name": dataset,
        "split": split,
        "load_in_4bit": False,
        "total_examples": total,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "hidden_dim": hidden,
        "num_layers": layers,
        **extra,
    }


def make_split(
    base: Path, md: dict[str, Any], dtype: torch.dtype, seed: int, legacy: set[tuple[int, int]] = frozenset()
) -> Path:  # type: ignore[assignment]
    """Write one split the way the producer does: Activations/<model>/<dataset>/<split>/."""
    split = base / "Activations" / md["model_name"].replace("/", "_") / md["dataset_name"] / md["split"]
    rows = expected_shard_rows(md["total_examples"], md["shard_size"], md["batch_size"])
    for i in range(md["num_layers"]):
        t = layer_data(seed * 1000 + i, md["total_examples"], md["hidden_dim"], dtype)
        start = 0
        for j, n in enumerate(rows):
            save(t[start : start + n].clone(), split / layer_name(i) / shard_name(j), legacy=(i, j) in legacy)
            start += n
    write_json(split / "metadata.json", md)
    return split


# -- valid cases ------------------------------------------------------------------------------------------


def valid_cases(out: Path) -> None:
    make_split(
        out / "fp16_batch_divides", meta("org/tiny-fp16", "toy_ds", "EM", 70, 32, 16, 16, 3), torch.float16, 1
    )
    make_split(
        out / "bf16_batch_rounds", meta("org/tiny-bf16", "toy_ds", "EM", 50, 16, 6, 8, 3), torch.bfloat16, 2
    )
    make_split(
        out / "fp32_single_shard", meta("org/tiny-fp32", "toy_ds", "EM", 12, 64, 4, 32, 2), torch.float32, 3
    )
    for k, split in enumerate(("EM", "Neutral")):
        make_split(
            out / "em_neutral_pair",
            meta("org/tiny-pair", "pair_ds", split, 40, 16, 8, 8, 2),
            torch.bfloat16,
            4 + k,
        )
    extra = {
        "act_type": "last_token",
        "max_length": 512,
        "prompt_template": "<s>{prompt}",
        "created_at": "2026-01-01T00:00:00Z",
        "notes": None,
    }
    make_split(
        out / "extra_metadata_keys",
        meta("org/tiny-extra", "toy_ds", "EM", 30, 8, 8, 16, 2, **extra),
        torch.float16,
        6,
    )
    make_split(
        out / "legacy_format_shard",
        meta("org/tiny-legacy", "toy_ds", "EM", 40, 16, 16, 8, 2),
        torch.float16,
        7,
        legacy={(1, 1)},
    )


def real_slice(out: Path) -> None:
    """Both splits of the real sample, layers 0-2, first 200 rows (80, 80, 40); metadata adjusted."""
    dest = out / REAL_SLICE
    shutil.rmtree(dest, ignore_errors=True)
    for md_path in sorted(REAL.glob("*/*/*/metadata.json")):
        src = md_path.parent
        md = json.loads(md_path.read_text(encoding="utf-8"))
        md.update(total_examples=200, num_layers=3)
        target = dest / "Activations" / src.relative_to(REAL)
        rows = expected_shard_rows(200, md["shard_size"], md["batch_size"])
        for i in range(3):
            for j, n in enumerate(rows):
                s, d = src / layer_name(i) / shard_name(j), target / layer_name(i) / shard_name(j)
                d.parent.mkdir(parents=True, exist_ok=True)
                t = torch.load(s, weights_only=True, mmap=True)
                if t.shape[0] == n:
                    shutil.copyfile(s, d)
                    d.chmod(0o644)
                else:
                    save(t[:n].clone(), d)
        write_json(target / "metadata.json", md)


# -- invalid cases ----------------------------------------------------------------------------------------

MODEL, DATASET = "org/tiny-model", "toy_ds"
EM = "Activations/org_tiny-model/toy_ds/EM"
NEUTRAL = "Activations/org_tiny-model/toy_ds/Neutral"
BASE = meta(MODEL, DATASET, "EM", 50, 16, 6, 8, 3)  # full shards of 18 = ceil(16 / 6) * 6: rows 18, 18, 14


def base(case: Path, **changes: Any) -> Path:
    return make_split(case, {**BASE, **changes}, torch.bfloat16, 11)


class Evil:
    """Pickles to a call of builtins.exec: writes a marker file when (unsafely) unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        code = (
            f"import os\np = os.environ.get({PAYLOAD_ENV!r})\n"
            "if p:\n    with open(p, 'w') as f:\n        f.write('payload ran')\n"
        )
        return (exec, (code,))


def shard(split: Path, i: int, j: int) -> Path:
    return split / layer_name(i) / shard_name(j)


def edit_meta(split_dir: Path, **changes: Any) -> None:
    md = json.loads((split_dir / "metadata.json").read_text(encoding="utf-8"))
    md.update(changes)
    write_json(split_dir / "metadata.json", md)


def rows_of(p: Path) -> torch.Tensor:
    return torch.load(p, weights_only=True)


INVALID: dict[str, tuple[str, Callable[[Path], None], list[tuple[str, str]], bool]] = {}


def case(name: str, doc: str, findings: list[tuple[str, str]], deep: bool = False):  # type: ignore[no-untyped-def]
    def deco(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        INVALID[name] = (doc, fn, findings, deep)
        return fn

    return deco


@case(
    "ACT001_dangling_symlink",
    "layer_01/shard_001.pt is a symlink to a file that is gone",
    [("ACT001", f"{EM}/layer_01/shard_001.pt")],
)
def _(c: Path) -> None:
    s = base(c)
    shard(s, 1, 1).unlink()
    shard(s, 1, 1).symlink_to("../../../../../lost/shard_001.pt")


@case(
    "ACT005_link_cycle",
    "toy_ds/again is a link back to org_tiny-model, a directory the walk already entered (a loop)",
    [("ACT005", "Activations/org_tiny-model/toy_ds/again")],
)
def _(c: Path) -> None:
    s = base(c)
    (s.parent / "again").symlink_to("..")


@case(
    "ACT002_truncated_shard",
    "layer_02/shard_001.pt cut in half (an interrupted copy)",
    [("ACT002", f"{EM}/layer_02/shard_001.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 2, 1)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@case(
    "ACT002_empty_shard",
    "layer_00/shard_000.pt is 0 bytes (a full disk)",
    [("ACT002", f"{EM}/layer_00/shard_000.pt")],
)
def _(c: Path) -> None:
    shard(base(c), 0, 0).write_bytes(b"")


@case(
    "ACT002_lfs_pointer",
    "layer_01/shard_002.pt is a git-lfs pointer, not the file",
    [("ACT002", f"{EM}/layer_01/shard_002.pt")],
)
def _(c: Path) -> None:
    shard(base(c), 1, 2).write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1431\n"
    )


@case(
    "ACT003_malicious_pickle",
    f"layer_01/shard_000.pt runs builtins.exec when unpickled (writes ${PAYLOAD_ENV})",
    [("ACT003", f"{EM}/layer_01/shard_000.pt")],
)
def _(c: Path) -> None:
    save(Evil(), shard(base(c), 1, 0))


@case(
    "ACT004_dict_shard",
    "layer_00/shard_001.pt holds {'acts': tensor}",
    [("ACT004", f"{EM}/layer_00/shard_001.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 0, 1)
    save({"acts": rows_of(p)}, p)


@case("ACT101_missing_metadata", "metadata.json deleted", [("ACT101", f"{EM}/metadata.json")])
def _(c: Path) -> None:
    (base(c) / "metadata.json").unlink()


@case("ACT102_missing_layer", "layer_01/ deleted", [("ACT102", f"{EM}/layer_01")])
def _(c: Path) -> None:
    shutil.rmtree(base(c) / "layer_01")


@case("ACT103_extra_layer", "layer_03/ from an earlier run of a deeper model", [("ACT103", f"{EM}/layer_03")])
def _(c: Path) -> None:
    s = base(c)
    make_split(c / "tmp", {**BASE, "num_layers": 4}, torch.bfloat16, 12)
    tmp = c / "tmp" / EM
    shutil.move(tmp / "layer_03", s / "layer_03")
    shutil.rmtree(c / "tmp")


@case("ACT104_bad_layer_name", "layer_02 renamed layer_2", [("ACT104", f"{EM}/layer_2")])
def _(c: Path) -> None:
    s = base(c)
    (s / "layer_02").rename(s / "layer_2")


@case(
    "ACT104_bad_shard_names",
    "layer_01/shard_001.pt renamed shard_1.pt, layer_02/shard_000.pt renamed shard_000.pth",
    [("ACT104", f"{EM}/layer_01/shard_1.pt"), ("ACT104", f"{EM}/layer_02/shard_000.pth")],
)
def _(c: Path) -> None:
    s = base(c)
    shard(s, 1, 1).rename(s / "layer_01" / "shard_1.pt")
    shard(s, 2, 0).rename(s / "layer_02" / "shard_000.pth")


@case(
    "ACT105_stray_files",
    "notes.txt in the split, a leftover shard_002.pt.tmp in layer_00",
    [("ACT105", f"{EM}/notes.txt"), ("ACT105", f"{EM}/layer_00/shard_002.pt.tmp")],
)
def _(c: Path) -> None:
    s = base(c)
    (s / "notes.txt").write_text("rerun on node 7\n")
    shutil.copyfile(shard(s, 0, 2), s / "layer_00" / "shard_002.pt.tmp")


@case(
    "ACT201_truncated_json", "metadata.json cut short (no closing brace)", [("ACT201", f"{EM}/metadata.json")]
)
def _(c: Path) -> None:
    p = base(c) / "metadata.json"
    p.write_text(p.read_text()[:-20])


@case("ACT201_json_array", "metadata.json holds a list, not an object", [("ACT201", f"{EM}/metadata.json")])
def _(c: Path) -> None:
    p = base(c) / "metadata.json"
    write_json(p, [json.loads(p.read_text())])


@case("ACT202_missing_key", "batch_size removed from metadata.json", [("ACT202", f"{EM}/metadata.json")])
def _(c: Path) -> None:
    p = base(c) / "metadata.json"
    md = json.loads(p.read_text())
    del md["batch_size"]
    write_json(p, md)


@case(
    "ACT205_missing_producer_key",
    "load_in_4bit and dataset_name removed from metadata.json: a warning, the tree still converts",
    [("ACT205", f"{EM}/metadata.json")],
)
def _(c: Path) -> None:
    p = base(c) / "metadata.json"
    md = json.loads(p.read_text())
    del md["load_in_4bit"], md["dataset_name"]
    write_json(p, md)


@case(
    "ACT203_crash_before_first_batch",
    "the producer crashed before its first batch: hidden_dim and num_layers null, no layer directories",
    [("ACT203", f"{EM}/metadata.json")],
)
def _(c: Path) -> None:
    write_json(c / EM / "metadata.json", {**BASE, "hidden_dim": None, "num_layers": None})


@case("ACT203_string_total", 'total_examples written as the string "50"', [("ACT203", f"{EM}/metadata.json")])
def _(c: Path) -> None:
    edit_meta(base(c), total_examples="50")


@case(
    "ACT204_split_mismatch",
    "metadata says split Neutral but the directory is EM",
    [("ACT204", f"{EM}/metadata.json")],
)
def _(c: Path) -> None:
    edit_meta(base(c), split="Neutral")


@case("ACT204_model_mismatch", "metadata's model_name is another model", [("ACT204", f"{EM}/metadata.json")])
def _(c: Path) -> None:
    edit_meta(base(c), model_name="org/other-model")


@case(
    "ACT301_missing_last_shard", "layer_01/shard_002.pt deleted", [("ACT301", f"{EM}/layer_01/shard_002.pt")]
)
def _(c: Path) -> None:
    shard(base(c), 1, 2).unlink()


@case(
    "ACT302_missing_middle_shard",
    "layer_00/shard_001.pt deleted",
    [("ACT302", f"{EM}/layer_00/shard_001.pt")],
)
def _(c: Path) -> None:
    shard(base(c), 0, 1).unlink()


@case(
    "ACT303_short_shard",
    "layer_01/shard_000.pt lost its last row (17 of 18)",
    [("ACT303", f"{EM}/layer_01/shard_000.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 1, 0)
    save(rows_of(p)[:17].clone(), p)


@case(
    "ACT303_wrong_batch_size",
    "metadata batch_size 8 (full shards of 16) but the producer used 6 (full shards of 18)",
    [("ACT303", f"{EM}/metadata.json")],
)
def _(c: Path) -> None:
    edit_meta(base(c), batch_size=8)


@case(
    "ACT304_short_last_shard",
    "layer_02/shard_002.pt holds 10 rows instead of 14",
    [("ACT304", f"{EM}/layer_02/shard_002.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 2, 2)
    save(rows_of(p)[:10].clone(), p)


@case(
    "ACT305_crash_midway",
    "the producer crashed after two shards; metadata (written in finally:) says total_examples 80",
    [("ACT305", f"{EM}/metadata.json")],
)
def _(c: Path) -> None:
    s = make_split(c, {**BASE, "total_examples": 36}, torch.bfloat16, 11)
    edit_meta(s, total_examples=80)


@case(
    "ACT306_stale_shards",
    "an earlier run of 90 rows left shard_003 and shard_004 in every layer",
    [("ACT306", f"{EM}/{layer_name(i)}/{shard_name(j)}") for i in range(3) for j in (3, 4)],
)
def _(c: Path) -> None:
    make_split(c, {**BASE, "total_examples": 90}, torch.bfloat16, 13)
    base(c)


@case(
    "ACT401_three_d_shard",
    "layer_01/shard_001.pt kept a sequence axis: [18, 1, 8]",
    [("ACT401", f"{EM}/layer_01/shard_001.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 1, 1)
    save(rows_of(p).unsqueeze(1).clone(), p)


@case(
    "ACT402_wrong_width_shard",
    "layer_02/shard_000.pt has 7 columns",
    [("ACT402", f"{EM}/layer_02/shard_000.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 2, 0)
    save(rows_of(p)[:, :7].clone(), p)


@case(
    "ACT402_metadata_hidden_dim",
    "metadata hidden_dim 16, every shard has 8 columns",
    [("ACT402", f"{EM}/metadata.json")],
)
def _(c: Path) -> None:
    edit_meta(base(c), hidden_dim=16)


@case(
    "ACT403_float64_shard",
    "layer_00/shard_002.pt saved as float64",
    [("ACT403", f"{EM}/layer_00/shard_002.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 0, 2)
    save(rows_of(p).to(torch.float64), p)


@case(
    "ACT404_mixed_dtype",
    "layer_01/shard_001.pt is float16 in a bfloat16 split",
    [("ACT404", f"{EM}/layer_01/shard_001.pt")],
)
def _(c: Path) -> None:
    p = shard(base(c), 1, 1)
    save(rows_of(p).to(torch.float16), p)


@case(
    "ACT405_saved_view",
    "layer_00/shard_000.pt saved as a view of the whole 50-row layer",
    [("ACT405", f"{EM}/layer_00/shard_000.pt")],
)
def _(c: Path) -> None:
    s = base(c)
    full = torch.cat([rows_of(shard(s, 0, j)) for j in range(3)])
    save(full[:18], shard(s, 0, 0))


@case(
    "ACT406_nan_inf",
    "layer_01/shard_001.pt holds a NaN and an Inf",
    [("ACT406", f"{EM}/layer_01/shard_001.pt")],
    deep=True,
)
def _(c: Path) -> None:
    p = shard(base(c), 1, 1)
    t = rows_of(p).clone()
    t[3, 2] = float("nan")
    t[5, 0] = float("inf")
    save(t, p)


@case(
    "ACT407_zero_rows",
    "layer_02/shard_000.pt rows 4 and 5 are all zeros",
    [("ACT407", f"{EM}/layer_02/shard_000.pt")],
    deep=True,
)
def _(c: Path) -> None:
    p = shard(base(c), 2, 0)
    t = rows_of(p).clone()
    t[4:6] = 0
    save(t, p)


@case(
    "ACT501_duplicate_layer",
    "layer_02 holds the same data as layer_01 (a hook registered twice)",
    [("ACT501", f"{EM}/layer_02")],
    deep=True,
)
def _(c: Path) -> None:
    s = base(c)
    shutil.rmtree(s / "layer_02")
    shutil.copytree(s / "layer_01", s / "layer_02")


@case(
    "ACT502_split_mismatch",
    "the Neutral split of the same dataset has 44 examples, EM 50",
    [("ACT502", f"{NEUTRAL}/metadata.json")],
)
def _(c: Path) -> None:
    base(c)
    make_split(c, {**BASE, "split": "Neutral", "total_examples": 44}, torch.bfloat16, 14)


@case(
    "ACT408_norm_outlier",
    "row 7 of layer_01/shard_001.pt (of 400 rows) is scaled by 1000 (an overflowing hook): its norm is >100x "
    "the mean row norm",
    [("ACT408", f"{EM}/layer_01")],
    deep=True,
)
def _(c: Path) -> None:
    p = shard(base(c, total_examples=400, shard_size=96, batch_size=32), 1, 1)
    t = rows_of(p).clone()
    t[7] = t[7] * 1000
    save(t, p)


@case(
    "ACT503_identical_splits",
    "the Neutral split is a copy of the EM split (one run written twice under two labels)",
    [("ACT503", NEUTRAL)],
    deep=True,
)
def _(c: Path) -> None:
    s = base(c)
    n = s.parent / "Neutral"
    shutil.copytree(s, n)
    edit_meta(n, split="Neutral")


@case(
    "ACT604_stats_mismatch",
    "a converted Zarr store whose kept row_norm_mean of layer_02 was edited (the data is intact)",
    [("ACT604", "Activations/org_tiny-model/toy_ds/EM.zarr/layer_02")],
    deep=True,
)
def _(c: Path) -> None:
    from actfmt.conversion import convert

    work = c / "_pt"
    base(work)
    convert(work / "Activations", c / "Activations", to="zarr")
    shutil.rmtree(work)
    doc = c / "Activations/org_tiny-model/toy_ds/EM.zarr/zarr.json"
    data = json.loads(doc.read_text(encoding="utf-8"))
    block = data["attributes"]["actfmt"]
    block["created"] = "2026-01-01T00:00:00+00:00"  # deterministic
    block["stats"]["layers"]["layer_02"]["row_norm_mean"] *= 1.001
    doc.write_text(json.dumps(data, indent=2), encoding="utf-8")


@case(
    "ACT007_zarr_key_outside",
    "a converted Zarr store whose layer_01 chunk key separator is '/../../' (its keys name files beside it)",
    [("ACT007", "Activations/org_tiny-model/toy_ds/EM.zarr")],
)
def _(c: Path) -> None:
    from actfmt.conversion import convert

    work = c / "_pt"
    base(work)
    convert(work / "Activations", c / "Activations", to="zarr")
    shutil.rmtree(work)
    store = c / "Activations/org_tiny-model/toy_ds/EM.zarr"
    group = store / "zarr.json"
    data = json.loads(group.read_text(encoding="utf-8"))
    data["attributes"]["actfmt"]["created"] = "2026-01-01T00:00:00+00:00"  # deterministic
    group.write_text(json.dumps(data, indent=2), encoding="utf-8")
    doc = store / "layer_01/zarr.json"
    data = json.loads(doc.read_text(encoding="utf-8"))
    data["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/../../"}}
    doc.write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_case(invalid: Path, name: str) -> None:
    doc, fn, findings, deep = INVALID[name]
    c = invalid / name
    c.mkdir(parents=True)
    fn(c)
    out: dict[str, Any] = {"mutation": doc}
    if deep:
        out["deep"] = True
    out["findings"] = [{"code": code, "location": loc} for code, loc in sorted(findings)]
    write_json(c / "expected.json", out)


def main() -> int:
    if len(sys.argv) > 1:  # only the named invalid cases (the others stay byte for byte as they are)
        for name in sys.argv[1:]:
            shutil.rmtree(ROOT / "invalid" / name, ignore_errors=True)
            write_case(ROOT / "invalid", name)
        return 0
    valid, invalid = ROOT / "valid", ROOT / "invalid"
    if valid.exists():
        for p in valid.iterdir():
            if p.name != REAL_SLICE or REAL.is_dir():
                shutil.rmtree(p)
    shutil.rmtree(invalid, ignore_errors=True)
    valid_cases(valid)
    if REAL.is_dir():
        real_slice(valid)
    for name in INVALID:
        write_case(invalid, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
