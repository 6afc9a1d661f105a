"""Shared test helpers: where the fixture corpus and the real sample live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
VALID = FIXTURES / "valid"
INVALID = FIXTURES / "invalid"
#: The shared real sample (absent in a user's clone: tests using it skip).
REAL_SAMPLE = REPO.parent / "shared" / "data" / "real-minilm-bf16"


def load_expected(case: Path) -> dict[str, Any]:
    return json.loads((case / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture
def real_sample() -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip("the shared real sample ../shared/data/real-minilm-bf16 is not present")
    return REAL_SAMPLE
