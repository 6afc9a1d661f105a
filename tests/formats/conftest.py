"""Fixtures of the format conformance suite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from actfmt.storage import LocalLocation, Location, resolve

from .conformance import STORAGES


@pytest.fixture(params=STORAGES)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """An empty directory on each storage."""
    if request.param == "local":
        return LocalLocation(tmp_path / "store")
    if request.param == "memory":
        return resolve(f"memory://actfmt-conformance-{uuid.uuid4().hex[:12]}")
    s3 = request.getfixturevalue("s3")
    return resolve(f"s3://{s3['bucket']}/conformance", s3["options"])
