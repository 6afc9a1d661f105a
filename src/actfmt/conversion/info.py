"""``actfmt info``: what each split under a path is (format, shape, dtype, size, compression, completeness)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from actfmt.formats import no_split_found, open_reader, walk_splits
from actfmt.storage import PathLike, resolve

__all__ = ["SplitInfo", "info"]


@dataclass
class SplitInfo:
    """One split as ``actfmt info`` shows it."""

    location: str
    format: str
    layers: int
    examples: int | None
    hidden_dim: int | None
    dtype: str | None
    bytes_on_disk: int
    raw_bytes: int
    chunks: list[int] | None
    compression: str | None
    complete: bool | None
    model_name: str | None = None
    dataset_name: str | None = None
    split: str | None = None

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.bytes_on_disk if self.bytes_on_disk else None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["compression_ratio"] = None if self.ratio is None else round(self.ratio, 3)
        return d


def info(path: PathLike, storage_options: dict[str, Any] | None = None) -> list[SplitInfo]:
    """Describe every split under ``path`` (a directory, or an fsspec URL with ``storage_options``): format,
    shape, dtype, bytes stored, compression.  Raises :class:`~actfmt.errors.NotASplitError` when there is none."""
    root = resolve(path, storage_options)
    splits = walk_splits(root).splits
    if not splits:
        raise no_split_found(root)
    out = []
    for split in splits:
        with open_reader(split.location, split.format) as r:
            layers = list(r.layers)
            meta = r.metadata
            extra = r.describe()
            block = r.actfmt
            size = 0
            with contextlib.suppress(OSError):
                size = split.location.du()
            out.append(
                SplitInfo(
                    location=split.rel,
                    format=split.format,
                    layers=len(layers),
                    examples=layers[0].rows if layers else meta.get("total_examples"),
                    hidden_dim=layers[0].hidden_dim if layers else meta.get("hidden_dim"),
                    dtype=layers[0].dtype if layers else None,
                    bytes_on_disk=size,
                    raw_bytes=sum(li.nbytes for li in layers),
                    chunks=extra.get("chunks"),
                    compression=extra.get("compression"),
                    complete=None if block is None else bool(block.get("complete")),
                    model_name=meta.get("model_name"),
                    dataset_name=meta.get("dataset_name"),
                    split=meta.get("split"),
                )
            )
    return out
