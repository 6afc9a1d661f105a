#!/usr/bin/env python
"""actfmt benchmark: ratios measured in one run, on one machine, the way a user waits.

    python benchmarks/run.py [SPLIT] [--work DIR] [--repeat N] [--quick] [--only convert,demo,reads,validate,stats]
                             [--splits seed,float32]

Without SPLIT it makes a seed-sized synthetic split (7049 x 4096 x 28 layers, bf16, the producer's 512-row
shards; 1.6 GB) under --work; ``--splits seed,float32`` measures a float32 split of the same shape too
(``seed-float32``, 3.2 GB; its outputs under ``--work/float32``), each split's tables under its own heading.  --work must be on the filesystem the user converts on (the default is
``bench-out`` beside this repository, on the same disk as the split): conversions write there, not to tmpfs.

* **convert**: ``actfmt convert`` run as a process (start-up included), alternating with ``cp -r`` of the same
  source into the same filesystem, ``sync`` before each run so no run pays for another's writeback; the median
  and the spread (min-max) of --repeat runs of each, and the ratio of the medians.  Each conversion prints, from
  its ``--output-format json`` result, where its time went: start-up (process wall time minus the time inside
  ``convert``), source validation, and the thread-seconds of reading + hashing, writing and verifying; and the
  CPU-seconds (user + system, every thread) the process used per GB of the source ("thread-s per GB", from
  ``wait4``: what the conversion costs in cores, whatever the machine's load).  Peak RSS from ``wait4``.  Outputs are compared bit for bit with the source (``actfmt verify``) once.
* **demo**: converting the demo fixture (0.9 MB) to each format, as a process: median wall time.
* **reads** (in process, page cache warm, best of --repeat): full layer, 256 random rows and one example
  across all layers, against the seed guide's loader (``torch.load`` + ``torch.cat``).
* **validate**: header-only validation as a process against a bare ``import torch``; ``--deep`` GB/s.
* **stats**: ``actfmt stats --no-pairs`` as a process on the split (page cache warm): GB/s end to end; and on a
  converted store, which keeps the figures; and the statistics kernel alone (``benchmarks/kernel.py`` compares
  its means).  The convert section's ``--no-stats`` rows give what computing the
  statistics during a conversion costs.

Lower is better; the "goal" column is issue 19's target where it sets one ("-": none; the figure is context):
convert with the default (statistics and verification on) <= 1.2x ``cp -r`` for zarr, hdf5 and safetensors
uncompressed, with the default codec <= 2.5x; ``actfmt stats`` and ``validate --deep`` >= 3 GB/s.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "real-minilm-bf16" / "Activations"
DEMO = REPO / "fixtures" / "valid" / "real_minilm_bf16_slice" / "Activations"
#: Issue 19's goals (ratios to ``cp -r``, GB/s); rows without one show "-".
GOAL_CONVERT = "<= 1.2"  # the default (statistics + verification), uncompressed
GOAL_CODEC = "<= 2.5"  # the default codec
GOAL_GBPS = ">= 3 GB/s"  # actfmt stats, validate --deep
NO_GOAL = "-"
#: The splits ``--splits`` names: (directory under --work, dtype).
SPLITS = {"seed": ("seed", "bfloat16"), "float32": ("seed-float32", "float32")}
ACTFMT = [sys.executable, "-m", "actfmt"]
if shutil.which("actfmt", path=str(Path(sys.executable).parent)):
    ACTFMT = [str(Path(sys.executable).parent / "actfmt")]


def make_seed_split(path: Path, total: int, hidden: int, layers: int, dtype: str = "bfloat16") -> Path:
    """The producer's layout: 512-row shards (batch 32), bf16 (or ``dtype``), written with torch.save."""
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
        full = (torch.randn(total, hidden, generator=g) * (1 + i / 4)).to(getattr(torch, dtype))
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


@dataclass
class Proc:
    """One process run: wall seconds, CPU seconds (user + system of every thread, and of the children it waited
    for: ``wait4``), peak RSS in bytes (``/usr/bin/time``'s: ``wait4``'s own counts the pages the benchmark
    process had when it forked) and its stdout."""

    wall: float
    cpu: float
    rss: int
    out: str


TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


def run_process(cmd: Sequence[str]) -> Proc:
    """Run ``cmd`` (under ``/usr/bin/time -f %M`` where there is one, for its peak RSS alone)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        full = [TIME, "-f", "%M", *cmd] if TIME else list(cmd)
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        errors = err.read().decode(errors="replace")
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{errors[-2000:]}")
        rss = 0
        if TIME:
            with contextlib.suppress(ValueError, IndexError):
                rss = int(errors.strip().splitlines()[-1]) * 1024
        return Proc(wall, ru.ru_utime + ru.ru_stime, rss, out.read().decode())


def timed_process(cmd: Sequence[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one process."""
    p = run_process(cmd)
    return p.wall, p.rss, p.out


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


