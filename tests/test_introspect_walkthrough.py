"""docs/make_walkthrough.py still runs end to end (into a temporary directory) and writes a
page whose every image exists."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "make_walkthrough.py"


def test_walkthrough_script_runs(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "walkthrough.md").read_text(encoding="utf-8")
    assert "' Paris'" in page and "same tokens: yes" in page and "$ lucid inspect" in page
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert len(images) == 5  # lens, one head, every head, PCA, t-SNE
    for image in images:
        assert Image.open(tmp_path / image).format == "PNG"
    assert (tmp_path / "images" / "attention.html").exists()
