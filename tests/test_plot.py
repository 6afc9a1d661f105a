"""`actfmt stats --plot`: a figure that tells datasets apart (the SVG keeps its text as text, so it is read here)."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from actfmt.cli import cli

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "fixtures/valid/real_minilm_bf16_slice/Activations/sentence-transformers_all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real slice under two dataset names, each with EM and Neutral."""
    root = tmp_path_factory.mktemp("plot") / "Activations" / "m"
    for name in ("SP_docs", "SP_medical"):
        shutil.copytree(SLICE / "SP_stdlib_docs_sample", root / name)
    return root.parent


def _texts(svg: str) -> list[str]:
    return [re.sub(r"\s+", " ", t).strip() for t in re.findall(r"<text[^>]*>(.*?)</text>", svg, flags=re.S)]


def test_the_figure_names_every_dataset_the_chance_level_and_the_best_layer(
    two_datasets: Path, tmp_path: Path
) -> None:
    target = tmp_path / "stats.svg"
    res = CliRunner().invoke(cli, ["stats", str(two_datasets), "--plot", str(target), "-q"])
    assert res.exit_code == 0, res.output
    texts = _texts(target.read_text())
    assert texts, "the SVG's text is text (svg.fonttype none), not paths"
    # one legend entry per split and per pair, each naming its dataset: no "EM, Neutral, EM, Neutral"
    for name in ("SP_docs", "SP_medical"):
        assert f"{name} · EM" in texts and f"{name} · Neutral" in texts
        assert f"{name}: EM vs Neutral" in texts
    assert len([t for t in texts if t.endswith("EM vs Neutral")]) == 2
    assert "chance" in texts
    assert sum(t.startswith("best: layer_") for t in texts) == 2
    # accuracy and Cohen's d are two panels, not twin axes sharing a colour
    assert "midpoint-probe accuracy" in texts and "Cohen's d" in texts


def test_one_dataset_keeps_short_labels_and_the_png_takes_dpi_and_size(tmp_path: Path) -> None:
    target = tmp_path / "one.png"
    args = ["stats", str(SLICE), "--plot", str(target), "-q", "--plot-dpi", "100", "--plot-size", "6", "9"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (600, 900)
    svg = tmp_path / "one.svg"
    assert CliRunner().invoke(cli, ["stats", str(SLICE), "--plot", str(svg), "-q"]).exit_code == 0
    texts = _texts(svg.read_text())
    assert "EM" in texts and "Neutral" in texts and "EM vs Neutral" in texts


def test_a_bad_size_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["stats", str(SLICE), "--plot", str(tmp_path / "x.png"), "--plot-size", "0", "3"]
    )
    assert res.exit_code == 2 and "--plot-size" in res.output
