"""The stream as a torch ``IterableDataset``: :class:`Stream` (its settings, description, state and epochs) and
:func:`stream`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actfmt.dataset import Split, as_locations
from actfmt.dataset import open as open_split
from actfmt.formats.dtypes import stored_dtype
from actfmt.storage import PathLike
from actfmt.streaming.plan import (
    BLOCK_BYTES,
    BUFFER_BYTES,
    MIN_READ_BYTES,
    NORMALIZE,
    STATE_VERSION,
    Geometry,
    Plan,
    StreamError,
)
from actfmt.streaming.ring import _Counters, _Norm, _Run, _Source


class Stream(IterableDataset):  # type: ignore[type-arg]
    """An iterable of batches (see the module docstring and :func:`stream`).  Each ``iter()`` runs the rest of
    the current epoch; the next one starts the next epoch.  Picklable (files reopened in each process)."""

    def __init__(
        self,
        paths: Sequence[PathLike | Split] | PathLike | Split,
        layers: int | Sequence[int],
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        *,
        buffer_rows: int | None = None,
        block_rows: int | None = None,
        drop_last: bool = False,
        paired: bool = False,
        dtype: torch.dtype | None = None,
        normalize: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
            paths = [paths]  # type: ignore[list-item]
        if not paths:
            raise StreamError("stream: give at least one split.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(map(repr, NORMALIZE))}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.locations = as_locations(list(paths))  # type: ignore[arg-type]
        self.one_layer = isinstance(layers, (int, np.integer))
        self.layers = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(i) for i in layers]
        if not self.layers:
            raise StreamError("stream: give at least one layer.")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.paired = paired
        self.dtype = dtype
        self.normalize = normalize
        self.prefetch = int(prefetch)
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self._rank, self._world = rank, world_size
        if paired and len(self.locations) < 2:
            raise StreamError("stream: paired=True needs two or more splits (row i of each together).")
        self._describe()
        self._norm = self._normalization() if normalize else None
        align = self._align
        per_row = self.row_bytes * len(self.layers) * self.width
        if block_rows is None:
            block_rows = max(BLOCK_BYTES // max(per_row, 1), MIN_READ_BYTES // max(self.row_bytes, 1), 1)
            block_rows = max(align, block_rows // align * align)
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        if buffer_rows is None:
            buffer_rows = max(block_rows, BUFFER_BYTES // max(per_row, 1))
        if buffer_rows <= 0:
            raise ValueError(f"buffer_rows must be positive, got {buffer_rows}")
        rows = (self.sources[0].rows,) if paired else tuple(s.rows for s in self.sources)
        self.geometry = Geometry(rows, int(block_rows), max(1, int(buffer_rows) // int(block_rows)), shuffle)
        #: Split names (their last path component), in the order given: ``label`` k is ``splits[k]``.
        self.splits = [loc.name for loc in self.locations]
        self.epoch = 0
        self.position = 0  # rows of the epoch's global order consumed
        self.batches = 0  # batches this rank took in the epoch
        self.counters = _Counters()
        self._readers: list[Split] | None = None
        self._kept: dict[str, Any] = {}  # the ring and the output pools, kept from one epoch to the next

    # -- description ------------------------------------------------------------------------------------
    def _describe(self) -> None:
        self.sources: list[_Source] = []
        align = 1
        dt = width = None
        for loc in self.locations:
            with open_split(loc) as s:
                for li in self.layers:
                    try:
                        view = s.layer(li)
                    except IndexError as exc:
                        raise StreamError(f"stream: {exc}") from None
                    rows, d = view.shape
                    if dt is None:
                        dt, width = view.info.dtype, d
                    elif (view.info.dtype, d) != (dt, width):
                        raise StreamError(
                            f"{loc}: {view.name} is {view.info.dtype} x {d}, but the stream's first layer is "
                            f"{dt} x {width}: stream layers of one dtype and width."
                        )
                    if li == self.layers[0]:
                        n = rows
                    elif rows != n:
                        raise StreamError(
                            f"{loc}: {view.name} has {rows} rows, layer_{self.layers[0]:02d} has {n}."
                        )
                    cr = s._reader.chunk_rows_of(s._by_index[view.index])
                    if cr:  # whole chunks per block (a compressed chunk is decoded once)
                        lcm = math.lcm(align, int(cr))
                        align = lcm if lcm <= 1 << 16 else max(align, int(cr))
                self.sources.append(_Source(loc, n))
        if self.paired and len({s.rows for s in self.sources}) > 1:
            raise StreamError(
                "stream: paired=True needs splits of equal length, got "
                + ", ".join(f"{s.location.name}: {s.rows}" for s in self.sources)
            )
        assert dt is not None and width is not None
        self.stored = dt
        self.hidden_dim = int(width)
        self.row_bytes = int(width) * stored_dtype(dt).itemsize
        self.width = len(self.sources) if self.paired else 1  # splits read per block
        self._align = align

    def _normalization(self) -> _Norm:
        """As :class:`actfmt.torch.ActivationDataset` (``layer.stats()``, ``mean()``, ``std()``), per layer."""
        scales, centers, spreads = [], [], []
        for li in self.layers:
            figures: list[Any] = []
            for loc in self.locations:
                with open_split(loc) as s:
                    view = s.layer(li)
                    if self.normalize == "scale":
                        figures.append(view.stats())
                    else:
                        figures.append((len(view), view.mean().double(), view.std().double()))
            if self.normalize == "scale":
                rows = sum(f.rows for f in figures)
                norm = sum(f.row_norm_mean * f.rows for f in figures) / rows if rows else 0.0
                scales.append(math.sqrt(self.hidden_dim) / norm if norm else 1.0)
            else:
                n = sum(f[0] for f in figures)
                mean = sum(f[0] * f[1] for f in figures) / max(n, 1)
                var = sum(f[0] * (f[2] ** 2 + (f[1] - mean) ** 2) for f in figures) / max(n, 1)
                std = var.sqrt()
                centers.append(mean.float())
                spreads.append(torch.where(std > 0, std, torch.ones_like(std)).float())
        if self.normalize == "scale":
            return _Norm(scale=torch.tensor(scales, dtype=torch.float32))
        return _Norm(center=torch.stack(centers), spread=torch.stack(spreads))

    @property
    def block_rows(self) -> int:
        return self.geometry.block_rows

    @property
    def buffer_rows(self) -> int:
        return self.geometry.window * self.geometry.block_rows

    @property
    def total_rows(self) -> int:
        """Rows per epoch, all ranks together (before ``drop_last``)."""
        return self.geometry.total

    def ranks(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process (``DataLoader`` workers count as ranks of their own)."""
        rank, world = self._rank, self._world
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
        rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world_size {world}")
        info = get_worker_info()
        if info is not None:
            rank, world = rank * info.num_workers + info.id, world * info.num_workers
        return rank, world

    def _end(self, world: int) -> int:
        step = self.batch_size * world
        n = self.geometry.total
        return n // step * step if self.drop_last else n

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        rank, world = self.ranks()
        end, step = self._end(world), self.batch_size * world
        full, rest = divmod(end, step)
        return full + (1 if rest > rank * self.batch_size else 0)

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``epoch`` and ``position`` (rows of the epoch's global order consumed), with what the order depends on
        (checked when loaded).  Small; the same on every rank."""
        _, world = self.ranks()
        epoch, position = self.epoch, self.position
        if position >= self._end(world):
            epoch, position = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "geometry": self.geometry.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (from :meth:`state_dict`, any world size) left off."""
        if state.get("version") != STATE_VERSION:
            raise StreamError(
                f"stream state version {state.get('version')!r}: this actfmt reads {STATE_VERSION}."
            )
        if state.get("seed") != self.seed or state.get("geometry") != self.geometry.to_dict():
            raise StreamError(
                "stream state was saved for another order "
                f"(seed {state.get('seed')}, {state.get('geometry')}; this stream: seed {self.seed}, "
                f"{self.geometry.to_dict()}): build the stream with the same splits, layers, seed, "
                "block_rows and buffer_rows."
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at its beginning (with ``DataLoader`` workers, which get copies of the stream,
        call this before each epoch, as with ``DistributedSampler``)."""
        self.epoch, self.position, self.batches = int(epoch), 0, 0

    def order(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global order without reading data: ``(split position, row)`` of every row (tests, mixing)."""
        plan = Plan(self.geometry, self.seed, self.epoch if epoch is None else epoch)
        blk = [plan.slot(k) for k in range(plan.slots)]
        if not blk:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        j = np.concatenate([b for b, _ in blk])
        loc = np.concatenate([r for _, r in blk])
        return plan.split[j], plan.start[j] + loc

    # -- pickling ---------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = None
        state["_kept"] = {}
        return state

    def close(self) -> None:
        for r in self._readers or []:
            r.close()
        self._readers = None
        self._kept = {}

    def _open(self) -> list[Split]:
        if self._readers is None:
            self._readers = [open_split(loc) for loc in self.locations]
        return self._readers

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self.ranks()
        end = self._end(world)
        if self.position >= end:
            self.epoch, self.position, self.batches = self.epoch + 1, 0, 0
            return
        run = _Run(self, rank, world, end)
        try:
            while True:
                item = run.get()
                if item is None:
                    break
                batch, position = item
                self.position = position
                self.batches += 1
                yield batch
            self.epoch, self.position, self.batches = self.epoch + 1, 0, 0
        finally:
            run.stop()


def stream(
    paths: Sequence[PathLike | Split] | PathLike | Split,
    layers: int | Sequence[int],
    batch_size: int = 4096,
    shuffle: bool = True,
    seed: int = 0,
    **options: Any,
) -> Stream:
    """A shuffled stream of batches over ``paths`` (one or more splits, any format, local or fsspec URLs).

    ``layers``: one layer index (``x`` is ``[batch, d]``) or a list (``x`` is ``[batch, n_layers, d]``).  Each
    batch is a dict: ``x`` (stored dtype: bfloat16 stays bfloat16), ``index`` (int64 row numbers in their
    split), and with several splits ``label`` (int64: the split's position in ``paths``; names in
    ``Stream.splits``).  ``paired=True``: row i of every split together, ``x`` ``[batch, n_splits, d]`` (or
    ``[batch, n_splits, n_layers, d]``), ``x[:, k]`` from ``paths[k]``, no ``label``.

    Options: ``buffer_rows`` (default: :data:`BUFFER_BYTES` worth), ``block_rows`` (default:
    :data:`BLOCK_BYTES` worth, a multiple of the store's chunk rows), ``drop_last``, ``dtype``,
    ``normalize`` (``"scale"``: times ``sqrt(d) / mean row norm``; ``"standardize"``: minus the mean over the
    std; both per layer from the statistics kept with the data, as ``ActivationDataset``; float32),
    ``rank``/``world_size`` (default: ``torch.distributed``), ``prefetch`` (batches queued), ``pin_memory``,
    ``device``.  See :class:`Stream` for ``state_dict`` / ``load_state_dict`` / ``set_epoch``.
    """
    return Stream(paths, layers, batch_size, shuffle, seed, **options)
