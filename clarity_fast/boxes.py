"""Map -> box, the one protocol (SPEC §6) that evaluation, ``predict`` and the overlays share.

A class's map (Ξ, or any ``(h, w)`` map) is upsampled bilinearly to the image size, min-max normalised,
thresholded at ξ, and the bounding box of the largest 4-connected component is the box. A :data:`Box` is
``(x, y, w, h)`` in image pixels, as NIH's ``BBox_List_2017.csv`` writes them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Box = Tuple[float, float, float, float]  # x, y, w, h in image pixels


def normalised_upsample(loc_map: torch.Tensor, image_size: Tuple[int, int]) -> Optional[np.ndarray]:
    """``(h, w)`` map -> ``(H, W)`` float32 array in [0, 1]: bilinear upsampling to ``image_size = (H, W)``,
    then min-max normalisation; None if the map is flat."""
    m = F.interpolate(loc_map.detach().float().cpu()[None, None], size=tuple(image_size), mode="bilinear",
                      align_corners=False)[0, 0].numpy()
    lo, hi = m.min(), m.max()
    if not hi > lo:
        return None
    return (m - lo) / (hi - lo)


def largest_component_box(foreground: np.ndarray) -> Optional[Box]:
    """Bounding box (x, y, w, h) of the largest 4-connected component of a 2-d bool array; None if empty."""
    rows = np.flatnonzero(foreground.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(foreground.any(0))
    r0, c0 = int(rows[0]), int(cols[0])
    crop = foreground[r0:rows[-1] + 1, c0:cols[-1] + 1]  # label only the foreground's bounding box
    labels, n = ndimage.label(crop)
    if n > 1:
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        crop = labels == largest
        rows, cols = np.flatnonzero(crop.any(1)), np.flatnonzero(crop.any(0))
        r0, c0 = r0 + int(rows[0]), c0 + int(cols[0])
        return float(c0), float(r0), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)
    return float(c0), float(r0), float(crop.shape[1]), float(crop.shape[0])


def box_from_map(loc_map: torch.Tensor, image_size: Tuple[int, int], threshold: float) -> Optional[Box]:
    """``(h, w)`` map -> box of the largest connected component at or above ``threshold`` after bilinear
    upsampling to ``image_size = (H, W)`` and min-max normalisation; None if the map is flat."""
    m = normalised_upsample(loc_map, image_size)
    return None if m is None else largest_component_box(m >= threshold)


def box_cells(box: Box, image_size: Tuple[int, int], grid: Tuple[int, int]) -> np.ndarray:
    """``(h, w)`` bool: the cells of an ``(h, w)`` grid laid over an image of ``image_size = (H, W)`` that
    overlap ``box`` with positive area."""
    h, w = grid
    cell_h, cell_w = image_size[0] / h, image_size[1] / w
    x, y, bw, bh = box
    cols = (np.arange(w) * cell_w < x + bw) & (x < (np.arange(w) + 1) * cell_w)
    rows = (np.arange(h) * cell_h < y + bh) & (y < (np.arange(h) + 1) * cell_h)
    return rows[:, None] & cols[None, :]


def peak_in_box(loc_map: torch.Tensor, image_size: Tuple[int, int], box: Box) -> bool:
    """The pointing game: does the grid cell where the ``(h, w)`` map peaks (first maximum) overlap ``box`` (in
    pixels of an image of ``image_size = (H, W)``; see :func:`box_cells`)? False for a flat map, which points
    nowhere."""
    m = loc_map.detach().float()
    if not m.max() > m.min():
        return False
    row, col = divmod(int(m.flatten().argmax()), m.shape[1])
    return bool(box_cells(box, image_size, tuple(m.shape))[row, col])


def iou(a: Optional[Box], b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes; 0 when ``a`` is None."""
    if a is None:
        return 0.0
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
