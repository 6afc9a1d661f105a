"""``actfmt verify``: do two splits or trees (any two formats, any storages) hold the same activations?"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from actfmt.checksum import scan_blocks
from actfmt.formats import open_reader, walk_splits
from actfmt.formats.base import ACTFMT_KEY, Reader
from actfmt.formats.registry import no_split_found, split_name
from actfmt.formats.walk import FoundSplit
from actfmt.progress import ProgressCallback, ProgressEvent, emit
from actfmt.storage import PathLike, resolve

__all__ = ["VerifyResult", "verify"]


@dataclass
class VerifyResult:
    """Do two splits or trees hold the same activations?  ``differences`` says where they do not."""

    a: str
    b: str
    splits: int = 0
    layers: int = 0
    bytes: int = 0
    differences: list[str] = field(default_factory=list)
    first: dict[str, Any] | None = None  # {"split", "layer", "row"} of the first differing row
    #: The pairs compared, as (location in A, location in B).
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "equal": self.equal}


def _key(rel: str) -> str:
    """A split's location without a store suffix: ``m/d/EM.zarr`` and ``m/d/EM`` are the same split."""
    if rel == ".":
        return "."
    head, _, name = rel.rpartition("/")
    name = split_name(name)
    return f"{head}/{name}" if head else name


def _by_key(splits: list[FoundSplit]) -> dict[str, list[FoundSplit]]:
    out: dict[str, list[FoundSplit]] = {}
    for s in splits:
        out.setdefault(_key(s.rel), []).append(s)
    return out


def verify(
    a: PathLike,
    b: PathLike,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
) -> VerifyResult:
    """Compare two splits or trees (any two formats) bit for bit, layer by layer.

    Splits are paired by location, a store's suffix aside (``EM`` with ``EM.zarr``).  When one side holds the
    same split in several formats (``EM.zarr`` and ``EM.h5``), every one of them is compared.  Either side may
    be an fsspec URL, with ``storage_options`` for its filesystem."""
    la, lb = resolve(a, storage_options), resolve(b, storage_options)
    res = VerifyResult(str(a), str(b))
    sa, sb = walk_splits(la).splits, walk_splits(lb).splits
    if not sa:
        raise no_split_found(la)
    if not sb:
        raise no_split_found(lb)
    ka, kb = _by_key(sa), _by_key(sb)
    if len(ka) == 1 and len(kb) == 1:  # two single splits (or one split in several formats): whatever names
        kb = {next(iter(ka)): next(iter(kb.values()))}
    for key in sorted(set(ka) - set(kb)):
        res.differences.append(f"{key}: only in {a}")
    for key in sorted(set(kb) - set(ka)):
        res.differences.append(f"{key}: only in {b}")
    for key in sorted(set(ka) & set(kb)):
        many = len(ka[key]) > 1 or len(kb[key]) > 1
        for x in ka[key]:
            for y in kb[key]:
                label = f"{x.rel} vs {y.rel}" if many else key
                with open_reader(x.location, x.format) as ra, open_reader(y.location, y.format) as rb:
                    res.splits += 1
                    res.pairs.append((x.rel, y.rel))
                    _compare_split(label, ra, rb, res, progress)
    return res


def _compare_split(
    key: str, ra: Reader, rb: Reader, res: VerifyResult, progress: ProgressCallback | None
) -> None:
    import numpy as np

    ma = {k: v for k, v in ra.metadata.items() if k != ACTFMT_KEY}
    mb = {k: v for k, v in rb.metadata.items() if k != ACTFMT_KEY}
    if ma != mb:
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k, "<absent>") != mb.get(k, "<absent>"))
        res.differences.append(f"{key}: metadata differs in {', '.join(keys)}")
    la = {li.name: (pos, li) for pos, li in enumerate(ra.layers)}
    lb = {li.name: (pos, li) for pos, li in enumerate(rb.layers)}
    for name in sorted(set(la) ^ set(lb)):
        res.differences.append(f"{key}/{name}: only in {'A' if name in la else 'B'}")
    total = sum(li.nbytes for _, li in la.values())
    emit(
        progress,
        ProgressEvent("start", "verify", total=total, description=ra.location.name if key == "." else key),
    )
    for name in sorted(set(la) & set(lb)):
        (pa, ia), (pb, ib) = la[name], lb[name]
        if (ia.rows, ia.hidden_dim, ia.dtype) != (ib.rows, ib.hidden_dim, ib.dtype):
            res.differences.append(
                f"{key}/{name}: shape/dtype {ia.rows}x{ia.hidden_dim} {ia.dtype} vs "
                f"{ib.rows}x{ib.hidden_dim} {ib.dtype}"
            )
            continue
        res.layers += 1
        for start, stop in scan_blocks(ia):
            xa = ra.read_array(pa, start, stop).reshape(-1).view(np.uint8)
            xb = rb.read_array(pb, start, stop).reshape(-1).view(np.uint8)
            res.bytes += xa.size
            emit(progress, ProgressEvent("advance", "verify", advance=xa.size, nbytes=xa.size))
            if not np.array_equal(xa, xb):
                bad = int(np.flatnonzero(xa != xb)[0]) // ia.row_bytes
                row = start + bad
                res.differences.append(f"{key}/{name}: first difference at row {row}")
                if res.first is None:
                    res.first = {"split": key, "layer": name, "row": row}
                break
    emit(progress, ProgressEvent("end", "verify", description=key))
