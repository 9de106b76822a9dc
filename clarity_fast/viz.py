"""Pictures: phantom contact sheets and localization overlays (PNG, PIL only)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from .boxes import normalised_upsample
from .pathologies import CLASS_NAMES

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200)]


def _rgb(image: torch.Tensor) -> Image.Image:
    """``(1, H, W)`` or ``(H, W)`` in [0, 1] -> RGB PIL image."""
    a = (image.detach().float().squeeze().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def heat_colors(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 (black-red-yellow-white ramp)."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.concatenate([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def draw_box(draw: ImageDraw.ImageDraw, box: Sequence[float], color, label: Optional[str] = None,
             width: int = 2) -> None:
    """``box`` = (x, y, w, h) in pixels."""
    x, y, w, h = [float(b) for b in box]
    draw.rectangle([x, y, x + w, y + h], outline=color, width=width)
    if label:
        draw.text((x + 2, max(0, y - 11)), label, fill=color)


def overlay(image: torch.Tensor, loc_map: Optional[torch.Tensor] = None, pred_boxes=(), gt_boxes=(),
            title: Optional[str] = None, alpha: float = 0.45) -> Image.Image:
    """Image with a map (any resolution; upsampled and normalised exactly as boxes are drawn from it,
    :func:`clarity_fast.boxes.normalised_upsample`), predicted boxes (cyan) and ground-truth boxes (green);
    boxes are (x, y, w, h) in image pixels."""
    base = _rgb(image)
    if loc_map is not None:
        m = normalised_upsample(loc_map, base.size[::-1])
        if m is not None:  # a flat map has nothing to show
            base = Image.blend(base, Image.fromarray(heat_colors(m)), alpha)
    draw = ImageDraw.Draw(base)
    for b in gt_boxes:
        draw_box(draw, b, (60, 220, 60))
    for b in pred_boxes:
        draw_box(draw, b, (0, 220, 255))
    if title:
        draw.text((3, 3), title, fill=(255, 255, 255))
    return base


def tile(images: Sequence[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def sample_picture(sample: dict, classes: Sequence[str] = CLASS_NAMES) -> Image.Image:
    """A data-set sample: the image, the anatomical prior of each of its findings tinted in the
    class colour, and its ground-truth boxes labelled with the class."""
    base = _rgb(sample["image"])
    H, W = base.size[1], base.size[0]
    arr = np.asarray(base).astype(np.float32)
    for c in torch.nonzero(sample["labels"]).flatten().tolist():
        m = torch.nn.functional.interpolate(sample["masks"][c][None, None].float(), size=(H, W), mode="nearest")
        tint = np.array(PALETTE[c % len(PALETTE)], dtype=np.float32)
        arr = np.where(m[0, 0].numpy()[..., None] > 0, 0.8 * arr + 0.2 * tint, arr)
    base = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(base)
    for row in sample["boxes"].tolist():
        c = int(row[0])
        draw_box(draw, row[1:], PALETTE[c % len(PALETTE)], classes[c])
    if not sample["labels"].any():
        draw.text((3, 3), "No Finding", fill=(255, 255, 255))
    return base


def contact_sheet(dataset, path: Union[str, Path], count: int = 16, columns: int = 4) -> Path:
    """Write a PNG grid of the first ``count`` samples of ``dataset`` (see :func:`sample_picture`)."""
    pictures = [sample_picture(dataset[i], getattr(dataset, "classes", CLASS_NAMES))
                for i in range(min(count, len(dataset)))]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tile(pictures, columns).save(path)
    return path
