"""Faults injected for real: a full disk (a small tmpfs), a read-only file system, an unprivileged user, too many
open files, a name too long, SIGINT / SIGTERM, a source rewritten during a conversion, a store replaced under an
open reader, FIFOs, and reports at scale.  Each test checks the invariant the README promises: a clear one-line
message naming the path (never a traceback or an "internal error"), nothing lost, nothing complete-looking that
is not, and ``--resume`` bit-exact afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import actfmt
import actfmt.formats as formats_registry
from actfmt.conversion import convert, verify
from actfmt.errors import ChangedError, ConversionError
from actfmt.formats import find_splits, get_format, open_reader
from tests._faults import actfmt_cmd, run
from tests._trees import bits, make_split, seed_load

FORMATS = list(formats_registry.FORMATS)  # every registered format, a new one by itself

#: ``actfmt`` as a process whose layer copies each start after a pause, so that a signal lands mid-conversion.
SLOW_CLI = textwrap.dedent(
    """
    import os, sys, time
    import actfmt.conversion.tasks as tasks
    real = tasks.copy_layer
    def slow(*a, **k):
        time.sleep(float(os.environ.get("ACTFMT_TEST_LAYER_DELAY", "0.25")))
        return real(*a, **k)
    tasks.copy_layer = slow
    from actfmt.cli import main
    sys.argv = ["actfmt", *sys.argv[1:]]
    main()
    """
)


def snapshot(path: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()}


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("actfmt: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    return lines[0]


def final_of(out: Path, fmt: str, name: str = "EM") -> Path:
    return Path(str(get_format(fmt).destination(out / name)))


def wait_for_layers(journal: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if sum('"layer"' in line for line in journal.read_text().splitlines()) >= n:
                return
        if proc.poll() is not None:
            pytest.fail(
                f"the conversion ended first: {proc.returncode}\n{proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"the conversion never recorded {n} layers")


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    "sig, fmt",
    [
        (signal.SIGTERM, "zarr"),
        (signal.SIGINT, "hdf5"),
        (signal.SIGTERM, "safetensors"),
        (signal.SIGINT, "pt"),
    ],
)
def test_a_signal_stops_cleanly_keeps_the_partial_and_resume_finishes(
    tmp_path: Path, sig: int, fmt: str
) -> None:
    data = make_split(tmp_path / "ds" / "EM", total=300, hidden=32, layers=6)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_CLI,
            "convert",
            str(tmp_path / "ds" / "EM"),
            str(out),
            "--to",
            fmt,
            "-j",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    final = final_of(out, fmt)
    journal = final.with_name(f".{final.name}.actfmt-state.jsonl")
    wait_for_layers(journal, 1, proc)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10, "stopped promptly"
    assert proc.returncode == 128 + sig, stderr
    partial = final.with_name(f".{final.name}.actfmt-partial")
    assert stderr.strip() == (
        f"actfmt: interrupted ({signal.Signals(sig).name}); partial kept at {partial}; rerun with --resume to continue"
    )
    assert not final.with_name(f".{final.name}.actfmt-lock").exists(), "the lock is released"
    assert partial.exists() and not final.exists() and find_splits(out) == []
    res = convert(tmp_path / "ds" / "EM", out, to=fmt, resume=True)
    assert 0 < res.layers < 6
    with open_reader(final) as r:
        for pos, li in enumerate(r.layers):
            assert torch.equal(bits(r.read(pos)), bits(data[li.name]))
    assert verify(tmp_path / "ds" / "EM", final).equal


@pytest.mark.slow
def test_ctrl_c_on_a_dask_conversion_reaches_its_workers_too_and_still_stops_in_one_line(
    tmp_path: Path,
) -> None:
    """A terminal's Ctrl-C goes to the whole process group: the command and the worker processes of the cluster
    it started (forked from it, with its handlers).  The workers leave it to the command, which stops the
    cluster: one line, no traceback from any process, the partial kept, ``--resume`` bit-exact."""
    pytest.importorskip("distributed")
    data = make_split(tmp_path / "ds" / "EM", total=300, hidden=32, layers=6)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", SLOW_CLI, "convert", str(tmp_path / "ds" / "EM"), str(out), "--to", "zarr"]
    env = {k: v for k, v in os.environ.items() if k != "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"}
    proc = subprocess.Popen(
        [*cmd, "--executor", "dask", "-j", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a job
        env={**env, "ACTFMT_TEST_LAYER_DELAY": "0.5"},
    )
    final = final_of(out, "zarr")
    wait_for_layers(final.with_name(f".{final.name}.actfmt-state.jsonl"), 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    partial = final.with_name(f".{final.name}.actfmt-partial")
    assert proc.returncode == 130, stderr
    assert stderr.strip() == (
        f"actfmt: interrupted (SIGINT); partial kept at {partial}; rerun with --resume to continue"
    )
    assert partial.exists() and not final.exists()
    res = convert(tmp_path / "ds" / "EM", out, to="zarr", resume=True)
    assert 0 < res.layers < 6
    with open_reader(final) as r:
        for pos, li in enumerate(r.layers):
            assert torch.equal(bits(r.read(pos)), bits(data[li.name]))


def test_a_signal_during_validate_exits_130_in_one_line(tmp_path: Path) -> None:
    make_split(tmp_path / "ds" / "EM", total=200, hidden=16, layers=3)
    code = textwrap.dedent(
        """
        import os, sys, signal
        import actfmt.checks.context as ctx
        real = ctx.deep_read
        def interrupted(*a, **k):
            os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)
        ctx.deep_read = interrupted
        import actfmt.checks
        actfmt.checks.deep_read = interrupted
        from actfmt.cli import main
        sys.argv = ["actfmt", *sys.argv[1:]]
        main()
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "validate", str(tmp_path / "ds"), "--deep"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip() == "actfmt: interrupted (SIGINT)"


