from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actfmt.formats.pt import PtReader
from actfmt.storage import Location, resolve

from .conformance import FormatConformance, bits


def seed_loader(split: Path, layer_name: str) -> torch.Tensor:
    """The seed guide's loader, verbatim in spirit: torch.load every shard (sorted), then torch.cat."""
    shards = sorted((split / layer_name).glob("shard_*.pt"))
    return torch.cat([torch.load(s) for s in shards], dim=0)


class TestPtFormat(FormatConformance):
    format_name = "pt"

    def independent_read(self, path: Path, layer_name: str, dtype: str) -> np.ndarray:
        return bits(seed_loader(path, layer_name))

    def a_piece_of(self, store: Location, layer_name: str) -> Location:
        return store / layer_name / "shard_001.pt"

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
        r = PtReader(resolve(path))
        assert r.actfmt is not None and r.actfmt["complete"] is True


def test_reader_handles_legacy_views_and_non_contiguous_shards(tmp_path: Path) -> None:
    """Rows come back right whether a shard is read with pread or through torch.load's fallback."""
    import json

    g = torch.Generator().manual_seed(3)
    full = torch.randn(200, 16, generator=g).to(torch.bfloat16)
    split = tmp_path / "EM"
    (split / "layer_00").mkdir(parents=True)
    meta = {
        "model_name": "m",
        "dataset_name": "d",
        "split": "EM",
        "load_in_4bit": False,
        "total_examples": 200,
        "shard_size": 80,
        "batch_size": 80,
        "hidden_dim": 16,
        "num_layers": 1,
    }
    (split / "metadata.json").write_text(json.dumps(meta))
    big = torch.cat([full[:80], torch.zeros(50, 16, dtype=torch.bfloat16)])
    torch.save(big[:80], split / "layer_00" / "shard_000.pt")  # a saved view (bloated file)
    torch.save(full[80:160].T.contiguous().T, split / "layer_00" / "shard_001.pt")  # non-contiguous strides
    torch.save(full[160:].clone(), split / "layer_00" / "shard_002.pt", _use_new_zipfile_serialization=False)
    with PtReader(resolve(split)) as r:
        assert r.layers[0].shard_rows == (80, 80, 40)
        np.testing.assert_array_equal(bits(r.read(0)), bits(full))
        np.testing.assert_array_equal(bits(r.read(0, 70, 170)), bits(full[70:170]))
        idx = np.array([199, 0, 85, 85, 160, 79, 120])
        np.testing.assert_array_equal(bits(r.take(0, idx)), bits(full[torch.from_numpy(idx)]))
