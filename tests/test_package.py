"""Packaging: kernels/ and configs/ install under jaxlm.*, never as top-level modules."""

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


def test_no_top_level_kernels_module(tmp_path):
    code = ("import importlib.util, jaxlm.kernels, jaxlm.configs.tiny;"
            "print(importlib.util.find_spec('kernels'), importlib.util.find_spec('configs'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("jaxlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxlm/kernels/__init__.py" in names and "jaxlm/configs/tiny.py" in names
    assert "jaxlm/assets/tiny_bpe.json" in names and "jaxlm/assets/shakespeare/train.jsonl" in names
    assert not any(n.startswith(("kernels/", "configs/")) for n in names)
