#!/usr/bin/env python
"""actfmt benchmark: ratios measured in one run, on one machine, the way a user waits.

    python benchmarks/run.py [SPLIT] [--work DIR] [--repeat N] [--quick] [--only convert,demo,reads,validate,stats]

Without SPLIT it makes a seed-sized synthetic split (7049 x 4096 x 28 layers, bf16, the producer's 512-row
shards; 1.6 GB) under --work.  --work must be on the filesystem the user converts on (the default is
``bench-out`` beside this repository, on the same disk as the split): conversions write there, not to tmpfs.

* **convert**: ``actfmt convert`` run as a process (start-up included), alternating with ``cp -r`` of the same
  source into the same filesystem, ``sync`` before each run so no run pays for another's writeback; the median
  and the spread (min-max) of --repeat runs of each, and the ratio of the medians.  Each conversion prints, from
  its ``--output-format json`` result, where its time went: start-up (process wall time minus the time inside
  ``convert``), source validation, and the thread-seconds of reading + hashing, writing and verifying.  Peak RSS
  per run from ``wait4``.  Outputs are compared bit for bit with the source (``actfmt verify``) once.
* **demo**: converting the demo fixture (0.9 MB) to each format, as a process: median wall time.
* **reads** (in process, page cache warm, best of --repeat): full layer, 256 random rows and one example
  across all layers, against the seed guide's loader (``torch.load`` + ``torch.cat``).
* **validate**: header-only validation as a process against a bare ``import torch``; ``--deep`` GB/s.
* **stats**: ``actfmt stats --no-pairs`` as a process on the split (page cache warm): GB/s end to end; and on a
  converted store, which keeps the figures; and the statistics kernel alone (``benchmarks/kernel.py`` compares
  its means).  The convert section's ``--no-stats`` rows give what computing the
  statistics during a conversion costs.

Lower is better; the "goal" column is the issue's target.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "real-minilm-bf16" / "Activations"
DEMO = REPO / "fixtures" / "valid" / "real_minilm_bf16_slice" / "Activations"
ACTFMT = [sys.executable, "-m", "actfmt"]
if shutil.which("actfmt", path=str(Path(sys.executable).parent)):
    ACTFMT = [str(Path(sys.executable).parent / "actfmt")]


def make_seed_split(path: Path, total: int, hidden: int, layers: int) -> Path:
    """The producer's layout: 512-row shards (batch 32), bf16, written with torch.save."""
    import torch

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
    from actfmt.layout import expected_shard_rows, layer_name, shard_name

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


def warm(path: Path) -> None:
    subprocess.run(
        ["cat", *map(str, (p for p in path.rglob("*") if p.is_file()))], stdout=subprocess.DEVNULL, check=True
    )


