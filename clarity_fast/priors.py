"""The anatomical prior (SPEC §3, §5): region masks on the patch grid, class masks from the class -> region
table, and the distance map Dist. Used by the phantom and the NIH data alike."""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from .errors import InputError
from .pathologies import CLASS_NAMES, CLASS_REGIONS, REGION_NAMES, ClassRegion


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


def grid_regions(regions: Union[np.ndarray, torch.Tensor], grid: Tuple[int, int]) -> torch.Tensor:
    """Full-resolution region masks ``(..., R, H, W)`` -> grid masks ``(..., R, h, w)`` bool: a cell belongs
    to a region when any of its pixels does (priors are permissive: thin structures such as the lung
    lateral to the heart must survive). Phantom regions and PSPNet output (``masks`` step) both use it."""
    t = torch.as_tensor(np.ascontiguousarray(regions) if isinstance(regions, np.ndarray) else regions)
    if t.dim() < 3:
        raise InputError(f"regions must be (..., R, H, W), got shape {tuple(t.shape)}")
    lead = t.shape[:-2]
    pooled = F.adaptive_max_pool2d(t.float().reshape(-1, *t.shape[-2:]), grid)
    return pooled.reshape(*lead, *pooled.shape[-2:]) > 0


def dilate(masks: torch.Tensor, steps: int) -> torch.Tensor:
    """Binary dilation of ``(..., h, w)`` masks by ``steps`` pixels (3 x 3 structuring element)."""
    if steps <= 0:
        return masks.bool()
    shape = masks.shape
    x = masks.reshape(-1, 1, *shape[-2:]).float()
    for _ in range(steps):
        x = F.max_pool2d(x, 3, stride=1, padding=1)
    return x.reshape(shape) > 0


def class_masks(region_masks: torch.Tensor, classes: Sequence[str] = CLASS_NAMES,
                table: Dict[str, ClassRegion] = CLASS_REGIONS, dilation: int = 1) -> torch.Tensor:
    """Region masks ``(..., len(REGION_NAMES), h, w)`` at grid resolution -> class masks
    ``(..., len(classes), h, w)`` bool: the union of each class's regions, dilated by
    ``dilation`` (+ the class's extra) patches."""
    if region_masks.shape[-3] != len(REGION_NAMES):
        raise InputError(f"region_masks must have {len(REGION_NAMES)} regions (REGION_NAMES) at dim -3, "
                         f"got shape {tuple(region_masks.shape)}")
    missing = [c for c in classes if c not in table]
    if missing:
        raise InputError(f"no anatomical regions configured for classes {missing}")
    index = {r: i for i, r in enumerate(REGION_NAMES)}
    out = []
    for c in classes:
        entry = table[c]
        union = region_masks[..., [index[r] for r in entry.regions], :, :].bool().any(dim=-3)
        out.append(dilate(union, dilation + entry.extra_dilation))
    return torch.stack(out, dim=-3)
