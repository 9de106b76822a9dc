"""Packaging: the kernels install as clarity_fast.kernels, never as a top-level ``kernels``."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, cwd=tmp_path)
    wheel, = tmp_path.glob("clarity_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "clarity_fast/kernels/__init__.py" in names
    assert "clarity_fast/kernels/class_token_attention.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["clarity_fast"]

