"""Conversion on dask.distributed (``--executor dask``) and ``LayerView.to_dask()``.

The cluster tests start a real ``LocalCluster`` with two worker *processes* once per module (slow-marked; a
few seconds).  The retry tests inject failures with a monkeypatched writer, so they use an in-process cluster
(``processes=False``) whose workers see the patch.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("distributed")
pytest.importorskip("dask.array")

import distributed

import actfmt
from actfmt.cli import cli
from actfmt.conversion import convert, layer_tasks, plan, spec_for, verify
from actfmt.errors import ConversionError
from actfmt.formats import FORMATS, find_splits, get_format
from actfmt.layout import expected_shard_rows
from actfmt.progress import ProgressEvent

from ._trees import bits, make_tree, seed_load

TOTAL, HIDDEN, LAYERS, SHARD, BATCH = 203, 16, 3, 64, 20
SHARD_ROWS = expected_shard_rows(TOTAL, SHARD, BATCH)
SPLITS = ("org_Tiny-Model/SP_test/EM", "org_Tiny-Model/SP_test/Neutral")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dask") / "Activations"
    make_tree(root, total=TOTAL, hidden=HIDDEN, layers=LAYERS, shard_size=SHARD, batch_size=BATCH)
    return root


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    """Two single-threaded worker processes, as on a real (small) cluster."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):
        yield c


