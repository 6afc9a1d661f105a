#!/usr/bin/env python
"""Heavier fault scenarios than the test suite's, on a larger split, against the ``actfmt`` command (``make faults``).

    python benchmarks/faults.py [--size-mb 256] [--work DIR] [--formats zarr,hdf5,safetensors,pt]

For every format, each scenario injects a real fault into ``actfmt convert`` run as a process, then checks the
invariants the README promises: exit status, one clear line on stderr (no traceback, no "internal error"), nothing
complete-looking that is not, the source unchanged, and ``--resume`` finishing bit-exact (``actfmt verify``):

* **signal**: SIGTERM / SIGINT at several moments -> exit 143 / 130, "partial kept at ...", lock released;
* **full disk** (root: a tmpfs sized to 25 %, 50 % and 90 % of the output) -> exit 2, ENOSPC named with the
  path; the tmpfs grown, ``--resume`` finishes;
* **source rewritten** while the conversion runs (a layer's shards replaced by others) -> exit 2 "changed",
  nothing published; or, if the rewrite came first, a store equal to the new source;
* **second writer** into the same destination -> one of the two refuses ("another actfmt convert"), the other
  finishes;
* **unprivileged user** (root: ``setpriv`` to nobody) writing into a directory it cannot write -> exit 2, EACCES.

Prints one table, a row per scenario and format; exits 1 if any row failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACTFMT = [sys.executable, "-m", "actfmt"]
ROWS: list[tuple[str, str, str, str]] = []


def record(scenario: str, fmt: str, ok: bool, detail: str) -> None:
    ROWS.append((scenario, fmt, "ok" if ok else "FAILED", detail))
    print(f"  {scenario:<22} {fmt:<12} {'ok' if ok else 'FAILED':<7} {detail}", file=sys.stderr, flush=True)


def make_source(path: Path, size_mb: int) -> Path:
    import torch

    from actfmt.layout import expected_shard_rows, layer_name, shard_name

    if (path / "metadata.json").exists():
        return path
    hidden, layers = 2048, 8
    total = max(64, size_mb * 1_000_000 // (hidden * 2 * layers))
    g = torch.Generator().manual_seed(0)
    rows = expected_shard_rows(total, 512, 32)
    for i in range(layers):
        full = torch.randn(total, hidden, generator=g).to(torch.bfloat16)
        (path / layer_name(i)).mkdir(parents=True)
        start = 0
        for j, n in enumerate(rows):
            torch.save(full[start : start + n].clone(), path / layer_name(i) / shard_name(j))
            start += n
    meta = {
        "model_name": "synthetic/Faults",
        "dataset_name": "SP_faults",
        "split": path.name,
        "load_in_4bit": False,
        "total_examples": total,
        "shard_size": 512,
        "batch_size": 32,
        "hidden_dim": hidden,
        "num_layers": layers,
    }
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ACTFMT, *args], capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]


def clean(stderr: str) -> bool:
    return "Traceback" not in stderr and "internal error" not in stderr


def digest(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def same(src: Path, out: Path) -> bool:
    return run("verify", str(src), str(out), "-q").returncode == 0


def scenario_signal(src: Path, work: Path, fmt: str) -> None:
    before = digest(src)
    for sig, delay in ((signal.SIGTERM, 0.4), (signal.SIGINT, 1.0), (signal.SIGTERM, 1.8)):
        out = work / f"sig-{fmt}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(
            [*ACTFMT, "convert", str(src), str(out), "--to", fmt, "-j", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        name = signal.Signals(sig).name
        if proc.returncode == 0:  # finished before the signal: nothing to check but the result
            record("signal", fmt, same(src, out), f"{name} at {delay}s: finished first")
            continue
        locks = list(out.rglob("*.actfmt-lock"))
        started = any(out.rglob("*.actfmt-partial"))  # a signal before the first layer leaves nothing to keep
        said = (
            "partial kept at" in err if started else err.strip().startswith(f"actfmt: interrupted ({name})")
        )
        ok = proc.returncode == 128 + sig and said and clean(err) and not locks
        again = run("convert", str(src), str(out), "--to", fmt, "--resume")
        ok = ok and again.returncode == 0 and same(src, out) and digest(src) == before
        detail = f"{name} at {delay}s -> exit {proc.returncode}{'' if started else ' (before any layer)'}"
        record("signal", fmt, ok, detail + (", --resume exact" if ok else f": {err.strip()[-300:]}"))


def _mount(point: Path, size: str) -> bool:
    point.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]).returncode == 0


def scenario_full_disk(src: Path, work: Path, fmt: str) -> None:
    if os.geteuid() != 0:
        record("full disk", fmt, True, "skipped (needs root to mount a tmpfs)")
        return
    need = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    for frac in (0.25, 0.5, 0.9):
        point = work / f"disk-{fmt}"
        if not _mount(point, f"{max(1, int(need * frac / 1e6))}m"):
            record("full disk", fmt, True, "skipped (cannot mount a tmpfs)")
            return
        try:
            res = run("convert", str(src), str(point / "out"), "--to", fmt, "--compression", "none")
            lines = [line for line in res.stderr.splitlines() if line.strip()]
            ok = res.returncode == 2 and len(lines) == 1 and "ENOSPC" in lines[0] and clean(res.stderr)
            subprocess.run(
                ["mount", "-o", f"remount,size={int(need * 1.5 / 1e6) + 8}m", str(point)], check=True
            )
            again = run(
                "convert", str(src), str(point / "out"), "--to", fmt, "--compression", "none", "--resume"
            )
            ok = ok and again.returncode == 0 and same(src, point / "out")
            record(
                "full disk",
                fmt,
                ok,
                f"tmpfs {frac:.0%} of the output -> exit {res.returncode}, --resume exact",
            )
        finally:
            subprocess.run(["umount", "-l", str(point)])


def scenario_source_rewritten(src: Path, work: Path, fmt: str) -> None:
    import torch

    copy = work / f"rewritten-{fmt}" / "EM"
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(src, copy)
    out = work / f"rewritten-out-{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(
        [*ACTFMT, "convert", str(copy), str(out), "--to", fmt, "-j", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    last = sorted(p for p in copy.iterdir() if p.is_dir())[-1]
    for shard in sorted(last.glob("shard_*.pt")):
        t = torch.load(shard)
        torch.save((t * 2).clone(), shard)  # new values, same shape and dtype: the source stays valid
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        ok = same(copy, out)
        record("source rewritten", fmt, ok, "the rewrite came first: the store equals the new source")
    else:
        complete = [p for p in out.rglob("*") if p.name in ("EM", "EM.zarr", "EM.h5")]
        first = proc.returncode == 2 and "changed" in err and clean(err) and not complete
        again = run("convert", str(copy), str(out), "--to", fmt, "--resume")
        ok = first and again.returncode == 0 and same(copy, out)
        detail = "exit 2 'changed', nothing published; --resume exact"
        if not ok:
            detail = f"exit {proc.returncode} {err.strip()[-200:]!r} / resume {again.returncode} {again.stderr[-300:]!r}"
        record("source rewritten", fmt, ok, detail)


def scenario_second_writer(src: Path, work: Path, fmt: str) -> None:
    out = work / f"two-{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*ACTFMT, "convert", str(src), str(out), "--to", fmt, "--overwrite"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ea, eb = a.communicate(timeout=300)[1], b.communicate(timeout=300)[1]
    codes = sorted((a.returncode, b.returncode))
    refused = ea if a.returncode else eb
    ok = codes == [0, 2] and "another actfmt convert" in refused and clean(ea + eb) and same(src, out)
    if codes == [0, 0]:  # the first finished before the second started: both are complete and correct
        ok = same(src, out)
    record("second writer", fmt, ok, f"exits {codes}")


def scenario_unprivileged(src: Path, work: Path, fmt: str) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        record("unprivileged", fmt, True, "skipped (needs root and setpriv)")
        return
    locked = work / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o755)
    res = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *ACTFMT,
            "convert",
            str(src),
            str(locked / "out"),
            "--to",
            fmt,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    ok = res.returncode == 2 and "EACCES" in res.stderr and clean(res.stderr)
    record("unprivileged", fmt, ok, f"exit {res.returncode}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--work", type=Path, default=REPO.parent / "faults-out")
    ap.add_argument("--formats", default="zarr,hdf5,safetensors,pt")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    src = make_source(work / "src" / "EM", args.size_mb)
    for p in [work / "src", *(work / "src").rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    for fmt in args.formats.split(","):
        for scenario in (
            scenario_signal,
            scenario_full_disk,
            scenario_source_rewritten,
            scenario_second_writer,
            scenario_unprivileged,
        ):
            scenario(src, work, fmt)
    print("| scenario | format | result | detail |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    return 1 if any(r[2] != "ok" for r in ROWS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