def per_gb(cpus: list[float], size: int) -> str:
    """Median CPU-seconds per GB of ``size`` bytes, with the spread."""
    v = [c / (size / 1e9) for c in cpus]
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def bench_convert(src: Path, work: Path, repeat: int, formats: Sequence[str]) -> None:
    """``actfmt convert`` as a process vs ``cp -r``, interleaved, on the source's filesystem."""
    cp_dst = work / "cp-copy"
    out = work / "conv"
    table = Table()
    size = du(src)
    cases: list[tuple[str, Path, str, list[str], str]] = []
    for fmt in formats:
        cases.append((f"{fmt} uncompressed", src, fmt, ["--compression", "none"], GOAL_CONVERT))
        cases.append(
            (f"{fmt} uncompressed --no-stats", src, fmt, ["--compression", "none", "--no-stats"], NO_GOAL)
        )
        cases.append(
            (f"{fmt} uncompressed --no-verify", src, fmt, ["--compression", "none", "--no-verify"], NO_GOAL)
        )
        if fmt != "safetensors":
            cases.append((f"{fmt} default codec", src, fmt, [], GOAL_CODEC))
    stores: dict[str, Path] = {}
    for label, source, fmt, extra, goal in cases:
        if label.endswith("uncompressed") and "from" not in label:
            stores[fmt] = work / f"store-{fmt}"
        times, cpus, cps, rss, phases = [], [], [], 0, []
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
            run = run_process(cmd)
            times.append(run.wall)
            cpus.append(run.cpu)
            rss = max(rss, run.rss)
            result = json.loads(run.out)
            phases.append({"startup": run.wall - result["seconds"], **result.get("timings", {})})
        if fmt in stores and extra == ["--compression", "none"]:  # the default run's store (statistics kept)
            shutil.rmtree(stores[fmt], ignore_errors=True)
            shutil.move(str(out), stores[fmt])
        shutil.rmtree(out, ignore_errors=True)
        ratio = statistics.median(times) / statistics.median(cps)
        where = ", ".join(
            f"{k} {statistics.median([p.get(k, 0.0) for p in phases]):.2f}"
            for k in ("startup", "validate", "read", "stats", "write", "verify")
        )
        table.add(
            label,
            f"{ratio:.2f}",
            spread(times),
            spread(cps),
            per_gb(cpus, size),
            f"{rss / 1e9:.2f} GB",
            where,
            goal,
        )
    # back to pt from each store
    for fmt, store in stores.items():
        if not store.exists():
            continue
        times, cpus, cps, phases = [], [], [], []
        for _ in range(repeat):
            shutil.rmtree(cp_dst, ignore_errors=True)
            os.sync()
            cps.append(timed_process(["cp", "-r", str(store), str(cp_dst)])[0])
            shutil.rmtree(cp_dst, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            run = run_process(
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
            times.append(run.wall)
            cpus.append(run.cpu)
            result = json.loads(run.out)
            phases.append({"startup": run.wall - result["seconds"], **result.get("timings", {})})
        same = subprocess.run([*ACTFMT, "verify", str(src), str(out), "-q"], capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
        shutil.rmtree(out, ignore_errors=True)
        ratio = statistics.median(times) / statistics.median(cps)
        where = ", ".join(
            f"{k} {statistics.median([p.get(k, 0.0) for p in phases]):.2f}"
            for k in ("startup", "validate", "read", "write", "verify")
        )
        table.add(
            f"pt from {fmt}",
            f"{ratio:.2f}",
            spread(times),
            spread(cps),
            per_gb(cpus, size),
            "",
            where,
            NO_GOAL,
        )
    print("### Convert, `actfmt convert` as a process / `cp -r` (same filesystem, interleaved)\n")
    table.print(
        [
            "conversion",
            "ratio (medians)",
            "actfmt: median (min-max)",
            "cp -r: median (min-max)",
            "thread-s per GB: median (min-max)",
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
    size = du(src)
    t_import = min(timed_process([sys.executable, "-c", "import torch"])[0] for _ in range(repeat))
    t_val = min(timed_process([*ACTFMT, "validate", str(src), "-q"])[0] for _ in range(repeat))
    table.add(
        "header-only `actfmt validate` / `python -c 'import torch'`",
        f"{t_val / t_import:.2f}",
        f"{t_val:.2f} s vs {t_import:.2f} s (best of {repeat})",
        "",
        NO_GOAL,
    )
    warm(src)
    runs = [run_process([*ACTFMT, "validate", str(src), "--deep", "-q", "-j", "2"]) for _ in range(repeat)]
    walls = [r.wall for r in runs]
    table.add(
        "`actfmt validate --deep -j 2` (process)",
        f"{size / 1e9 / statistics.median(walls):.2f} GB/s",
        spread(walls),
        per_gb([r.cpu for r in runs], size),
        GOAL_GBPS,
    )
    print("### Validate\n")
    table.print(["what", "figure", "wall: median (min-max)", "thread-s per GB", "goal"])


def bench_stats(src: Path, work: Path, repeat: int, dtype: str = "bfloat16") -> None:
    """``actfmt stats`` as a process on the split (page cache warm): the per-split figures' end-to-end GB/s;
    then on the uncompressed zarr store the convert section kept (the figures kept with it: read at once)."""
    table = Table()
    warm(src)
    size = du(src)
    stats_cmd = [*ACTFMT, "stats", str(src), "--no-pairs", "-q", "--output-format", "json"]
    for label, cmd, goal in (
        ("`actfmt stats SPLIT --no-pairs` (per-split figures, process)", stats_cmd, GOAL_GBPS),
        ("the same, `-j 1`", [*stats_cmd, "-j", "1"], NO_GOAL),
    ):
        runs = [run_process(cmd) for _ in range(repeat)]
        walls = [r.wall for r in runs]
        table.add(
            label,
            f"{size / 1e9 / statistics.median(walls):.2f} GB/s",
            spread(walls),
            per_gb([r.cpu for r in runs], size),
            goal,
        )
    store = work / "store-zarr"
    if store.exists():
        runs = [
            run_process([*ACTFMT, "stats", str(store), "--no-pairs", "-q", "--output-format", "json"])
            for _ in range(repeat)
        ]
        table.add(
            "`actfmt stats` on a converted store (figures kept)",
            "",
            spread([r.wall for r in runs]),
            "",
            "instant",
        )
    table.add(*kernel_speed(dtype), "", "")
    print("### Statistics\n")
    table.print(["what", "figure", "wall: median (min-max)", "thread-s per GB", "goal"])


def kernel_speed(dtype: str = "bfloat16") -> tuple[str, str, str]:
    """The statistics kernel alone, in process, one thread: a 512 x 4096 block from cache (best of 20)."""
    import numpy as np

    from actfmt import kernel

    gauss = np.random.default_rng(0).standard_normal((512, 4096), dtype=np.float32)
    if dtype == "float32":
        block = gauss
        name = "float32"
    else:
        block = (gauss.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)
        name = "bf16"
    t = best(lambda: kernel.block_moments(block, dtype), 20)
    level = kernel._c.simd() if kernel.compiled() and kernel._c is not None else 0
    which = f"C, {({2: 'AVX-512', 1: 'AVX2'}).get(level, 'portable')}" if kernel.compiled() else "numpy"
    return (
        f"the kernel alone ({which}; in process, one core, 512 x 4096 {name} from cache)",
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
    ap.add_argument(
        "--splits",
        default="seed",
        help="synthetic splits to measure, comma-separated: seed (bf16, the default), float32 (the same shape "
        "in float32)",
    )
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.splits.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPLITS]
    if unknown or not names:
        ap.error(f"--splits: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(SPLITS)}")
    todo: list[tuple[str, Path, Path]] = []  # (label, split, work directory of its outputs)
    if args.split:
        todo.append(("split", args.split.resolve(), work))
    else:
        for name in names:
            folder, dtype = SPLITS[name]
            sub = work if name == "seed" else work / name
            sub.mkdir(parents=True, exist_ok=True)
            if args.quick:
                src = make_seed_split(work / f"quick-{folder}" / "EM", 1000, 1024, 8, dtype)
            else:
                src = make_seed_split(work / folder / "EM", 7049, 4096, 28, dtype)
            todo.append((name, src, sub))
    import actfmt
    from actfmt.formats import open_reader
    from actfmt.storage import resolve

    # a user's actfmt is byte-compiled (pip compiles a wheel at install; a checkout writes __pycache__ on first
    # run): compile it here too, or every run would pay ~0.15 s compiling when PYTHONDONTWRITEBYTECODE is set
    compileall.compile_dir(Path(actfmt.__file__).parent, quiet=1)

    sections = set(args.only.split(","))
    for i, (label, src, sub) in enumerate(todo):
        meta = json.loads((src / "metadata.json").read_text())
        with open_reader(resolve(src), "pt") as reader:
            dtype = reader.layers[0].dtype
        print(
            f"## {label}: {src} ({du(src) / 1e9:.2f} GB: {meta['num_layers']} layers x {meta['total_examples']} x "
            f"{meta['hidden_dim']}, {dtype}, {meta.get('shard_size')}-row shards)\n\n"
            f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, actfmt "
            f"{actfmt.__version__}; work dir {sub}; {args.repeat} runs; load average {load_average()} at the start\n"
        )
        warm(src)
        if "convert" in sections:
            bench_convert(src, sub, args.repeat, args.formats.split(","))
        if "demo" in sections and i == 0:
            bench_demo(sub, args.repeat)
        if "reads" in sections:
            bench_reads(src, sub, args.repeat)
        if "validate" in sections:
            bench_validate(src, args.repeat)
        if "stats" in sections:
            bench_stats(src, sub, args.repeat, dtype)
        print(f"(load average {load_average()} at the end of {label})\n")
    return 0


def load_average() -> str:
    """``uptime``'s three load averages (1, 5, 15 minutes)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    raise SystemExit(main())
