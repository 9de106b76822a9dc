"""benchmarks/gpu_check.sh runs through on a CPU machine (a dry run of the one script a GPU window gets)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CLARITY_GPU_CHECK_SELECT="test_attention",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    env_txt = (tmp_path / "gpu_env.txt").read_text()
    assert "torch" in env_txt and "triton" in env_txt and "timm" in env_txt
    assert "stage correctness: exit 0" in env_txt and "stage benchmarks: exit 0" in env_txt
    results = (tmp_path / "RESULTS.md").read_text()
    assert "| attention fwd+bwd B=2 N=210 float32 | sdpa+recompute (anchor) |" in results
    assert (tmp_path / "bench.json").stat().st_size > 0
