"""Shared test helpers: where the fixture corpus and the real sample live."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._faults import open_tmp  # noqa: F401 - a fixture for every test module

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
VALID = FIXTURES / "valid"
INVALID = FIXTURES / "invalid"
#: The shared real sample (absent in a user's clone: tests using it skip).
REAL_SAMPLE = REPO.parent / "shared" / "data" / "real-minilm-bf16"
#: A secret that must never appear in any message (the S3 fixtures put it in the environment).
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def load_expected(case: Path) -> dict[str, Any]:
    return json.loads((case / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def real_sample() -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip("the shared real sample ../shared/data/real-minilm-bf16 is not present")
    return REAL_SAMPLE


# ---------------------------------------------------------------------------------------------------------
# S3: moto's server on loopback (one per test session)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Dummy credentials in the environment, a fresh bucket; yields the storage options (the endpoint)."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    bucket = f"actfmt-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    yield {"options": options, "bucket": bucket, "endpoint": s3_server}
    s3fs.S3FileSystem.clear_instance_cache()