@pytest.fixture
def inproc_client() -> Iterator[distributed.Client]:
    """Workers in this process (threads), so a monkeypatched writer is what they run."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def local_outputs(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """The reference: every format converted with the local executor."""
    base = tmp_path_factory.mktemp("local")
    return {to: (base / to, convert(tree, base / to, to=to)) for to in FORMATS}


def _data_files(root: Path) -> dict[str, bytes]:
    """Bytes of every file that holds activations (not the metadata, whose actfmt block has a timestamp)."""
    out = {}
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        r = f.relative_to(root)
        if f.suffix in (".safetensors", ".pt") or any(part.startswith("layer_") for part in r.parts):
            out[r.as_posix()] = f.read_bytes()  # shards, layer files, zarr arrays (chunks + zarr.json)
    return out


# ----------------------------------------------------------------------------------------------------------
# conversion on a cluster of two worker processes


@pytest.mark.slow
@pytest.mark.parametrize("to", list(FORMATS))
def test_two_worker_processes_convert_bit_exact_with_local(
    tree: Path,
    tmp_path: Path,
    client: distributed.Client,
    local_outputs: dict[str, tuple[Path, Any]],
    to: str,
) -> None:
    events: list[ProgressEvent] = []
    res = convert(tree, tmp_path / "out", to=to, executor="dask", scheduler=client, progress=events.append)
    local_dir, local_res = local_outputs[to]
    assert res.checksums == local_res.checksums
    assert len(res.checksums) == 2 and all(len(v) == LAYERS for v in res.checksums.values())
    assert res.layers == 2 * LAYERS
    same = verify(local_dir, tmp_path / "out")
    assert same.equal, same.differences
    assert same.layers == 2 * LAYERS
    if to != "hdf5":  # one file per split whose HDF5 bookkeeping is not ours to compare; verify() did it
        mine, theirs = _data_files(tmp_path / "out"), _data_files(local_dir)
        assert mine.keys() == theirs.keys() and len(mine) >= 2 * LAYERS
        assert [k for k in mine if mine[k] != theirs[k]] == []
    # progress across workers: one advance per finished layer, adding up to every byte
    advances = [e for e in events if e.kind == "advance" and e.task == "convert"]
    assert len(advances) == 2 * LAYERS
    starts = [e for e in events if e.kind == "start" and e.task == "convert"]
    assert sum(a.advance for a in advances) == sum(s.total or 0 for s in starts) == res.bytes
    # the written stores are complete and validate
    for path, _fmt in find_splits(tmp_path / "out"):
        with actfmt.open(path) as split:
            assert split.num_layers == LAYERS
    assert not list((tmp_path / "out").rglob(".*actfmt-*"))  # no partial, lock or state left behind


@pytest.mark.slow
def test_scheduler_address_string_and_resume_of_complete_splits(
    tree: Path, tmp_path: Path, client: distributed.Client, local_outputs: dict[str, tuple[Path, Any]]
) -> None:
    address = client.scheduler.address
    assert isinstance(address, str) and address.startswith("tcp://")
    res = convert(tree, tmp_path / "z", to="zarr", executor="dask", scheduler=address, compression="none")
    assert res.checksums == local_outputs["zarr"][1].checksums
    again = convert(tree, tmp_path / "z", to="zarr", executor="dask", scheduler=address, resume=True)
    assert len(again.skipped) == 2 and again.layers == 0


@pytest.mark.slow
def test_cli_executor_dask_starts_a_local_cluster(
    tree: Path, tmp_path: Path, local_outputs: dict[str, tuple[Path, Any]]
) -> None:
    out = tmp_path / "st"
    res = CliRunner().invoke(
        cli, ["convert", str(tree), str(out), "--to", "safetensors", "--executor", "dask", "-j", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "Converted 2 splits · 6 layers" in res.output
    same = CliRunner().invoke(cli, ["verify", str(local_outputs["safetensors"][0]), str(out)])
    assert same.exit_code == 0, same.output


@pytest.mark.slow
def test_actfmts_local_cluster_leaves_mallocs_adaptive_threshold_on() -> None:
    """dask's MALLOC_TRIM_THRESHOLD_ in a worker's environment nearly doubles a zarr layer task's CPU time: the
    cluster actfmt starts has none (in a fresh process: distributed copies it into the process that starts a
    cluster, as this module's fixture did) and sets glibc's thresholds in its workers anyway."""
    import os
    import subprocess
    import sys

    code = (
        "import os\n"
        "from actfmt._dask import dask_client, relax_malloc\n"
        "with dask_client(None, 1) as client:\n"
        "    env = client.run(lambda: (os.environ.get('MALLOC_TRIM_THRESHOLD_'), os.environ.get('OMP_NUM_THREADS')))\n"
        "    relaxed = client.run(relax_malloc)\n"
        "print(list(env.values()), list(relaxed.values()))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}  # as a shell starts it
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=clean
    )
    assert out.stdout.strip().splitlines()[-1] == "[(None, '1')] [True]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------
# how actfmt's own cluster starts its workers


@pytest.mark.parametrize(
    "configured, env, platform, rss, expected",
    [
        ("spawn", None, "linux", 200 << 20, "fork"),  # a command: forked
        ("spawn", None, "linux", 2 << 30, "spawn"),  # a notebook holding gigabytes: spawned
        ("spawn", None, "linux", None, "spawn"),  # size unknown
        ("spawn", None, "darwin", 200 << 20, "spawn"),  # fork is unsafe on macOS
        ("spawn", "spawn", "linux", 200 << 20, "spawn"),  # chosen in the environment
        ("forkserver", None, "linux", 200 << 20, "forkserver"),  # chosen in dask's config
    ],
)
def test_local_cluster_forks_its_workers_from_a_small_process_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
    configured: str,
    env: str | None,
    platform: str,
    rss: int | None,
    expected: str,
) -> None:
    import dask

    import actfmt._dask as ad

    monkeypatch.delenv(ad._START_METHOD_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(ad._START_METHOD_ENV, env)
    monkeypatch.setattr(ad.sys, "platform", platform)
    monkeypatch.setattr(ad, "_resident_bytes", lambda: rss)
    with dask.config.set({"distributed.worker.multiprocessing-method": configured}):
        assert ad.start_method() == expected


def test_this_process_resident_size_is_read() -> None:
    from actfmt._dask import FORK_MAX_RSS, _resident_bytes

    rss = _resident_bytes()
    assert rss is not None and 10 << 20 < rss < 64 << 30  # this interpreter with torch imported
    assert FORK_MAX_RSS == 1 << 30


@pytest.mark.slow
def test_actfmts_cluster_forks_workers_that_have_what_this_process_imported() -> None:
    """A forked worker starts with this process's modules and state (nothing to import); a spawned one does
    not.  Run as a process of its own, as a command starts its cluster (pytest's is larger)."""
    import subprocess
    import sys

    code = (
        "import actfmt._dask as ad\n"
        "ad.MARK = 'parent'\n"
        "def mark():\n"
        "    import actfmt._dask\n"
        "    return getattr(actfmt._dask, 'MARK', None)\n"
        "with ad.dask_client(None, 2) as client:\n"
        "    seen = client.run(mark)\n"
        "print(ad.start_method(), sorted(map(str, seen.values())))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"}
    forked = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert forked.stdout.strip().splitlines()[-1] == "fork ['parent', 'parent']", (
        forked.stdout + forked.stderr
    )
    env["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] = "spawn"
    spawned = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert spawned.stdout.strip().splitlines()[-1] == "spawn ['None', 'None']", (
        spawned.stdout + spawned.stderr
    )


def test_a_forked_process_forgets_the_shared_readers_it_inherited(tree: Path) -> None:
    """A forked dask worker must not use (or close: an HDF5 close writes) the readers of the process it was
    forked from: it opens its own."""
    import actfmt.formats.registry as registry
    from actfmt.formats import shared_reader
    from actfmt.storage import resolve

    split = tree / SPLITS[0]
    loc = resolve(split)
    mine = shared_reader(loc, "pt")
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            if not registry._SHARED and mine in registry._INHERITED:
                fresh = shared_reader(loc, "pt")
                ok = fresh is not mine and np.array_equal(fresh.read_array(0, 0, 5), mine.read_array(0, 0, 5))
                code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert shared_reader(loc, "pt") is mine  # this process still has its own


def test_a_forked_child_leaves_sigint_to_the_command_and_ends_on_sigterm() -> None:
    """The CLI's handlers, inherited by a forked dask worker: Ctrl-C (sent to the worker too) is ignored there,
    SIGTERM ends it with the usual status; in the command itself they raise Interrupted."""
    import signal

    import actfmt.cli_base as cb
    from actfmt.errors import Interrupted

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cb.install_signal_handlers()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                cb.on_signal(signal.SIGINT, None)  # returns: not this process's to handle
                code = 0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 3
                cb.on_signal(signal.SIGTERM, None)  # ends the process: 128 + 15
                code = 4
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
        with pytest.raises(Interrupted):
            cb.on_signal(signal.SIGINT, None)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_worker_shutdown_noise_is_dropped_real_messages_are_kept() -> None:
    import logging

    from distributed.core import Status

    from actfmt._dask import _ShutdownNoise

    class Worker:
        status = Status.closing

    worker = Worker()
    noise = _ShutdownNoise(worker)

    def record(msg: str, *args: Any) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, args, None)

    heartbeat = record("Failed to communicate with scheduler during heartbeat.")
    assert not noise.filter(heartbeat)  # closing: the scheduler went first
    worker.status = Status.running
    assert noise.filter(heartbeat)  # running: a real problem, shown
    assert not noise.filter(record("Async instruction for %s ended with CancelledError", "<Task cancelled>"))
    assert noise.filter(record("Compute Failed"))


def test_cli_bad_scheduler_is_a_clear_error_not_a_traceback(tree: Path, tmp_path: Path) -> None:
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        res = CliRunner().invoke(
            cli,
            ["convert", str(tree), str(tmp_path / "o"), "--to", "zarr", "--executor", "dask",
             "--scheduler", "tcp://127.0.0.1:9"],
        )  # fmt: skip
    assert res.exit_code != 0
    assert "cannot connect to a dask scheduler" in res.output and "tcp://127.0.0.1:9" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_scheduler_without_dask_executor_and_unknown_executor_are_refused(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="--scheduler needs --executor dask"):
        convert(tree, tmp_path / "o", to="zarr", scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(ConversionError, match="choose one of: local, dask"):
        convert(tree, tmp_path / "o", to="zarr", executor="ray")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("to", list(FORMATS))
def test_tasks_never_share_a_file_hdf5_runs_as_one_task(tree: Path, tmp_path: Path, to: str) -> None:
    from actfmt.formats import open_reader
    from actfmt.formats.base import WriteOptions
    from actfmt.storage import resolve

    job = plan(resolve(tree), resolve(tmp_path / "o"), to)[0]
    with open_reader(job.source) as r:
        spec = spec_for(r, job.source_format, None)
    todo = [0, 2]  # layer_01 is done
    tasks = layer_tasks(
        job.source,
        job.source_format,
        resolve(tmp_path / "p"),
        to,
        spec,
        WriteOptions(),
        todo,
        "x",
        True,
        None,
    )
    if to == "hdf5":  # one file: one sequential task with every layer still to do
        assert [t.layers for t in tasks] == [(0, 2)]
    else:  # one layer per task: layers never share a chunk, shard or file
        assert [t.layers for t in tasks] == [(0,), (2,)]
    pickle.loads(pickle.dumps(tasks))  # tasks travel to other processes


@pytest.mark.parametrize("to", ["zarr", "safetensors"])
def test_a_layer_task_on_dask_runs_on_its_own_thread(
    tree: Path,
    tmp_path: Path,
    to: str,
    local_outputs: dict[str, tuple[Path, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dask schedules one task per worker thread: a task there has one codec thread and reads each block on
    its own thread (no read-ahead pool), with the checksums of a local run."""
    from actfmt.conversion import executors, run_layer_task, tasks
    from actfmt.formats import open_reader
    from actfmt.formats.base import WriteOptions
    from actfmt.storage import resolve

    job = plan(resolve(tree), resolve(tmp_path / "o"), to)[0]
    with open_reader(job.source) as r:
        spec = spec_for(r, job.source_format, None)
    work = resolve(tmp_path / "p")
    get_format(to).writer_class().create(work, spec, WriteOptions())
    (task,) = layer_tasks(
        job.source, job.source_format, work, to, spec, WriteOptions(compression=None), [1], "x", True, None
    )
    assert task.read_ahead and "threads" not in task.options.extra
    worker_task = executors.on_dask(task)
    assert not worker_task.read_ahead and worker_task.options.extra["threads"] == 1
    pickle.loads(pickle.dumps(worker_task))

    def no_pool(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a read-ahead thread on a dask worker")

    monkeypatch.setattr(tasks, "ThreadPoolExecutor", no_pool)
    (res,) = run_layer_task(worker_task)
    assert res.name == "layer_01" and res.checksum == local_outputs[to][1].checksums[job.location]["layer_01"]
    with pytest.raises(AssertionError, match="read-ahead"):
        run_layer_task(task)


def test_small_layer_tasks_are_merged_on_dask_big_ones_first_single_layers_last(tmp_path: Path) -> None:
    """A dask task costs ~10 ms of CPU whatever it does: small layers go in tasks of several, in order, each
    layer once, none above TASK_TARGET_BYTES; guided: each takes at most 1/(TASKS_PER_THREAD x threads) of
    the layers left, so sizes only shrink and the last tasks are single layers; big layers stay one per task."""
    from actfmt.conversion import executors
    from actfmt.formats.base import LayerInfo, SplitSpec, WriteOptions
    from actfmt.storage import resolve

    def tasks_of(layers: int, rows: int) -> list[Any]:
        infos = [LayerInfo(f"layer_{i:02d}", i, rows, 4096, "bfloat16") for i in range(layers)]
        spec = SplitSpec({}, infos)
        loc = resolve(tmp_path)
        return layer_tasks(
            loc, "pt", loc, "zarr", spec, WriteOptions(), list(range(layers)), "a/EM", True, None
        )

    seed = tasks_of(28, 7049)  # the seed split: 58 MB layers, 4 to a 256 MiB task
    merged = executors.group_tasks(seed, threads=2)
    assert [len(t.layers) for t in merged] == [4, 4, 4, 4, 3, 3, 2, 1, 1, 1, 1]
    assert [p for t in merged for p in t.layers] == list(range(28))
    assert merged[0].key == "a/EM/layer_00+layer_01+layer_02+layer_03"
    assert merged[-1] is seed[-1]  # a one-layer task stays the task it was
    small = tasks_of(40, 700)  # 5.7 MB layers: the byte cap does not bind, the share of the rest does
    sizes = [len(t.layers) for t in executors.group_tasks(small, threads=2)]
    assert sizes[0] == 10 and sizes == sorted(sizes, reverse=True) and sizes[-2:] == [1, 1]
    for threads in (1, 3, 8):
        for t in executors.group_tasks(small, threads):
            assert sum(small[p].spec.layers[p].nbytes for p in t.layers) <= executors.TASK_TARGET_BYTES
    assert executors.group_tasks(seed, threads=16) == seed  # 2 x 16 shares: every layer alone
    big = tasks_of(6, 200_000)  # 1.6 GB layers: one task each
    assert executors.group_tasks(big, threads=1) == big
    assert executors.group_tasks(seed[:1], threads=1) == seed[:1]


# ----------------------------------------------------------------------------------------------------------
# failures and retries (in-process workers see the injected failure)


class _Flaky:
    """Make ``Writer.write`` fail: after scribbling garbage over the block it was given (a torn write)."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, cls: type, fail_times: int, layers: set[str] | None = None
    ) -> None:
        self.original = cls.write
        self.fail_times = fail_times
        self.layers = layers
        self.failures: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

        def write(writer: Any, layer: int, start: int, data: np.ndarray | None, runs: Any = None) -> None:
            self.write(writer, layer, start, data, runs)

        monkeypatch.setattr(cls, "write", write)

    def write(self, writer: Any, layer: int, start: int, data: np.ndarray | None, runs: Any) -> None:
        name = writer.spec.layers[layer].name
        key = (str(writer.location), name)
        with self.lock:
            fail = (self.layers is None or name in self.layers) and self.failures.get(
                key, 0
            ) < self.fail_times
            if fail:
                self.failures[key] = self.failures.get(key, 0) + 1
        if fail:
            info = writer.spec.layers[layer]
            rows = len(data) if data is not None else sum(n for _, _, n in runs) // info.row_bytes
            garbage = np.full((rows, info.hidden_dim), 0x7FC1, dtype=np.uint16)  # bf16 NaN bits
            self.original(writer, layer, start, garbage)
            raise RuntimeError(f"injected failure writing {name} at row {start}")
        self.original(writer, layer, start, data, runs)


@pytest.mark.slow
@pytest.mark.parametrize("to", list(FORMATS))
def test_failed_task_is_retried_and_the_store_is_bit_exact(
    tree: Path,
    tmp_path: Path,
    inproc_client: distributed.Client,
    local_outputs: dict[str, tuple[Path, Any]],
    monkeypatch: pytest.MonkeyPatch,
    to: str,
) -> None:
    writer_cls = get_format(to).writer_class()
    # every task fails once, after a torn write, and is retried.  HDF5 runs a split as one task: its middle
    # layer fails, so the retry rewrites the first layer too.
    flaky = _Flaky(monkeypatch, writer_cls, fail_times=1, layers={"layer_01"} if to == "hdf5" else None)
    res = convert(tree, tmp_path / "out", to=to, executor="dask", scheduler=inproc_client)
    assert len(flaky.failures) == (2 if to == "hdf5" else 2 * LAYERS)
    assert set(flaky.failures.values()) == {1}
    assert res.checksums == local_outputs[to][1].checksums
    same = verify(local_outputs[to][0], tmp_path / "out")
    assert same.equal, same.differences


@pytest.mark.slow
def test_retries_exhausted_fail_cleanly_then_resume_finishes(
    tree: Path,
    tmp_path: Path,
    inproc_client: distributed.Client,
    local_outputs: dict[str, tuple[Path, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actfmt import _dask

    writer_cls = get_format("zarr").writer_class()
    flaky = _Flaky(monkeypatch, writer_cls, fail_times=100, layers={"layer_01"})
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"layer_01 failed on the dask cluster after 2 retries") as ei:
        convert(tree, out, to="zarr", executor="dask", scheduler=inproc_client)
    assert "--resume" in str(ei.value) and "injected failure" in str(ei.value)
    assert max(flaky.failures.values()) == _dask.TASK_RETRIES + 1
    assert not out.exists() or not list(out.rglob("*.zarr"))  # nothing published
    partial = out / "org_Tiny-Model" / "SP_test" / ".EM.zarr.actfmt-partial"
    journal = (partial.parent / ".EM.zarr.actfmt-state.jsonl").read_text().splitlines()
    layers = {json.loads(line).get("layer") for line in journal} - {None}
    assert layers <= {"layer_00", "layer_02"} and partial.is_dir()  # the layers that finished are kept
    monkeypatch.undo()
    res = convert(tree, out, to="zarr", executor="dask", scheduler=inproc_client, resume=True)
    # the EM layers the first run did not finish (layer_01, and layer_02 when it was cancelled before it ended:
    # it depends on the cluster's timing), then all of Neutral
    assert res.layers == (LAYERS - len(layers)) + LAYERS
    same = verify(local_outputs["zarr"][0], out)
    assert same.equal, same.differences


# ----------------------------------------------------------------------------------------------------------
# LayerView.to_dask()


def _seed(tree: Path, split: str, layer: int) -> torch.Tensor:
    return seed_load(tree / split, f"layer_{layer:02d}")


def _as_torch(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.view(dtype) if dtype == torch.bfloat16 else t


def _split_of(out: Path) -> Path:
    return next(p for p, _ in find_splits(out) if "EM" in p.name and "Neutral" not in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("to", list(FORMATS))
def test_to_dask_on_the_process_cluster_equals_the_seed_loader(
    tree: Path, client: distributed.Client, local_outputs: dict[str, tuple[Path, Any]], to: str
) -> None:
    import dask.array as da

    with actfmt.open(_split_of(local_outputs[to][0])) as split:
        for i in range(LAYERS):
            ref = _seed(tree, SPLITS[0], i)
            x = split.layer(i).to_dask(chunk_rows=50)
            assert isinstance(x, da.Array)
            assert x.shape == (TOTAL, HIDDEN) and x.dtype == np.dtype("<u2")  # bfloat16 as its bits
            got = client.compute(x).result()  # blocks read in the worker processes
            assert torch.equal(bits(_as_torch(got, torch.bfloat16)), bits(ref))
            f32 = client.compute(split.layer(i).to_dask(dtype="float32")).result()
            assert f32.dtype == np.float32 and torch.equal(torch.from_numpy(f32), ref.float())
            part = client.compute(x[5:150:3, 2:9]).result()
            assert torch.equal(bits(_as_torch(part, torch.bfloat16)), bits(ref[5:150:3, 2:9]))
            mean = float(client.compute(split.layer(i).to_dask(dtype="float32").mean()).result())
            assert mean == pytest.approx(float(ref.double().mean()), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("to", list(FORMATS))
def test_to_dask_blocks_follow_shards_and_chunks(
    tree: Path, local_outputs: dict[str, tuple[Path, Any]], to: str
) -> None:
    with actfmt.open(_split_of(local_outputs[to][0])) as split:
        view = split.layer(1)
        x = view.to_dask(chunk_rows=100)
        rows = x.chunks[0]
        assert sum(rows) == TOTAL and x.chunks[1] == (HIDDEN,)
        if to == "pt":  # whole shards, grouped up to about 100 rows
            cuts = set(np.cumsum(SHARD_ROWS).tolist())
            assert set(np.cumsum(rows).tolist()) <= cuts and len(rows) > 1
        else:
            assert rows == (100, 100, 3)
        default = view.to_dask().chunks[0]
        assert sum(default) == TOTAL
        if to == "pt":
            assert default == (TOTAL,)  # tiny layer: all shards in one ~64 MiB block
        ref = _seed(tree, SPLITS[0], 1)
        got = x.compute(scheduler="threads")
        assert torch.equal(bits(_as_torch(got, torch.bfloat16)), bits(ref))
        again = pickle.loads(pickle.dumps(x)).compute(scheduler="sync")
        assert np.array_equal(again, got)
        picked = x[[7, 3, 7, -1]].compute(scheduler="sync")
        assert torch.equal(bits(_as_torch(picked, torch.bfloat16)), bits(ref[[7, 3, 7, TOTAL - 1]]))


def test_to_dask_float16_and_float32_layers_keep_their_dtype(tmp_path: Path) -> None:
    from ._trees import make_split

    for dt, npdt in ((torch.float16, np.float16), (torch.float32, np.float32)):
        src = tmp_path / f"{dt}" / "EM"
        data = make_split(src, total=90, hidden=8, layers=1, shard_size=32, batch_size=8, dtype=dt)
        for to in ("pt", "zarr"):
            path = src if to == "pt" else tmp_path / f"{dt}-{to}"
            if to != "pt":
                convert(src, path, to=to)
                path = next(p for p, _ in find_splits(path))
            with actfmt.open(path) as split:
                x = split.layer(0).to_dask(chunk_rows=40)
                assert x.dtype == npdt
                got = torch.from_numpy(x.compute(scheduler="sync"))
                assert torch.equal(bits(got), bits(data["layer_00"]))
                up = split.layer(0).to_dask(dtype="float32").compute(scheduler="sync")
                assert torch.equal(torch.from_numpy(up), data["layer_00"].float())


def test_to_dask_rejects_other_dtypes_and_bad_chunks(local_outputs: dict[str, tuple[Path, Any]]) -> None:
    with actfmt.open(_split_of(local_outputs["zarr"][0])) as split:
        with pytest.raises(ValueError, match="choose None"):
            split.layer(0).to_dask(dtype="float16")
        with pytest.raises(ValueError, match="at least 1"):
            split.layer(0).to_dask(chunk_rows=0)
