"""The one chest X-ray image decoder, shared by ``prepare``, ``predict`` and every data set.

Files are decoded to 2-d uint8 arrays: 8-bit images as they are (colour converted to grey),
16-bit and 32-bit integer images (e.g. 12-bit scans stored in 16-bit PNGs) scaled by their own
maximum, so a 12-bit image keeps its full range. Resizing is PIL's bilinear with antialiasing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

ACCEPTED_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "P")
MIN_SIDE = 64


def decode_xray(path: Union[str, Path]) -> np.ndarray:
    """An image file -> ``(H, W)`` uint8. Raises ValueError with the reason for files it cannot use."""
    try:
        with Image.open(path) as im:
            if im.mode not in ACCEPTED_MODES:
                raise InputError(f"unsupported image mode {im.mode}")
            if min(im.size) < MIN_SIDE:
                raise InputError(f"image too small ({im.size[0]}x{im.size[1]}, expected at least {MIN_SIDE})")
            im.load()
            if im.mode.startswith("I"):
                a = np.asarray(im, dtype=np.float64)
                return (a / max(a.max(), 1) * 255).round().astype(np.uint8)
            return np.asarray(im.convert("L"))
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"cannot decode ({e.__class__.__name__}: {e})") from None


def resize_square(a: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` uint8 -> ``(size, size)`` uint8, bilinear with antialiasing."""
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR, reducing_gap=2.0))
