"""``import clarity_fast`` and a CPU forward/backward work where Triton is not installed (macOS, Windows,
slim CPU images): Triton is hidden from a fresh interpreter before the import."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["triton"] = None  # any 'import triton' now raises ImportError
import torch
import clarity_fast
from clarity_fast.kernels import _dispatch, class_token_attention, segmentcam_losses
assert not _dispatch.triton_available()
model = clarity_fast.Clarity(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=2,
                             num_map_layers=2, num_oct_layers=2)
out = model.forward_outputs(torch.randn(2, 3, 32, 32), segmentcam_logits=False)
loss = clarity_fast.ClarityLoss()(out, torch.ones(2, 3), masks=torch.rand(2, 3, 4, 4) > 0.5)
loss.total.backward()
assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
import os
os.environ["CLARITY_FAST_BACKEND"] = "fused"
try:
    class_token_attention(torch.randn(1, 1, 9, 32), torch.randn(1, 1, 9, 32), torch.randn(1, 1, 9, 32), 2)
except ValueError as e:
    assert "needs Triton, which is not installed" in str(e), e
else:
    raise AssertionError("a forced Triton backend must refuse without Triton")
print("ok")
"""


def test_import_and_cpu_training_step_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CLARITY_FAST_BACKEND")}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
