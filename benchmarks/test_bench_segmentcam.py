"""SegmentCAM losses (+ logits), forward + backward (SPEC §8: >= 5x the eager PyTorch of §3 on GPU).

Anchor: the eager reference ``segmentcam_losses_torch``. GPU: B=64, C=14, 14x14 and 32x32 grids.
CPU: B=8 (the fused kernel runs only on CUDA). The OCT loss (8 blocks of (B, C, D) class tokens)
is timed too, to show what fusing it could gain.
"""
import pytest
import torch

from clarity_fast.kernels import segmentcam_losses, segmentcam_losses_torch
from clarity_fast.losses import oct_loss
from clarity_fast.priors import distance_map


def grids():
    return [(14, 14), (32, 32)]


def batch() -> int:
    return 64 if torch.cuda.is_available() else 8


def inputs(device, B, C, h, w):
    g = torch.Generator().manual_seed(0)
    hm_logits = torch.randn(B, C, h, w, generator=g).to(device).requires_grad_()
    scores = torch.randn(B, C, h, w, generator=g).to(device).requires_grad_()
    masks = (torch.rand(B, C, h, w, generator=g) > 0.4)
    dist = distance_map(masks).to(device)
    labels = (torch.rand(B, C, generator=g) > 0.7).float().to(device)
    return hm_logits, scores, labels, masks.to(device), dist


@pytest.mark.parametrize("grid", grids(), ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_segmentcam_losses_forward_backward(measure, device, impl, grid):
    if impl == "fused" and device.type != "cuda":
        pytest.skip("the fused kernel is benchmarked on CUDA only")
    B, C = batch(), 14
    hm_logits, scores, labels, masks, dist = inputs(device, B, C, *grid)

    def step():
        if impl == "fused":
            out = segmentcam_losses(hm_logits, scores, labels, masks, dist, from_logits=True, validate=False)
        else:
            out = segmentcam_losses_torch(hm_logits, scores, labels, masks, dist, from_logits=True, validate=False)
        total = out.prx + out.cnf + out.ac + out.bas + out.logits_fg.mean() + out.logits_bg.mean()
        total.backward()
        hm_logits.grad = scores.grad = None

    measure(step, group=f"segmentcam losses B={B} C={C} {grid[0]}x{grid[1]}", name=impl, anchor=impl == "eager")


def test_oct_loss_forward_backward(measure, device):
    states = torch.randn(8, batch(), 14, 384, device=device, requires_grad=True)

    def step():
        oct_loss(states).backward()
        states.grad = None

    measure(step, group="OCT loss q=8 C=14 D=384", name="eager", anchor=True)
