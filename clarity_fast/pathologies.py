"""Class names, anatomical regions and the class -> region table (SPEC §5), in one place.

The class -> region table is our reading (the paper's "Grok-identified regions" are not
available); pass another table to :func:`class_masks` to change it.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import InputError

# torchxrayvision's NIH order (alphabetical)
CLASS_NAMES: Tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
# torchxrayvision's ChestX-Det PSPNet targets, in its output order
REGION_NAMES: Tuple[str, ...] = (
    "Left Clavicle", "Right Clavicle", "Left Scapula", "Right Scapula", "Left Lung", "Right Lung",
    "Left Hilus Pulmonis", "Right Hilus Pulmonis", "Heart", "Aorta", "Facies Diaphragmatica",
    "Mediastinum", "Weasand", "Spine",
)
# the 8 classes with radiologist boxes in NIH ChestX-ray14
BOX_CLASSES: Tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                                "Pneumonia", "Pneumothorax")


class ClassRegion(NamedTuple):
    """Regions whose union is a class's anatomical prior, and the extra dilation in patches."""
    regions: Tuple[str, ...]
    extra_dilation: int = 0


LUNGS = ("Left Lung", "Right Lung")
HILI = ("Left Hilus Pulmonis", "Right Hilus Pulmonis")
CLASS_REGIONS: Dict[str, ClassRegion] = {
    "Atelectasis": ClassRegion(LUNGS),
    "Cardiomegaly": ClassRegion(("Heart", "Mediastinum")),
    "Consolidation": ClassRegion(LUNGS),
    "Edema": ClassRegion(LUNGS + HILI),
    "Effusion": ClassRegion(LUNGS + ("Facies Diaphragmatica",)),
    "Emphysema": ClassRegion(LUNGS),
    "Fibrosis": ClassRegion(LUNGS),
    "Hernia": ClassRegion(("Facies Diaphragmatica", "Heart", "Mediastinum")),
    "Infiltration": ClassRegion(LUNGS),
    "Mass": ClassRegion(LUNGS + HILI + ("Mediastinum",)),
    "Nodule": ClassRegion(LUNGS),
    "Pleural_Thickening": ClassRegion(LUNGS, extra_dilation=2),
    "Pneumonia": ClassRegion(LUNGS),
    "Pneumothorax": ClassRegion(LUNGS, extra_dilation=2),
}


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