# ---------------------------------------------------------------------------------------------- the disk


@contextlib.contextmanager
def tmpfs(path: Path, size: str, options: str = "") -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (root only); skipped where mounting is not possible."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_disk_is_one_line_keeps_the_partial_and_resume_finishes(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    make_split(src / "ds" / "EM", total=1000, hidden=512, layers=4, shard_size=250, batch_size=50)  # 4 MB
    before = snapshot(src)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "out"
        res = run(actfmt_cmd("convert", str(src), str(out), "--to", fmt, "--compression", "none"))
        assert res.returncode == 2, res.stdout + res.stderr
        line = one_line_error(res.stderr)
        assert "No space left on device (ENOSPC)" in line and str(disk) in line
        assert "rerun with --resume" in line
        final = final_of(out / "ds", fmt)
        assert not final.exists() and find_splits(out) == []
        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
        again = run(
            actfmt_cmd("convert", str(src), str(out), "--to", fmt, "--compression", "none", "--resume")
        )
        assert again.returncode == 0, again.stderr
        assert verify(src, out).equal
    assert snapshot(src) == before


def test_a_read_only_file_system_is_one_line(tmp_path: Path) -> None:
    make_split(tmp_path / "src" / "EM", total=40, hidden=8, layers=1)
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        res = run(actfmt_cmd("convert", str(tmp_path / "src"), str(ro / "out"), "--to", "zarr"))
        assert res.returncode == 2
        line = one_line_error(res.stderr)
        assert "Read-only file system (EROFS)" in line and str(ro / "out") in line


