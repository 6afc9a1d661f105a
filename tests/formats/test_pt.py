from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actfmt.formats.pt import PtReader

from .conformance import FormatConformance, bits


def seed_loader(split: Path, layer_name: str) -> torch.Tensor:
    """The seed guide's loader, verbatim in spirit: torch.load every shard (sorted), then torch.cat."""
    shards = sorted((split / layer_name).glob("shard_*.pt"))
    return torch.cat([torch.load(s) for s in shards], dim=0)


class TestPtFormat(FormatConformance):
    format_name = "pt"

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        return bits(seed_loader(path, layer_name))

    def test_shard_boundaries_follow_source(self, tmp_path: Path) -> None:
        path, spec, _ = self.roundtrip(tmp_path, "bfloat16")
        for info in spec.layers:
            files = sorted((path / info.name).glob("shard_*.pt"))
            assert [f.name for f in files] == ["shard_000.pt", "shard_001.pt", "shard_002.pt"]
            rows = [torch.load(f, weights_only=True).shape[0] for f in files]
            assert rows == [80, 80, 43]

    def test_shards_are_not_views(self, tmp_path: Path) -> None:
        path, _, _ = self.roundtrip(tmp_path, "float32")
        for f in (path / "layer_00").glob("shard_*.pt"):
            t = torch.load(f, weights_only=True)
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()

    def test_metadata_json_has_original_keys_only(self, tmp_path: Path) -> None:
        import json

        path, spec, _ = self.roundtrip(tmp_path, "float16")
        assert json.loads((path / "metadata.json").read_text()) == spec.metadata
        r = PtReader(path)
        assert r.actfmt is not None and r.actfmt["complete"] is True
