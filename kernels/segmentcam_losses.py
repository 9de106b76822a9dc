"""SegmentCAM losses and logits (SPEC §3, §4.2): PyTorch reference.

Inputs, all ``(B, C, h, w)`` except labels ``(B, C)``:
heatmap Hm in [0, 1], scores S, anatomical mask M (bool/uint8/float, 1 inside),
distance map Dist (0 inside the mask), labels y in {0, 1}.
An empty mask for (b, c) means "no constraint": M ≡ 1 and Dist ≡ 0 there.
Per-(b, c) terms are averaged over the positive pairs (L_PRX, L_CNF, L_BAS)
or over all pairs (L_AC); a mean over an empty set is 0.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


class SegmentCAMLosses(NamedTuple):
    """Scalar losses and ``(B, C)`` logits of the SegmentCAM head."""
    prx: torch.Tensor
    cnf: torch.Tensor
    ac: torch.Tensor
    bas: torch.Tensor
    logits_fg: torch.Tensor
    logits_bg: torch.Tensor
    logits_full: torch.Tensor


def segmentcam_logits(heatmap: torch.Tensor, scores: torch.Tensor, eps: float = 1e-6,
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground, background and full logits ``(B, C)`` from Hm and S ``(B, C, h, w)`` (SPEC §2)."""
    hm, s = heatmap.flatten(2), scores.flatten(2)
    fg = (hm * s).sum(-1) / (hm.sum(-1) + eps)
    bg = ((1 - hm) * s).sum(-1) / ((1 - hm).sum(-1) + eps)
    return fg, bg, s.mean(-1)


def positive_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (B, C)`` over pairs with label 1; 0 when there are none."""
    return (values * labels).sum() / labels.sum().clamp(min=1)


def segmentcam_losses_torch(heatmap: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                            masks: Optional[torch.Tensor] = None, dist: Optional[torch.Tensor] = None,
                            eps: float = 1e-6) -> SegmentCAMLosses:
    """Reference SegmentCAM losses; without masks L_PRX and L_CNF are 0."""
    fg, bg, full = segmentcam_logits(heatmap, scores, eps)
    y = labels.to(heatmap.dtype)
    hm = heatmap.flatten(2)
    hm_sum = hm.sum(-1) + eps
    if masks is None:
        prx = cnf = heatmap.new_zeros(())
    else:
        m = masks.flatten(2).to(heatmap.dtype)
        d = dist.flatten(2).to(heatmap.dtype)
        empty = (m.sum(-1, keepdim=True) == 0)
        m = torch.where(empty, torch.ones_like(m), m)
        d = torch.where(empty, torch.zeros_like(d), d)
        prx = positive_mean((hm * d).sum(-1) / hm_sum, y)
        cnf = positive_mean((hm * (1 - m)).sum(-1) / hm_sum, y)
    ac = hm.mean()
    bas = positive_mean(F.softplus(bg) / (F.softplus(full.detach()) + eps), y)
    return SegmentCAMLosses(prx, cnf, ac, bas, fg, bg, full)