def timed_process(cmd: Sequence[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    rss = 0
    try:  # the child is reaped by communicate(); RUSAGE_CHILDREN's maximum covers it
        import resource

        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    except (ImportError, OSError):
        pass
    if proc.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, rss, out


def peak_rss(cmd: Sequence[str]) -> int:
    """Peak RSS of one run of ``cmd`` alone (``/usr/bin/time -f %M`` where available)."""
    if shutil.which("time") is None and not Path("/usr/bin/time").exists():
        return 0
    res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    try:
        return int(res.stderr.strip().splitlines()[-1]) * 1024
    except (ValueError, IndexError):
        return 0


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cols: str) -> None:
        self.rows.append(cols)
        print("  " + " | ".join(cols), file=sys.stderr, flush=True)

    def print(self, header: Sequence[str]) -> None:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in self.rows:
            print("| " + " | ".join(r) + " |")
        print()


def bench_convert(src: Path, work: Path, repeat: int, formats: Sequence[str]) -> None:
    """``actfmt convert`` as a process vs ``cp -r``, interleaved, on the source's filesystem."""
    cp_dst = work / "cp-copy"
    out = work / "conv"
    table = Table()
    cases: list[tuple[str, Path, str, list[str], str]] = []
    for fmt in formats:
        cases.append((f"{fmt} uncompressed", src, fmt, ["--compression", "none"], "<= 1.5"))
        cases.append(
            (
                f"{fmt} uncompressed --no-stats",
                src,
                fmt,
                ["--compression", "none", "--no-stats"],
                "stats <= +10 %",
            )
        )
        cases.append(
            (f"{fmt} uncompressed --no-verify", src, fmt, ["--compression", "none", "--no-verify"], "<= 1.2")
        )
        if fmt != "safetensors":
            cases.append((f"{fmt} default codec", src, fmt, [], "<= 3"))
    stores: dict[str, Path] = {}
    for label, source, fmt, extra, goal in cases:
        if label.endswith("uncompressed") and "from" not in label:
            stores[fmt] = work / f"store-{fmt}"
        times, cps, rss, phases = [], [], 0, []
        for _ in range(repeat):
            shutil.rmtree(cp_dst, ignore_errors=True)
            os.sync()
            cps.append(timed_process(["cp", "-r", str(source), str(cp_dst)])[0])
            shutil.rmtree(cp_dst, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            cmd = [
                *ACTFMT,
                "convert",
                str(source),
                str(out),
                "--to",
                fmt,
                "--force",
                "-q",
                "--output-format",
                "json",
                *extra,
            ]
            wall, _, stdout = timed_process(cmd)
            times.append(wall)
            result = json.loads(stdout)
            phases.append({"startup": wall - result["seconds"], **result.get("timings", {})})
        rss = peak_rss(
            [
                *ACTFMT,
                "convert",
                str(source),
                str(work / "rss"),
                "--to",
                fmt,
                "--force",
                "-q",
                "--overwrite",
                *extra,
            ]
        )
        shutil.rmtree(work / "rss", ignore_errors=True)
        if fmt in stores and extra == ["--compression", "none"]:  # the default run's store (statistics kept)
            shutil.rmtree(stores[fmt], ignore_errors=True)
            shutil.move(str(out), stores[fmt])
        shutil.rmtree(out, ignore_errors=True)
        ratio = statistics.median(times) / statistics.median(cps)
        where = ", ".join(
            f"{k} {statistics.median([p.get(k, 0.0) for p in phases]):.2f}"
            for k in ("startup", "validate", "read", "stats", "write", "verify")
        )
        table.add(label, f"{ratio:.2f}", spread(times), spread(cps), f"{rss / 1e9:.2f} GB", where, goal)
    # back to pt from each store
    for fmt, store in stores.items():
        if not store.exists():
            continue
        times, cps, phases = [], [], []
        for _ in range(repeat):
            shutil.rmtree(cp_dst, ignore_errors=True)
            os.sync()
            cps.append(timed_process(["cp", "-r", str(store), str(cp_dst)])[0])
            shutil.rmtree(cp_dst, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            wall, _, stdout = timed_process(
                [
                    *ACTFMT,
                    "convert",
                    str(store),
                    str(out),
                    "--to",
                    "pt",
                    "--force",
                    "-q",
                    "--output-format",
                    "json",
                ]
            )
            times.append(wall)
            result = json.loads(stdout)
            phases.append({"startup": wall - result["seconds"], **result.get("timings", {})})
        same = subprocess.run([*ACTFMT, "verify", str(src), str(out), "-q"], capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
        shutil.rmtree(out, ignore_errors=True)
        ratio = statistics.median(times) / statistics.median(cps)
        where = ", ".join(
            f"{k} {statistics.median([p.get(k, 0.0) for p in phases]):.2f}"
            for k in ("startup", "validate", "read", "write", "verify")
        )
        table.add(f"pt from {fmt}", f"{ratio:.2f}", spread(times), spread(cps), "", where, "<= 1.5")
    print("### Convert, `actfmt convert` as a process / `cp -r` (same filesystem, interleaved)\n")
    table.print(
        [
            "conversion",
            "ratio (medians)",
            "actfmt: median (min-max)",
            "cp -r: median (min-max)",
            "peak RSS",
            "where the time went (s; thread-seconds for read/write/verify)",
            "goal",
        ]
    )


def bench_demo(work: Path, repeat: int) -> None:
    table = Table()
    for fmt in ("zarr", "hdf5", "safetensors", "pt"):
        times = []
        for _ in range(repeat):
            out = work / "demo"
            shutil.rmtree(out, ignore_errors=True)
            times.append(timed_process([*ACTFMT, "convert", str(DEMO), str(out), "--to", fmt, "-q"])[0])
        shutil.rmtree(work / "demo", ignore_errors=True)
        table.add(fmt, spread(times), "<= 0.3 s")
    print(f"### The demo fixture ({du(DEMO) / 1e6:.1f} MB), `actfmt convert` as a process\n")
    table.print(["to", "wall time: median (min-max)", "goal"])


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_reads(src: Path, work: Path, repeat: int) -> None:
    import numpy as np
    import torch

    import actfmt
    from actfmt.formats import find_splits
    from actfmt.layout import expected_shard_rows, layer_name, shard_name

    meta = json.loads((src / "metadata.json").read_text())
    n_layers, total = meta["num_layers"], meta["total_examples"]
    full_rows = expected_shard_rows(total, meta["shard_size"], meta["batch_size"])[0]
    stores: dict[str, Path] = {"pt": src}
    for fmt, comp in (("zarr", "none"), ("zarr", None), ("hdf5", "none"), ("safetensors", None)):
        label = fmt if comp == "none" or fmt == "safetensors" else f"{fmt}+codec"
        out = work / f"read-{label}"
        if not out.exists():
            actfmt.convert(src, out, to=fmt, compression=comp, force=True)
        (store,) = [p for p, _ in find_splits(out)]
        stores[label] = Path(str(store))
    warm(src)
    layer = n_layers // 2

    def seed_full() -> torch.Tensor:
        return torch.cat([torch.load(s) for s in sorted((src / layer_name(layer)).glob("shard_*.pt"))])

    rng = np.random.default_rng(0)
    ids = rng.choice(total, size=min(256, total), replace=False)
    ex = int(rng.integers(total))

    def seed_rows() -> torch.Tensor:
        return torch.stack(
            [
                torch.load(src / layer_name(layer) / shard_name(int(i) // full_rows), mmap=True)[
                    int(i) % full_rows
                ]
                for i in ids
            ]
        )

    def seed_example() -> torch.Tensor:
        return torch.stack(
            [
                torch.load(src / layer_name(k) / shard_name(ex // full_rows), mmap=True)[ex % full_rows]
                for k in range(n_layers)
            ]
        )

    t_full, t_rows, t_ex = best(seed_full, repeat), best(seed_rows, repeat), best(seed_example, repeat)
    want = seed_full()
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
    table = Table()
    for label, path in stores.items():
        with actfmt.open(path) as s:
            lv = s.layer(layer)
            assert torch.equal(lv[:].view(torch.int16), want.view(torch.int16)), label
            assert torch.equal(lv[ids].view(torch.int16), want[ids].view(torch.int16)), label
            r_full = best(lambda lv=lv: lv[:], repeat) / t_full
            r_rows = best(lambda lv=lv: lv[ids], repeat) / t_rows
            r_ex = best(lambda s=s: s.example(ex), repeat) / t_ex
        table.add(
            label,
            f"{r_full:.3f} ({goals['full'].get(label, '-')})",
            f"{r_rows:.3f} ({goals['rows'].get(label, '-')})",
            f"{r_ex:.3f} ({goals['example'].get(label, '-')})",
        )
    print(
        f"### Reads, in process, page cache warm, best of {repeat} / the seed loader (full layer {t_full * 1e3:.0f} ms, "
        f"256 rows {t_rows * 1e3:.0f} ms, one example {t_ex * 1e3:.1f} ms)\n"
    )
    table.print(
        ["store", "full layer (goal)", "256 random rows (goal)", f"one example x {n_layers} layers (goal)"]
    )


def bench_validate(src: Path, repeat: int) -> None:
    table = Table()
    t_import = min(timed_process([sys.executable, "-c", "import torch"])[0] for _ in range(repeat))
    t_val = min(timed_process([*ACTFMT, "validate", str(src), "-q"])[0] for _ in range(repeat))
    table.add(
        "header-only `actfmt validate` / `python -c 'import torch'`",
        f"{t_val / t_import:.2f}",
        f"{t_val:.2f} s vs {t_import:.2f} s",
    )
    warm(src)
    t_deep = min(
        timed_process([*ACTFMT, "validate", str(src), "--deep", "-q", "-j", "2"])[0] for _ in range(repeat)
    )
    table.add(
        "`actfmt validate --deep -j 2` (process)",
        f"{du(src) / 1e9 / t_deep:.2f} GB/s",
        f"{t_deep:.2f} s (best of {repeat}); goal >= 3 GB/s",
    )
    print("### Validate\n")
    table.print(["what", "figure", "detail"])


def bench_stats(src: Path, work: Path, repeat: int) -> None:
    """``actfmt stats`` as a process on the split (page cache warm): the per-split figures' end-to-end GB/s;
    then on the uncompressed zarr store the convert section kept (the figures kept with it: read at once)."""
    table = Table()
    warm(src)
    size = du(src)
    runs = [
        timed_process([*ACTFMT, "stats", str(src), "--no-pairs", "-q", "--output-format", "json"])[0]
        for _ in range(repeat)
    ]
    med = statistics.median(runs)
    table.add(
        "`actfmt stats SPLIT --no-pairs` (per-split figures, process)",
        f"{size / 1e9 / med:.2f} GB/s",
        spread(runs),
        ">= 3 GB/s",
    )
    runs = [
        timed_process([*ACTFMT, "stats", str(src), "--no-pairs", "-q", "--output-format", "json", "-j", "1"])[
            0
        ]
        for _ in range(repeat)
    ]
    table.add("the same, `-j 1`", f"{size / 1e9 / statistics.median(runs):.2f} GB/s", spread(runs), "")
    store = work / "store-zarr"
    if store.exists():
        runs = [
            timed_process([*ACTFMT, "stats", str(store), "--no-pairs", "-q", "--output-format", "json"])[0]
            for _ in range(repeat)
        ]
        table.add("`actfmt stats` on a converted store (figures kept)", "", spread(runs), "instant")
    table.add(*kernel_speed(), "")
    print("### Statistics\n")
    table.print(["what", "figure", "wall: median (min-max)", "goal"])


def kernel_speed() -> tuple[str, str, str]:
    """The statistics kernel alone, in process, one thread: a 512 x 4096 bf16 block from cache (best of 20)."""
    import numpy as np

    from actfmt import kernel

    gauss = np.random.default_rng(0).standard_normal((512, 4096), dtype=np.float32)
    block = (gauss.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)
    t = best(lambda: kernel.block_moments(block, "bfloat16"), 20)
    which = "C" if kernel.compiled() else "numpy"
    return (
        f"the kernel alone ({which}; in process, one core, 512 x 4096 bf16 from cache)",
        f"{block.nbytes / 1e9 / t:.2f} GB/s",
        f"{t * 1e3:.2f} ms per block",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split", nargs="?", type=Path, help="a .pt split to measure (default: a synthetic one)")
    ap.add_argument(
        "--work",
        type=Path,
        default=REPO.parent / "bench-out",
        help="scratch directory, on the disk to measure",
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--quick", action="store_true", help="a small synthetic split (1000 x 1024 x 8) for a smoke run"
    )
    ap.add_argument("--only", default="convert,demo,reads,validate,stats", help="comma-separated sections")
    ap.add_argument("--formats", default="zarr,hdf5,safetensors", help="formats to convert to")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.split:
        src = args.split.resolve()
    elif args.quick:
        src = make_seed_split(work / "quick" / "EM", 1000, 1024, 8)
    else:
        src = make_seed_split(work / "seed" / "EM", 7049, 4096, 28)
    meta = json.loads((src / "metadata.json").read_text())
    import actfmt

    # a user's actfmt is byte-compiled (pip compiles a wheel at install; a checkout writes __pycache__ on first
    # run): compile it here too, or every run would pay ~0.15 s compiling when PYTHONDONTWRITEBYTECODE is set
    compileall.compile_dir(Path(actfmt.__file__).parent, quiet=1)

    print(
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, actfmt "
        f"{actfmt.__version__}; split {src} ({du(src) / 1e9:.2f} GB: {meta['num_layers']} layers x "
        f"{meta['total_examples']} x {meta['hidden_dim']}, {meta.get('shard_size')}-row shards); work dir {work}; "
        f"{args.repeat} runs\n"
    )
    warm(src)
    sections = set(args.only.split(","))
    if "convert" in sections:
        bench_convert(src, work, args.repeat, args.formats.split(","))
    if "demo" in sections:
        bench_demo(work, args.repeat)
    if "reads" in sections:
        bench_reads(src, work, args.repeat)
    if "validate" in sections:
        bench_validate(src, args.repeat)
    if "stats" in sections:
        bench_stats(src, work, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