def test_permission_denied_as_an_unprivileged_user(open_tmp: Path) -> None:
    src = open_tmp / "src"
    make_split(src / "EM", total=40, hidden=8, layers=1)
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    locked = open_tmp / "locked"
    locked.mkdir()
    locked.chmod(0o755)  # the unprivileged user may enter, not write
    res = run(actfmt_cmd("convert", str(src), str(locked / "out"), "--to", "safetensors"), unprivileged=True)
    assert res.returncode == 2, res.stdout + res.stderr
    line = one_line_error(res.stderr)
    assert "Permission denied (EACCES)" in line and str(locked / "out") in line
    # and a source the user cannot read is a clean error too (validation names the file)
    (src / "EM" / "layer_00").chmod(0o700)
    res = run(actfmt_cmd("convert", str(src), str(open_tmp / "out2"), "--to", "zarr"), unprivileged=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "ACT001" in res.stderr and "layer_00" in res.stderr


def test_a_name_too_long_is_one_line(tmp_path: Path) -> None:
    make_split(tmp_path / "src" / "EM", total=40, hidden=8, layers=1)
    res = run(actfmt_cmd("convert", str(tmp_path / "src"), str(tmp_path / ("x" * 300)), "--to", "zarr"))
    assert res.returncode == 2
    assert "File name too long (ENAMETOOLONG)" in one_line_error(res.stderr)


def test_a_250_character_split_name_converts(tmp_path: Path) -> None:
    name = "S" * 250
    make_split(tmp_path / "src" / "ds" / name, total=40, hidden=8, layers=1, split=name)
    res = run(actfmt_cmd("convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "safetensors"))
    assert res.returncode == 0, res.stderr
    assert verify(tmp_path / "src", tmp_path / "out").equal


def test_too_many_open_files_is_one_line(tmp_path: Path) -> None:
    make_split(tmp_path / "src" / "EM", total=400, hidden=16, layers=4, shard_size=50, batch_size=10)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (9, 9))

    res = subprocess.run(
        actfmt_cmd("convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "zarr"),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Too many open files (EMFILE)" in one_line_error(res.stderr)


# ---------------------------------------------------------------------------------------------- the source


def test_no_flag_deletes_or_modifies_the_source(tmp_path: Path) -> None:
    p = tmp_path / "P"
    src = p / "EM" / "inner" / "EM"
    make_split(src, total=40, hidden=8, layers=1)
    before = snapshot(src)
    for argv in (
        [
            "convert",
            str(src),
            str(p),
            "--to",
            "pt",
            "--overwrite",
        ],  # would replace P/EM, which holds the source
        ["convert", str(p), str(p / "EM" / "inner"), "--to", "zarr", "--overwrite"],  # inside the source
        ["convert", str(src), str(src.parent), "--to", "pt", "--overwrite"],  # the source itself
        ["convert", str(p / "EM" / "inner"), str(p / "EM" / "inner"), "--to", "pt", "--overwrite"],
    ):
        res = run(actfmt_cmd(*argv))
        assert res.returncode == 2, (argv, res.stdout, res.stderr)
        assert "source" in one_line_error(res.stderr)
        assert snapshot(src) == before
    # a destination beside the source inside the same parent is fine: P/EM/EM is written, the source untouched
    res = run(actfmt_cmd("convert", str(src), str(p / "EM"), "--to", "pt", "--overwrite"))
    assert res.returncode == 0, res.stderr
    assert snapshot(src) == before and verify(src, p / "EM" / "EM").equal


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_layer_rewritten_during_the_conversion_publishes_nothing(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "ds" / "EM"
    data = make_split(src, total=200, hidden=16, layers=4)
    done = []

    def swap_layer_3(event: Any) -> None:
        # while layer 0 is copied, rewrite a layer not yet copied: same shape, float16 instead of bfloat16
        if event.kind == "advance" and event.task == "convert" and not done:
            done.append(True)
            for shard in sorted((src / "layer_03").glob("shard_*.pt")):
                t = torch.load(shard)
                torch.save(t.to(torch.float16).clone(), shard)

    with pytest.raises((ChangedError, ConversionError), match="changed"):
        convert(src, tmp_path / "out", to=fmt, jobs=1, force=True, progress=swap_layer_3)
    assert done and find_splits(tmp_path / "out") == []
    # --resume keeps what is still good and redoes what changed, bit-exact with the source as it is now
    res = convert(src, tmp_path / "out", to=fmt, jobs=1, force=True, resume=True)
    final = final_of(tmp_path / "out", fmt)
    assert verify(src, final).equal
    with actfmt.open(final) as split:
        assert split.layer(3)[:].dtype == torch.float16
        assert torch.equal(bits(split.layer(0)[:]), bits(data["layer_00"]))
    assert res.layers >= 1


def test_resume_redoes_a_layer_whose_source_changed_and_refuses_other_options(tmp_path: Path) -> None:
    src = tmp_path / "ds" / "EM"
    make_split(src, total=300, hidden=32, layers=6)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", str(src), str(out), "--to", "zarr", "-j", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_layers(out / ".EM.zarr.actfmt-state.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    # options other than the partial's: refused, with the command that continues it
    res = run(actfmt_cmd("convert", str(src), str(out), "--to", "zarr", "--resume", "--compression", "none"))
    assert res.returncode == 2
    line = one_line_error(res.stderr)
    assert "rerun with --resume --to zarr" in line and "--overwrite" in line
    # layer_00 rewritten since (new values): redone, said so, and the result is the source as it is now
    shard = src / "layer_00" / "shard_000.pt"
    t = torch.load(shard)
    torch.save((t * 2).clone(), shard)
    res = run(actfmt_cmd("convert", str(src), str(out), "--to", "zarr", "--resume"))
    assert res.returncode == 0, res.stderr
    assert "layer_00" in res.stderr and "changed since the interrupted run" in res.stderr
    assert torch.equal(bits(seed_load(src, "layer_00")), bits(actfmt.open(out / "EM.zarr").layer(0)[:]))
    assert verify(src, out / "EM.zarr").equal


def test_a_plain_rerun_after_an_interruption_says_it_starts_again(tmp_path: Path) -> None:
    src = tmp_path / "ds" / "EM"
    make_split(src, total=300, hidden=32, layers=6)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "convert", str(src), str(out), "--to", "safetensors", "-j", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_layers(out / ".EM.actfmt-state.jsonl", 1, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    res = run(actfmt_cmd("convert", str(src), str(out), "--to", "safetensors"))
    assert res.returncode == 0
    assert "an interrupted conversion was left here" in res.stderr and "--resume" in res.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_reader_on_a_replaced_store_never_returns_other_rows(tmp_path: Path, fmt: str) -> None:
    first = make_split(
        tmp_path / "a" / "EM", total=120, hidden=8, layers=1, shard_size=40, batch_size=10, seed=1
    )
    make_split(tmp_path / "b" / "EM", total=120, hidden=8, layers=1, shard_size=60, batch_size=20, seed=2)
    kw: dict[str, Any] = {"compression": "none"} if fmt in ("zarr", "hdf5") else {}
    convert(tmp_path / "a" / "EM", tmp_path / "out", to=fmt, force=True, **kw)
    final = final_of(tmp_path / "out", fmt)
    with actfmt.open(final) as split:
        layer = split.layer(0)
        assert torch.equal(bits(layer[50:70]), bits(first["layer_00"][50:70]))
        convert(tmp_path / "b" / "EM", tmp_path / "out", to=fmt, force=True, overwrite=True, **kw)
        try:
            got = layer[50:70]
        except (ChangedError, OSError) as exc:  # a clear error is allowed
            assert "changed" in str(exc) or "replaced" in str(exc) or isinstance(exc, FileNotFoundError)
        else:
            assert torch.equal(bits(got), bits(first["layer_00"][50:70])), (
                "old rows, or an error; never others"
            )


@pytest.mark.parametrize("victim", ["layer_00/shard_001.pt", "metadata.json"])
def test_a_fifo_never_blocks_any_command(tmp_path: Path, victim: str) -> None:
    split = tmp_path / "ds" / "EM"
    make_split(split, total=100, hidden=8, layers=2, shard_size=40, batch_size=10)
    (split / victim).unlink()
    os.mkfifo(split / victim)
    for argv in (
        ["convert", str(tmp_path / "ds"), str(tmp_path / "out"), "--to", "zarr", "--force"],
        ["info", str(split)],
        ["stats", str(tmp_path / "ds")],
        ["validate", str(tmp_path / "ds"), "--deep"],
    ):
        res = run(actfmt_cmd(*argv), timeout=60)  # a hang fails here, with a timeout
        if victim.endswith(".pt") or argv[0] in ("convert", "validate"):  # the data cannot be read whole
            assert res.returncode in (1, 2), (argv, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    code = f"import actfmt\nwith actfmt.open({str(split)!r}) as s:\n    s.layer(0)[:]\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if victim.endswith(".pt"):  # the rows cannot be read: a clear error (the metadata is not needed for them)
        assert res.returncode != 0 and ("FIFO" in res.stderr or "not a regular file" in res.stderr)


# ---------------------------------------------------------------------------------------------- locks


def test_a_stale_lock_of_another_user_is_replaced_and_said(open_tmp: Path) -> None:
    make_split(open_tmp / "src" / "EM", total=40, hidden=8, layers=1)
    out = open_tmp / "out"
    out.mkdir()
    lock = out / ".EM.zarr.actfmt-lock"
    lock.write_text("999999 otherhost 2026-01-01T00:00:00\n")
    if os.geteuid() == 0:
        os.chown(lock, 65534, 65534)  # another user's
    lock.chmod(0o600)
    res = run(actfmt_cmd("convert", str(open_tmp / "src"), str(out), "--to", "zarr", "--overwrite"))
    assert res.returncode == 0, res.stderr
    assert "stale lock" in res.stderr and "999999" in res.stderr
    assert not lock.exists()


def test_a_live_lock_is_respected(tmp_path: Path) -> None:
    make_split(tmp_path / "src" / "EM", total=300, hidden=32, layers=6)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_CLI,
            "convert",
            str(tmp_path / "src"),
            str(out),
            "--to",
            "zarr",
            "-j",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_layers(out / ".EM.zarr.actfmt-state.jsonl", 1, proc)
    res = run(actfmt_cmd("convert", str(tmp_path / "src"), str(out), "--to", "zarr", "--overwrite"))
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert res.returncode == 2 and "another actfmt convert is writing" in one_line_error(res.stderr)
    assert verify(tmp_path / "src", out).equal


# ---------------------------------------------------------------------------------------------- reports


def test_findings_are_capped_per_rule_and_split_in_text(tmp_path: Path) -> None:
    split = tmp_path / "m" / "ds" / "EM"
    (split / "layer_00").mkdir(parents=True)
    meta = {
        "model_name": "m",
        "dataset_name": "ds",
        "split": "EM",
        "load_in_4bit": False,
        "total_examples": 300,
        "shard_size": 10,
        "batch_size": 10,
        "hidden_dim": 4,
        "num_layers": 1,
    }
    (split / "metadata.json").write_text(json.dumps(meta))
    for i in range(30):
        (split / "layer_00" / f"shard_{i:03d}.pt").touch()
    text = run(actfmt_cmd("validate", str(tmp_path)))
    assert text.returncode == 1
    assert text.stdout.count("ACT002") == 10 + 1
    assert (
        "... and 20 more ACT002 findings in this split (every finding: --output-format json)" in text.stdout
    )
    assert "30 errors" in text.stdout
    doc = json.loads(run(actfmt_cmd("validate", str(tmp_path), "--output-format", "json")).stdout)
    assert sum(f["code"] == "ACT002" for f in doc["issues"]) == 30
