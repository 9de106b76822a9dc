"""``predict``: chest X-ray image files -> probabilities, boxes and PNG overlays."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .boxes import box_from_map
from .data import normalize
from .errors import InputError
from .files import write_text_atomic
from .images import decode_xray, resize_square
from .viz import overlay, tile


def load_image(path: Union[str, Path], size: int) -> torch.Tensor:
    """An image file -> ``(1, size, size)`` float in [0, 1], decoded and resized exactly as ``prepare``
    caches training images (:mod:`clarity_fast.images`)."""
    return _as_image(resize_square(_decode(path), size))[None]


def _as_image(a: np.ndarray) -> torch.Tensor:
    """``(H, W)`` uint8 -> ``(H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(a).float().div(255)


def _decode(path: Union[str, Path]) -> np.ndarray:
    try:
        return decode_xray(path)
    except ValueError as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def phantom_warning(model) -> Optional[str]:
    """A warning for weights trained only on the built-in phantoms (their checkpoint says so), else None."""
    if getattr(model, "pretrained_cfg", {}).get("training_data") == "phantom":
        return ("these weights were trained only on phantom images (clarity_fast.phantom): their predictions "
                "on real radiographs mean nothing")
    return None


def _panel_classes(probs: Sequence[float], class_names: Sequence[str], classes: Optional[Sequence[str]],
                   top_k: Optional[int]) -> List[int]:
    """Which classes get a panel: those asked for, else the ``top_k`` most likely, else every finding with
    p >= 0.5 (the most likely one when there is none)."""
    if classes:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise InputError(f"classes {unknown} are not among the model's class_names {list(class_names)}")
        return [list(class_names).index(c) for c in classes]
    order = [int(i) for i in np.argsort(probs)[::-1]]
    if top_k is not None:
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be an integer >= 1, got {top_k!r}")
        return order[:top_k]
    return [c for c in order if probs[c] >= 0.5] or order[:1]


def overlay_names(paths: Sequence[Union[str, Path]]) -> List[str]:
    """One distinct ``<stem>.png`` per input; inputs sharing a stem get ``<stem>-2.png``, ``<stem>-3.png``, ..."""
    names, taken = [], set()
    for path in paths:
        stem, k = Path(path).stem, 1
        name = f"{stem}.png"
        while name in taken:
            k += 1
            name = f"{stem}-{k}.png"
        taken.add(name)
        names.append(name)
    return names


def _check_outputs(paths: Sequence[Union[str, Path]], out_dir: Path, names: Sequence[str]) -> None:
    """Refuse to write any output over an input file."""
    inputs = {Path(p).resolve() for p in paths}
    for target in [out_dir / n for n in names] + [out_dir / "predictions.json"]:
        if target.resolve() in inputs:
            raise InputError(f"predict would overwrite its input {target}: choose another --output folder")


@torch.no_grad()
def predict_files(model, paths: Sequence[Union[str, Path]], out_dir: Union[str, Path], threshold: float = 0.5,
                  classes: Optional[Sequence[str]] = None, top_k: Optional[int] = None) -> List[Dict]:
    """Run ``model`` on each file; write one overlay per input, at the input's resolution, with one panel per
    class of ``classes``, or of the ``top_k`` most likely, or (default) of each finding with p >= 0.5 (else
    the most likely class); distinct names for inputs that share a stem; and ``predictions.json``
    (atomically). Classes are named by ``model.class_names``; boxes are (x, y, w, h) in input-file pixels,
    drawn from Ξ by :func:`clarity_fast.boxes.box_from_map` at ``threshold``. Never writes over an input file.
    Weights trained only on phantoms are warned about (``warnings`` and each result's ``warning``)."""
    out_dir = Path(out_dir)
    names = overlay_names(paths)
    _check_outputs(paths, out_dir, names)
    warning = phantom_warning(model)
    if warning:
        warnings.warn(warning, stacklevel=2)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, class_names = model.patch_embed.img_size[0], model.class_names
    device = next(model.parameters()).device
    model.eval()
    results = []
    for path, name in zip(paths, names):
        full = _decode(path)  # (H, W) uint8, the input's own resolution
        H, W = full.shape
        img = _as_image(resize_square(full, size))[None]
        out = model.forward_outputs(normalize(img[None].to(device), model.in_chans))
        probs = out.logits[0].float().sigmoid().tolist()
        boxes, panels = {}, []
        picture_full = _as_image(full)
        for c in _panel_classes(probs, class_names, classes, top_k):
            loc_map = out.loc_map[0, c].float().cpu()
            box = box_from_map(loc_map, (H, W), threshold)  # drawn at the input's size: input-file pixels
            if box is not None:
                boxes[class_names[c]] = list(box)
            panels.append(overlay(picture_full, loc_map, [box] if box else [],
                                  title=f"{class_names[c]} {probs[c]:.2f}"))
        picture = out_dir / name
        tile(panels, min(4, len(panels))).save(picture)
        result = dict(image=str(path), probabilities=dict(zip(class_names, probs)), boxes=boxes,
                      overlay=str(picture))
        if warning:
            result["warning"] = warning
        results.append(result)
    write_text_atomic(out_dir / "predictions.json", json.dumps(results, indent=2))
    return results
