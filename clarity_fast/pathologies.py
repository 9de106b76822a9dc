"""Class names, anatomical regions and the class -> region table (SPEC §5), in one place.

The class -> region table is our reading (the paper's "Grok-identified regions" are not
available); pass another table to :func:`clarity_fast.priors.class_masks` to change it.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

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
# findings whose lesions are much smaller than their anatomical region: only a box of the lesion's own size
# scores on them, so they test localization beyond the prior
SMALL_LESIONS: Tuple[str, ...] = ("Atelectasis", "Consolidation", "Fibrosis", "Infiltration", "Mass", "Nodule",
                                  "Pleural_Thickening", "Pneumonia", "Pneumothorax")


def default_class_names(num_classes: int) -> Tuple[str, ...]:
    """Names for a model built without ``label_names``: NIH's 14 for 14 classes, else ``class_0 …``."""
    return CLASS_NAMES if num_classes == len(CLASS_NAMES) else tuple(f"class_{i}" for i in range(num_classes))


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
