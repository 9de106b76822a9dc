"""``predict``: chest X-ray image files -> probabilities, boxes and PNG overlays."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .data import normalize
from .errors import InputError
from .boxes import box_from_map
from .files import write_text_atomic
from .images import decode_xray, resize_square
from .viz import overlay, tile


def load_image(path: Union[str, Path], size: int) -> torch.Tensor:
    """An image file -> ``(1, size, size)`` float in [0, 1], decoded and resized exactly as ``prepare``
    caches training images (:mod:`clarity_fast.images`)."""
    try:
        a = resize_square(decode_xray(path), size)
    except ValueError as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    return torch.tensor(a, dtype=torch.float32).div(255)[None]


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
def predict_files(model, paths: Sequence[Union[str, Path]], out_dir: Union[str, Path],
                  threshold: float = 0.5) -> List[Dict]:
    """Run ``model`` on each file; write one overlay per input (one panel per finding with p >= 0.5,
    else the most likely class; distinct names for inputs that share a stem) and ``predictions.json``
    (atomically). Classes are named by ``model.class_names``; boxes are (x, y, w, h) in input-file pixels,
    drawn from Ξ by :func:`clarity_fast.boxes.box_from_map`. Never writes over an input file."""
    out_dir = Path(out_dir)
    names = overlay_names(paths)
    _check_outputs(paths, out_dir, names)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, classes = model.patch_embed.img_size[0], model.class_names
    device = next(model.parameters()).device
    model.eval()
    results = []
    for path, name in zip(paths, names):
        img = load_image(path, size)
        with Image.open(path) as im:
            W, H = im.size
        out = model.forward_outputs(normalize(img[None].to(device), model.in_chans))
        probs = out.logits[0].float().sigmoid().tolist()
        findings = [c for c, p in enumerate(probs) if p >= 0.5] or [int(np.argmax(probs))]
        boxes, panels = {}, []
        for c in findings:
            loc_map = out.loc_map[0, c].float().cpu()
            box = box_from_map(loc_map, (size, size), threshold)
            if box is not None:
                sx, sy = W / size, H / size
                boxes[classes[c]] = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
            panels.append(overlay(img, loc_map, [box] if box else [], title=f"{classes[c]} {probs[c]:.2f}"))
        picture = out_dir / name
        tile(panels, min(4, len(panels))).save(picture)
        results.append(dict(image=str(path), probabilities=dict(zip(classes, probs)), boxes=boxes,
                            overlay=str(picture)))
    write_text_atomic(out_dir / "predictions.json", json.dumps(results, indent=2))
    return results
