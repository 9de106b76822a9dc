"""Batching, normalisation and augmentation shared by every data set (SPEC §5, §7).

Samples are dicts: ``image`` (1, H, W) float in [0, 1], ``labels`` (C,), ``masks`` (C, h, w) bool,
``dist`` (C, h, w) float, ``boxes`` (K, 5) rows (class, x, y, w, h) in pixels, ``id``, ``patient``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .errors import InputError
from .priors import distance_map


def collate(samples: Sequence[Dict]) -> Dict:
    """Stack tensors; keep ``boxes``, ``id`` and ``patient`` as lists."""
    out = {k: torch.stack([s[k] for s in samples]) for k in ("image", "labels", "masks", "dist") if k in samples[0]}
    for k in ("boxes", "id", "patient"):
        if k in samples[0]:
            out[k] = [s[k] for s in samples]
    return out


def normalize(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``(B, 1, H, W)`` grayscale in [0, 1] -> model input with ImageNet statistics (DINO's), replicated
    to 3 channels for ``in_chans=3`` or averaged for ``in_chans=1``."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    if in_chans == 1:
        mean, std = mean.mean().reshape(1), std.mean().reshape(1)
    elif in_chans != 3:
        raise InputError(f"in_chans must be 1 or 3, got {in_chans}")
    mean = mean.to(images.device, images.dtype).view(1, -1, 1, 1)
    std = std.to(images.device, images.dtype).view(1, -1, 1, 1)
    return (images.expand(-1, in_chans, -1, -1) - mean) / std


def augment(batch: Dict, generator: torch.Generator, scale: Sequence[float] = (0.75, 1.0),
            max_rotation: float = 7.0, brightness: float = 0.2, contrast: float = 0.2) -> Dict:
    """Random resized crop, rotation, brightness / contrast (SPEC §7), no horizontal flip.

    One affine transform per image moves the image (bilinear) and its grid masks (nearest) together;
    distance maps are recomputed from the moved masks. ``generator`` (CPU) makes it reproducible.
    """
    images, masks = batch["image"], batch["masks"]
    B = images.shape[0]
    u = torch.rand(B, 6, generator=generator)
    s = torch.sqrt(scale[0] + (scale[1] - scale[0]) * u[:, 0])  # side fraction of the crop
    angle = (u[:, 1] * 2 - 1) * math.radians(max_rotation)
    tx, ty = (u[:, 2] * 2 - 1) * (1 - s), (u[:, 3] * 2 - 1) * (1 - s)
    cos, sin = torch.cos(angle) * s, torch.sin(angle) * s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = dict(batch)
    imgs = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    b = ((u[:, 4] * 2 - 1) * brightness).to(images).view(B, 1, 1, 1)
    c = (1 + (u[:, 5] * 2 - 1) * contrast).to(images).view(B, 1, 1, 1)
    mean = imgs.mean(dim=(1, 2, 3), keepdim=True)
    out["image"] = ((imgs - mean) * c + mean + b).clamp(0, 1)
    mgrid = F.affine_grid(theta, [B, masks.shape[1], *masks.shape[-2:]], align_corners=False)
    out["masks"] = F.grid_sample(masks.float(), mgrid.to(masks.device), mode="nearest", padding_mode="zeros",
                                 align_corners=False) > 0.5
    out["dist"] = distance_map(out["masks"]).to(batch["dist"].dtype)
    out.pop("boxes", None)  # boxes are for evaluation, which is never augmented
    return out


class InMemoryDataset(torch.utils.data.Dataset):
    """Samples of another data set computed once and kept in memory (images as uint8)."""

    def __init__(self, dataset, progress: bool = True, desc: str = "preparing", workers: Optional[int] = None) -> None:
        from .progress import progress as progress_bar
        self.classes = getattr(dataset, "classes", None)
        self.samples: List[Dict] = []
        workers = min(8, (os.cpu_count() or 1) // 2) if workers is None else workers  # 1 (serial) on 2 cores
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers if workers > 1 else 0)
        for s in progress_bar(loader, desc=desc, enabled=progress, leave=False, total=len(dataset)):
            s = dict(s)
            s["image"] = (s["image"] * 255).round().to(torch.uint8)
            s["dist"] = s["dist"].half()
            self.samples.append(s)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict:
        s = dict(self.samples[index])
        s["image"] = s["image"].float() / 255
        s["dist"] = s["dist"].float()
        return s
