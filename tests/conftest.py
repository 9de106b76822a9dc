"""Test setup: the Triton interpreter must be enabled before any kernel module is imported.
(``benchmarks/gpu_check.sh`` sets TRITON_INTERPRET=0 so that tests/test_gpu.py runs compiled Triton.)"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like made during the test is NaN-filled (float) or -1 (int), so an
    output element a kernel forgets to write cannot pass."""
    empty, empty_like, empty_strided = torch.empty, torch.empty_like, torch.empty_strided

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    monkeypatch.setattr(torch, "empty_strided", lambda *a, **kw: poison(empty_strided(*a, **kw)))


def tiny_model(**kwargs):
    """A small CLARiTy model for fast CPU tests (D = 48, depth 4, 3 heads, 64 x 64 images)."""
    from clarity_fast import Clarity
    args = dict(img_size=64, patch_size=16, num_classes=5, embed_dim=48, depth=4, num_heads=3,
                num_map_layers=2, num_oct_layers=2)
    args.update(kwargs)
    return Clarity(**args)


def tiny_train_args(run, num_val: int = 12) -> list:
    """``clarity-fast train`` arguments for a one-epoch run of a tiny model on 16 phantoms into ``run``."""
    return ["train", "--set", "model_args={img_size: 64, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
            "num_map_layers: 2, num_oct_layers: 2, in_chans: 1}", "--set", "num_train=16", "--set",
            f"num_val={num_val}", "--set", "epochs=1", "--set", "batch_size=8", "--set", f"output_dir={run}",
            "--set", "device=cpu"]
