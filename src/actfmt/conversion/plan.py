"""Planning a conversion: every split under the source, mapped to its destination (the tree is mirrored), and
the refusals that keep a source safe.

Nothing a user types may delete or modify a source: a destination (or anything a conversion writes, replaces or
cleans up beside it: its partial store, the old store an ``--overwrite`` renames aside) that is, contains, or
lies inside a source is refused before anything is touched.  So are a destination ``/``, a split that would
convert to ``/`` or to the home directory (or above it), and two sources that would convert to one destination
(``EM/`` and ``EM.zarr`` to ``EM/``).  What ``--overwrite`` may replace (a complete actfmt store of the target
format, nothing else) is checked under the destination's lock, by :func:`actfmt.conversion.split.convert_split`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from actfmt.errors import ConversionError
from actfmt.formats import get_format, no_split_found, walk_splits
from actfmt.formats.walk import Walk
from actfmt.storage import LocalLocation, Location
from actfmt.storage.commit import sibling

__all__ = ["SplitJob", "check_safe", "plan"]


@dataclass(frozen=True)
class SplitJob:
    """One split to convert: where it is, what it is, where it goes."""

    source: Location
    source_format: str
    destination: Location
    location: str  # relative to the source root, "/"-separated

    @property
    def label(self) -> str:
        """What progress shows for this split: its location, or its name when the source is the split."""
        return self.source.name if self.location == "." else self.location


def plan(src: Location, dst: Location, to: str, walk: Walk | None = None) -> list[SplitJob]:
    """Map every split under ``src`` to its destination under ``dst``: ``SRC/a/b/EM`` -> ``DST/a/b/EM.zarr``."""
    fmt = get_format(to)
    walk = walk if walk is not None else walk_splits(src)
    if not walk.splits:
        raise no_split_found(src)
    jobs = []
    taken: dict[Location, SplitJob] = {}
    for split in walk.splits:
        parent = dst if split.rel == "." else dst.joinpath(*split.rel.split("/")[:-1])
        job = SplitJob(split.location, split.format, fmt.destination(parent / split.location.name), split.rel)
        other = taken.get(job.destination)
        if other is not None:
            raise ConversionError(
                f"{job.destination}: two sources convert to this one destination, {other.source} and "
                f"{job.source}; convert them one at a time to different destinations, or rename one."
            )
        taken[job.destination] = job
        jobs.append(job)
    return jobs


def _protected() -> set[str]:
    """Places never written or replaced: ``/`` and the home directory (and every directory above it)."""
    out = {"/"}
    home = os.path.expanduser("~")
    if home and home != "~":
        d = os.path.realpath(home)
        while True:
            out.add(d)
            up = os.path.dirname(d)
            if up == d:
                break
            d = up
    return out


def _real(loc: Location) -> Location:
    return LocalLocation(os.path.realpath(loc.path)) if isinstance(loc, LocalLocation) else loc


def _overlap(a: Location, b: Location) -> bool:
    """Is one of ``a`` and ``b`` the other or inside it (links resolved)?"""
    ra, rb = _real(a), _real(b)
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def check_safe(src: Location, dst: Location, jobs: list[SplitJob]) -> None:
    """Refuse any conversion that could delete or modify its source (see the module docstring), or that would
    write ``/`` or replace the home directory."""
    if isinstance(dst, LocalLocation) and os.path.realpath(dst.path) == "/":
        raise ConversionError(
            f"{dst}: the destination is the root directory /; choose a directory of its own."
        )
    protected = _protected()
    for job in jobs:
        if isinstance(job.destination, LocalLocation) and os.path.realpath(job.destination.path) in protected:
            raise ConversionError(
                f"{job.destination}: {job.source} would convert to this directory (/, the home directory or a "
                f"directory above it), which actfmt never writes or replaces; choose another destination."
            )
    if _real(src) == _real(dst) or any(_real(j.destination) == _real(j.source) for j in jobs):
        raise ConversionError(f"{dst}: the destination is the source; choose another destination.")
    if _real(dst).is_relative_to(_real(src)):
        raise ConversionError(
            f"{dst}: the destination is inside the source {src}, which actfmt never modifies; choose a "
            f"destination outside it."
        )
    for job in jobs:
        for place in (job.destination, sibling(job.destination, "partial"), sibling(job.destination, "old")):
            for other in jobs:
                if _overlap(place, other.source):
                    raise ConversionError(
                        f"{job.destination}: the destination contains the source {other.source} (or lies inside "
                        f"it); writing or replacing it would delete or modify the source, which actfmt never "
                        f"does. Choose a destination outside the source."
                    )
