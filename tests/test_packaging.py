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



def test_kernels_found_through_the_install(tmp_path):
    """Outside the checkout (no source tree on sys.path) clarity_fast.kernels is this checkout's kernels/."""
    run = subprocess.run([sys.executable, "-c", "import clarity_fast.kernels as k; print(k.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(run.stdout.strip()).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


def test_no_import_hooks_or_path_edits():
    """Nothing in the package, kernels, benchmarks or tests edits sys.path or loads modules by file path."""
    banned = ("sys.path", "spec_from_file_location", "sys.meta_path", "module_from_spec")
    offenders = [f"{p.relative_to(ROOT)}: {b}" for folder in ("clarity_fast", "kernels", "benchmarks", "tests")
                 for p in (ROOT / folder).rglob("*.py") if p.name != "test_packaging.py"
                 for b in banned if b in p.read_text()]
    assert not offenders
