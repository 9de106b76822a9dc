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
    return _save_png(tile(pictures, columns), path)


def _save_png(image: Image.Image, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _dashed_line(draw: ImageDraw.ImageDraw, points, color, width: int = 2, dash: int = 8) -> None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = max(1.0, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
        for s in np.arange(0, length, 2 * dash):
            e = min(length, s + dash)
            draw.line([(x0 + (x1 - x0) * s / length, y0 + (y1 - y0) * s / length),
                       (x0 + (x1 - x0) * e / length, y0 + (y1 - y0) * e / length)], fill=color, width=width)


def line_plot(series: Sequence[dict], path: Union[str, Path], title: str, xlabel: str, ylabel: str,
              xticks: Optional[Sequence[float]] = None, ylim: Optional[Sequence[float]] = None,
              size: Sequence[int] = (900, 560)) -> Path:
    """A PNG line chart. ``series``: dicts with ``name``, ``x``, ``y`` and optionally ``dashed`` (baselines),
    ``line`` (False: points only, a scatter plot) and ``color``; the legend lists them in order. The x axis
    spans ``xticks`` (default: a tick at every x of the data)."""
    W, H = size
    left, right, top, bottom = 70, 260, 40, 60
    xs = [x for s in series for x in s["x"]]
    ys = [y for s in series for y in s["y"] if y == y]
    xticks = sorted(set(xs)) if xticks is None else list(xticks)
    x0, x1 = min(xticks), max(xticks)
    y0, y1 = ylim if ylim is not None else (min(0.0, min(ys)), max(ys) * 1.05 or 1.0)
    im = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(im)

    def to_px(x: float, y: float):
        return (left + (x - x0) / ((x1 - x0) or 1) * (W - left - right),
                H - bottom - (y - y0) / ((y1 - y0) or 1) * (H - top - bottom))

    for k in range(6):  # horizontal grid and y ticks
        y = y0 + (y1 - y0) * k / 5
        px = to_px(x0, y)
        draw.line([(left, px[1]), (W - right, px[1])], fill=(225, 225, 225))
        draw.text((left - 45, px[1] - 6), f"{y:.2f}", fill=(60, 60, 60))
    for x in xticks:
        px = to_px(x, y0)
        draw.line([(px[0], H - bottom), (px[0], H - bottom + 5)], fill=(60, 60, 60))
        draw.text((px[0] - 10, H - bottom + 8), f"{x:g}", fill=(60, 60, 60))
    draw.rectangle([left, top, W - right, H - bottom], outline=(60, 60, 60))
    draw.text((left, 12), title, fill=(0, 0, 0))
    draw.text(((left + W - right) // 2 - 20, H - 25), xlabel, fill=(0, 0, 0))
    draw.text((8, top - 20), ylabel, fill=(0, 0, 0))
    for i, s in enumerate(series):
        color = tuple(s.get("color", PALETTE[i % len(PALETTE)]))
        points = [to_px(x, y) for x, y in zip(s["x"], s["y"]) if y == y]
        if len(points) > 1 and s.get("line", True):
            (_dashed_line if s.get("dashed") else lambda d, p, c: d.line(p, fill=c, width=2))(draw, points, color)
        for px in points:
            draw.ellipse([px[0] - 3, px[1] - 3, px[0] + 3, px[1] + 3], fill=color)
        ly = top + 8 + 18 * i
        if not s.get("line", True):
            draw.ellipse([W - right + 23, ly + 3, W - right + 29, ly + 9], fill=color)
        elif s.get("dashed"):
            _dashed_line(draw, [(W - right + 12, ly + 6), (W - right + 40, ly + 6)], color, dash=5)
        else:
            draw.line([(W - right + 12, ly + 6), (W - right + 40, ly + 6)], fill=color, width=2)
        draw.text((W - right + 46, ly), s["name"], fill=(0, 0, 0))
    return _save_png(im, path)


def bar_chart(groups: Sequence[str], series: Sequence[dict], path: Union[str, Path], title: str, ylabel: str,
              size: Sequence[int] = (1000, 520)) -> Path:
    """A PNG grouped bar chart: one group per entry of ``groups``, one bar per series (``name``, ``values``)."""
    W, H = size
    left, right, top, bottom = 60, 20, 60, 120
    vmax = max([v for s in series for v in s["values"] if v == v] + [1e-9])
    im = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.text((left, 12), title, fill=(0, 0, 0))
    draw.text((8, top - 18), ylabel, fill=(0, 0, 0))
    for k in range(6):
        y = H - bottom - (H - top - bottom) * k / 5
        draw.line([(left, y), (W - right, y)], fill=(225, 225, 225))
        draw.text((left - 40, y - 6), f"{vmax * k / 5:.2f}", fill=(60, 60, 60))
    gw = (W - left - right) / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    for g, name in enumerate(groups):
        gx = left + g * gw + gw * 0.1
        for i, s in enumerate(series):
            v = s["values"][g]
            if v == v:
                y = H - bottom - (H - top - bottom) * v / vmax
                draw.rectangle([gx + i * bw, y, gx + (i + 1) * bw - 1, H - bottom], fill=PALETTE[i % len(PALETTE)])
        label = Image.new("RGB", (110, 14), (255, 255, 255))
        ImageDraw.Draw(label).text((0, 0), name[:18], fill=(0, 0, 0))
        im.paste(label.rotate(60, expand=True, fillcolor=(255, 255, 255)), (int(gx), H - bottom + 4))
    for i, s in enumerate(series):
        x = left + 10 + 170 * i
        draw.rectangle([x, 34, x + 12, 46], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 16, 34), s["name"], fill=(0, 0, 0))
    return _save_png(im, path)
