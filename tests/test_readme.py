"""The README's probe example runs as written (on the shipped slice of the real sample, and on the sample)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "fixtures/valid/real_minilm_bf16_slice/Activations/sentence-transformers_all-MiniLM-L6-v2"
REAL = ROOT.parent / "shared/data/real-minilm-bf16/Activations/sentence-transformers_all-MiniLM-L6-v2"


def probe_code() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next(b for b in blocks if "ActivationDataset" in b and "probe" in b)
    return code


def run_probe(root: Path, layer: int) -> float:
    code = probe_code()
    code = re.sub(r'root = ".*?"', f"root = {str(root / 'SP_stdlib_docs_sample')!r}", code)
    code = code.replace("layer=3", f"layer={layer}")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    m = re.fullmatch(r"held-out accuracy: ([\d.]+)%\n", proc.stdout)
    assert m, proc.stdout
    return float(m.group(1))


@pytest.mark.slow
def test_readme_probe_runs_on_the_shipped_slice() -> None:
    acc = run_probe(SLICE, layer=2)  # the slice keeps layers 0-2
    assert 0.0 <= acc <= 100.0


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="the real sample (../shared/data) is not in this checkout")
def test_readme_probe_learns_on_the_real_sample() -> None:
    acc = run_probe(REAL, layer=3)
    assert acc > 55.0  # chance is 50%: the probe separates EM from Neutral
    # The example is seeded: the README's figure is the one it prints.
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (said,) = re.findall(r"this prints `held-out accuracy: ([\d.]+)%`", text)
    assert float(said) == acc


def test_readme_info_example_is_what_the_demo_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `actfmt info demo-out/zarr` block is regenerated: the demo's conversion, then info at 80 columns."""
    from click.testing import CliRunner

    from actfmt.cli import cli

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```console\n\$ actfmt info demo-out/zarr\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)
    good = ROOT / "fixtures/valid/real_minilm_bf16_slice/Activations"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", str(good), "demo-out/zarr", "--to", "zarr", "-q"]).exit_code == 0
    res = runner.invoke(cli, ["info", "demo-out/zarr"], env={"COLUMNS": "80"})
    assert res.exit_code == 0 and res.output == block
