#!/usr/bin/env python
"""actfmt benchmark: one table of ratios measured in one run, on one machine.

    python benchmarks/run.py [SPLIT] [--work DIR] [--repeat N] [--quick]

Without SPLIT it makes a seed-sized synthetic split (7049 x 4096 x 28 layers, bf16, the producer's 512-row
shards) under --work.  Every ratio compares two things measured here, now: actfmt against the seed loader
(``torch.load`` of every shard + ``torch.cat``) or against ``cp -r``.  Best of --repeat runs, page cache warm.
Lower is better; the "goal" column is the issue's target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import actfmt
from actfmt.convert import convert
from actfmt.formats import get_format
from actfmt.layout import expected_shard_rows, layer_name, shard_name

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-minilm-bf16" / "Activations"
FORMATS = ("zarr", "hdf5", "safetensors")


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_seed_split(path: Path, total: int, hidden: int, layers: int) -> Path:
    if (path / "metadata.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "model_name": "synthetic/Seed-7B",
        "dataset_name": "SP_benchmark",
        "split": path.name,
        "load_in_4bit": False,
        "total_examples": total,
        "shard_size": 512,
        "batch_size": 32,
        "hidden_dim": hidden,
        "num_layers": layers,
    }
    g = torch.Generator().manual_seed(0)
    rows = expected_shard_rows(total, 512, 32)
    for i in range(layers):
        d = tmp / layer_name(i)
        d.mkdir()
        full = (torch.randn(total, hidden, generator=g) * (1 + i / 4)).to(torch.bfloat16)
        start = 0
        for j, n in enumerate(rows):
            torch.save(full[start : start + n].clone(), d / shard_name(j))
            start += n
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(path)
    return path


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def seed_full_layer(split: Path, layer: int) -> torch.Tensor:
    shards = sorted((split / layer_name(layer)).glob("shard_*.pt"))
    return torch.cat([torch.load(s) for s in shards], dim=0)


def seed_rows(split: Path, layer: int, ids: np.ndarray, full_rows: int) -> torch.Tensor:
    out = []
    for i in ids:
        shard = split / layer_name(layer) / shard_name(int(i) // full_rows)
        out.append(torch.load(shard, mmap=True)[int(i) % full_rows])
    return torch.stack(out)


def seed_example(split: Path, layers: int, i: int, full_rows: int) -> torch.Tensor:
    return torch.stack(
        [
            torch.load(split / layer_name(k) / shard_name(i // full_rows), mmap=True)[i % full_rows]
            for k in range(layers)
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", nargs="?", type=Path, help="a .pt split to measure (default: a synthetic one)")
    ap.add_argument(
        "--work", type=Path, default=Path("bench-out"), help="scratch directory (default bench-out)"
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--quick", action="store_true", help="a small synthetic split (1000 x 1024 x 8) for a smoke run"
    )
    ap.add_argument("--keep", action="store_true", help="keep the converted stores")
    args = ap.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.split:
        src = args.split
    elif args.quick:
        src = make_seed_split(work / "quick" / "EM", 1000, 1024, 8)
    else:
        src = make_seed_split(work / "seed" / "EM", 7049, 4096, 28)
    meta = json.loads((src / "metadata.json").read_text())
    n_layers, total = meta["num_layers"], meta["total_examples"]
    full_rows = expected_shard_rows(total, meta["shard_size"], meta["batch_size"])[0]
    size = du(src)
    rows: list[tuple[str, str, str, str]] = []  # operation, format, ratio, goal

    def add(op: str, fmt: str, ratio: float, goal: str, extra: str = "") -> None:
        rows.append((op, fmt, f"{ratio:.3f}" + (f"  ({extra})" if extra else ""), goal))
        print(f"  {op:<40} {fmt:<22} {rows[-1][2]:<34} goal {goal}", file=sys.stderr, flush=True)

    print(
        f"split: {src} ({size / 1e9:.2f} GB, {n_layers} layers x {total} x {meta['hidden_dim']})",
        file=sys.stderr,
    )
    # warm the page cache
    subprocess.run(["cat", *map(str, src.rglob("*.pt"))], stdout=subprocess.DEVNULL, check=True)

    # -- convert vs cp -r ------------------------------------------------------------------------------
    cp_dst = work / "cp-copy"

    def timed(prepare: Callable[[], object], fn: Callable[[], object]) -> float:
        prepare()
        os.sync()  # start every write with no dirty pages pending: no run pays for the previous one's writeback
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def cp_pair() -> tuple[Callable[[], object], Callable[[], object]]:
        return (lambda: shutil.rmtree(cp_dst, ignore_errors=True)), (
            lambda: subprocess.run(["cp", "-r", str(src), str(cp_dst)], check=True)
        )

    reps = max(1, min(args.repeat, 3))
    cp_times: list[float] = []
    stores: dict[str, Path] = {"pt": src}
    for fmt in FORMATS:
        for comp in ("none", None):
            if fmt == "safetensors" and comp is None:
                continue  # no compression in safetensors: the default *is* uncompressed
            out = work / f"conv-{fmt}-{comp or 'default'}"

            def run_convert(out: Path = out, fmt: str = fmt, comp: str | None = comp) -> None:
                convert(src, out, to=fmt, compression=comp, force=True, verify=False)

            # cp -r and the conversion alternate, so both see the same machine state; best of each
            t_cp_here, t = float("inf"), float("inf")
            for _ in range(reps):
                t_cp_here = min(t_cp_here, timed(*cp_pair()))
                t = min(t, timed(lambda out=out: shutil.rmtree(out, ignore_errors=True), run_convert))
            cp_times.append(t_cp_here)
            dest = get_format(fmt).destination(out / src.name)
            ratio = size / du(dest)
            label = f"{fmt} {'uncompressed' if comp == 'none' else 'default codec'}"
            add(
                "convert / cp -r",
                label,
                t / t_cp_here,
                "<= 1.5" if comp == "none" else "-",
                f"{t:.2f} s vs {t_cp_here:.2f} s" + (f", {ratio:.2f}x smaller" if comp is None else ""),
            )
            stores[f"{fmt}{'' if comp == 'none' else '+codec'}"] = dest
    shutil.rmtree(cp_dst, ignore_errors=True)
    t_cp = min(cp_times)

    # -- reads -----------------------------------------------------------------------------------------
    # the conversions above wrote many GB: warm the source again so the seed loader reads from memory too
    subprocess.run(["cat", *map(str, src.rglob("*.pt"))], stdout=subprocess.DEVNULL, check=True)
    layer = n_layers // 2
    t_seed_full = best(lambda: seed_full_layer(src, layer), args.repeat)
    rng = np.random.default_rng(0)
    ids = rng.choice(total, size=min(256, total), replace=False)
    t_seed_rows = best(lambda: seed_rows(src, layer, ids, full_rows), args.repeat)
    ex = int(rng.integers(total))
    t_seed_ex = best(lambda: seed_example(src, n_layers, ex, full_rows), args.repeat)
    print(
        f"  seed loader: full layer {t_seed_full * 1e3:.1f} ms, 256 rows {t_seed_rows * 1e3:.1f} ms, "
        f"example {t_seed_ex * 1e3:.1f} ms",
        file=sys.stderr,
    )
    goals = {
        "full": {
            "pt": "<= 1.0",
            "zarr": "<= 0.6",
            "zarr+codec": "<= 1.2",
            "hdf5": "<= 0.6",
            "safetensors": "<= 0.3",
        },
        "rows": {"pt": "<= 0.05", "zarr": "<= 0.2", "hdf5": "<= 0.3", "safetensors": "<= 0.05"},
        "example": {"pt": "<= 0.5", "zarr": "<= 0.5", "hdf5": "<= 0.5", "safetensors": "<= 0.2"},
    }
    want_full = seed_full_layer(src, layer)
    for label, path in stores.items():
        with actfmt.open(path) as s:
            lv = s.layer(layer)
            got = lv[:]
            assert torch.equal(got.view(torch.int16), want_full.view(torch.int16)), f"{label}: data differs!"
            assert torch.equal(lv[ids].view(torch.int16), want_full[ids].view(torch.int16))
            t_full = best(lambda lv=lv: lv[:], args.repeat)
            t_rows = best(lambda lv=lv: lv[ids], args.repeat)
            t_ex = best(lambda s=s: s.example(ex), args.repeat)
        add("full layer read / seed loader", label, t_full / t_seed_full, goals["full"].get(label, "-"))
        add("256 random rows / seed way", label, t_rows / t_seed_rows, goals["rows"].get(label, "-"))
        add(
            f"one example x {n_layers} layers / seed way",
            label,
            t_ex / t_seed_ex,
            goals["example"].get(label, "-"),
        )

    # -- validation ------------------------------------------------------------------------------------
    def run_py(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    t_import = min(run_py("import torch") for _ in range(3))
    t_val = min(run_py(f"import actfmt; actfmt.validate({str(src)!r})") for _ in range(3))
    add(
        "header-only validate / import torch",
        "pt",
        t_val / t_import,
        "-",
        f"{t_val:.2f} s vs {t_import:.2f} s",
    )
    t0 = time.perf_counter()
    actfmt.validate(src, deep=True)
    t_deep = time.perf_counter() - t0
    rows.append(("--deep validate", "pt", f"{size / 1e9 / t_deep:.2f} GB/s", "-"))

    # -- codecs on real activations ---------------------------------------------------------------------
    if REAL_SAMPLE.exists():
        real = next(p for p in REAL_SAMPLE.rglob("EM") if (p / "metadata.json").is_file())
        real_size = sum(f.stat().st_size for f in real.rglob("*.pt"))
        for fmt, comps in (("zarr", ("zstd", "blosc-zstd", "lz4", "gzip")), ("hdf5", ("gzip", "lzf"))):
            for comp in comps:
                out = work / f"codec-{fmt}-{comp}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                convert(real, out, to=fmt, compression=comp, force=True, verify=False)
                dt = time.perf_counter() - t0
                dest = get_format(fmt).destination(out / real.name)
                rows.append(
                    (
                        f"real bf16 sample: {comp}",
                        fmt,
                        f"{real_size / du(dest):.2f}x, {real_size / 1e6 / dt:.0f} MB/s",
                        "-",
                    )
                )
                shutil.rmtree(out, ignore_errors=True)

    # -- the table ---------------------------------------------------------------------------------------
    print()
    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, actfmt {actfmt.__version__}"
    )
    print(
        f"Split: {n_layers} layers x {total} rows x {meta['hidden_dim']} ({size / 1e9:.2f} GB); "
        f"cp -r {t_cp:.2f} s; seed loader full layer {t_seed_full * 1e3:.0f} ms, 256 rows "
        f"{t_seed_rows * 1e3:.0f} ms, one example {t_seed_ex * 1e3:.0f} ms; best of {args.repeat}"
    )
    print()
    print("| operation | format | ratio | goal |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    if not args.keep:
        for p in work.glob("conv-*"):
            shutil.rmtree(p, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
