"""``predict``: chest X-ray image files -> probabilities, boxes and PNG overlays."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .data import normalize
from .images import decode_xray, resize_square
from .evaluation import box_from_map
from .pathologies import CLASS_NAMES
from .viz import overlay, tile


def load_image(path: Union[str, Path], size: int) -> torch.Tensor:
    """An image file -> ``(1, size, size)`` float in [0, 1], decoded and resized exactly as ``prepare``
    caches training images (:mod:`clarity_fast.images`)."""
    try:
        a = resize_square(decode_xray(path), size)
    except ValueError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.tensor(a, dtype=torch.float32).div(255)[None]


@torch.no_grad()
def predict_files(model, paths: Sequence[Union[str, Path]], out_dir: Union[str, Path],
                  threshold: float = 0.5) -> List[Dict]:
    """Run ``model`` on each file; write ``<stem>.png`` overlays (one panel per finding with p >= 0.5,
    else the most likely class) and ``predictions.json``. Boxes are (x, y, w, h) in input-file pixels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.patch_embed.img_size[0]
    model.eval()
    results = []
    for path in paths:
        img = load_image(path, size)
        with Image.open(path) as im:
            W, H = im.size
        out = model.forward_outputs(normalize(img[None], model.in_chans))
        probs = out.logits[0].sigmoid().tolist()
        findings = [c for c, p in enumerate(probs) if p >= 0.5] or [int(np.argmax(probs))]
        boxes, panels = {}, []
        for c in findings:
            heat = out.loc_map[0, c]
            box = box_from_map(heat, (size, size), threshold)
            if box is not None:
                sx, sy = W / size, H / size
                boxes[CLASS_NAMES[c]] = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
            panels.append(overlay(img, heat, [box] if box else [], title=f"{CLASS_NAMES[c]} {probs[c]:.2f}"))
        picture = out_dir / f"{Path(path).stem}.png"
        tile(panels, min(4, len(panels))).save(picture)
        results.append(dict(image=str(path), probabilities=dict(zip(CLASS_NAMES, probs)), boxes=boxes,
                            overlay=str(picture)))
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    return results
