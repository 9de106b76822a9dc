"""Anatomical prior helpers: the distance map Dist of SPEC §3."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from .errors import InputError


def distance_map(masks: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance to the nearest mask pixel, divided by the grid diagonal.

    masks: ``(..., h, w)`` bool/uint8/float (nonzero = inside). Returns float32 of the
    same shape: 0 inside the mask, and 0 everywhere for an empty mask (no constraint).
    Computed once per mask (data preparation), not per training step.
    """
    if masks.dim() < 2:
        raise InputError(f"masks must be at least 2-d (..., h, w), got shape {tuple(masks.shape)}")
    h, w = masks.shape[-2:]
    flat = (masks.detach().cpu().reshape(-1, h, w) != 0).numpy()
    out = np.zeros(flat.shape, dtype=np.float32)
    for i, m in enumerate(flat):
        if m.any():
            out[i] = distance_transform_edt(~m)
    out /= math.hypot(h, w)
    return torch.from_numpy(out).reshape(masks.shape).to(masks.device)
