"""Built-in phantom data set (SPEC §5): chest-radiograph-like images made from a seed, no files.

Each image has its own anatomy (thorax, lungs, heart, mediastinum, diaphragm, hili, ribs,
clavicles, scapulae, aorta, trachea, spine; size, position and rotation vary), 0 to 3
lesions of the 14 NIH classes drawn inside their anatomical regions with realistic
co-occurrence, a ground-truth box per lesion, and the 14 ChestX-Det region masks the
``masks`` step would give. Views are PA: the patient's right is on the image's left.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .errors import InputError
from .pathologies import CLASS_NAMES, REGION_NAMES
from .priors import class_masks, distance_map, grid_regions

# per-class prevalence when an image is abnormal, and co-occurrence: (if, then, probability)
PREVALENCE = {
    "Atelectasis": 0.14, "Cardiomegaly": 0.10, "Consolidation": 0.07, "Edema": 0.06, "Effusion": 0.14,
    "Emphysema": 0.05, "Fibrosis": 0.05, "Hernia": 0.03, "Infiltration": 0.16, "Mass": 0.08, "Nodule": 0.10,
    "Pleural_Thickening": 0.06, "Pneumonia": 0.06, "Pneumothorax": 0.08,
}
CO_OCCURRENCE = (("Effusion", "Atelectasis", 0.35), ("Cardiomegaly", "Edema", 0.3), ("Edema", "Effusion", 0.3),
                 ("Pneumonia", "Infiltration", 0.35), ("Mass", "Nodule", 0.2), ("Consolidation", "Pneumonia", 0.2))
NORMAL_FRACTION = 0.3
MAX_FINDINGS = 3

Corners = Tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1] image coordinates (not a pixel Box)


class _Canvas:
    """Normalised coordinates of one image, rotated about its centre."""

    def __init__(self, size: int, angle_deg: float):
        t = (np.arange(size) + 0.5) / size
        v, u = np.meshgrid(t, t, indexing="ij")
        a = math.radians(angle_deg)
        self.u = 0.5 + (u - 0.5) * math.cos(a) - (v - 0.5) * math.sin(a)
        self.v = 0.5 + (u - 0.5) * math.sin(a) + (v - 0.5) * math.cos(a)
        self.size = size

    def ellipse(self, cu: float, cv: float, ru: float, rv: float, angle: float = 0.0) -> np.ndarray:
        """Normalised radius ((u', v') / (ru, rv)) of every pixel: < 1 inside the ellipse."""
        a = math.radians(angle)
        du, dv = self.u - cu, self.v - cv
        x, y = du * math.cos(a) + dv * math.sin(a), -du * math.sin(a) + dv * math.cos(a)
        return np.sqrt((x / ru) ** 2 + (y / rv) ** 2)

    def soft(self, r: np.ndarray, edge: float = 0.15) -> np.ndarray:
        """Smooth indicator of ``r < 1``."""
        return np.clip((1 + edge - r) / (2 * edge), 0, 1)


def _bbox(mask: np.ndarray) -> Optional[Corners]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    n = mask.shape[0]
    return xs.min() / n, ys.min() / n, (xs.max() + 1) / n, (ys.max() + 1) / n


def _pick(rng: np.random.Generator, mask: np.ndarray) -> Tuple[float, float]:
    """A random (u, v) pixel centre inside ``mask``."""
    idx = np.flatnonzero(mask)
    i = idx[rng.integers(len(idx))]
    n = mask.shape[0]
    return (i % n + 0.5) / n, (i // n + 0.5) / n


def sample_findings(rng: np.random.Generator) -> List[str]:
    """Multi-label findings of one image (empty = "No Finding")."""
    if rng.random() < NORMAL_FRACTION:
        return []
    names = list(PREVALENCE)
    p = np.array([PREVALENCE[n] for n in names])
    found = [names[rng.choice(len(names), p=p / p.sum())]]
    for a, b, prob in CO_OCCURRENCE:
        if a in found and b not in found and rng.random() < prob:
            found.append(b)
    if len(found) < MAX_FINDINGS and rng.random() < 0.25:
        extra = names[rng.choice(len(names), p=p / p.sum())]
        if extra not in found:
            found.append(extra)
    return found[:MAX_FINDINGS]


def render(seed: int, size: int = 224) -> Dict:
    """One phantom: ``image`` (size, size) float32 in [0, 1], ``regions`` (14, size, size) bool in
    REGION_NAMES order, ``findings`` list of class names, ``boxes`` list of (class, x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    findings = sample_findings(rng)
    cv = _Canvas(size, rng.normal(0, 2.0))
    cx, cy = 0.5 + rng.normal(0, 0.015), 0.5 + rng.normal(0, 0.015)
    ls = rng.uniform(0.9, 1.08) * (1.08 if "Emphysema" in findings else 1.0)
    hs = rng.uniform(1.32, 1.5) if "Cardiomegaly" in findings else rng.uniform(0.9, 1.04)
    body = cv.ellipse(cx, cy + 0.06, 0.47, 0.58)
    r_lung_r = cv.ellipse(cx - 0.165, cy - 0.05, 0.125 * ls, 0.30 * ls, angle=-4)
    r_lung_l = cv.ellipse(cx + 0.165, cy - 0.04, 0.12 * ls, 0.29 * ls, angle=4)
    r_heart = cv.ellipse(cx + 0.06, cy + 0.12, 0.14 * hs, 0.115 * min(hs, 1.2), angle=-15)
    heart = r_heart < 1
    lung_r, lung_l = (r_lung_r < 1) & ~heart, (r_lung_l < 1) & ~heart
    dome = ((cv.ellipse(cx - 0.165, cy - 0.03, 0.14 * ls, 0.34 * ls) < 1) |
            (cv.ellipse(cx + 0.165, cy - 0.02, 0.135 * ls, 0.33 * ls) < 1))
    diaphragm = dome & ~lung_r & ~lung_l & ~heart & (cv.v > cy + 0.1)
    mediastinum = (np.abs(cv.u - cx) < 0.055) & (cv.v > cy - 0.36) & (cv.v < cy + 0.22) & ~heart
    spine = (np.abs(cv.u - cx) < 0.025) & (cv.v > cy - 0.45) & (body < 1)
    trachea = (np.abs(cv.u - cx) < 0.014) & (cv.v > cy - 0.46) & (cv.v < cy - 0.2)
    aorta = cv.ellipse(cx + 0.045, cy - 0.22, 0.032, 0.032) < 1
    hilus_r = cv.ellipse(cx - 0.085, cy - 0.04, 0.035, 0.05) < 1
    hilus_l = cv.ellipse(cx + 0.085, cy - 0.03, 0.035, 0.05) < 1
    clav_r = cv.ellipse(cx - 0.17, cy - 0.37, 0.14, 0.016, angle=12) < 1
    clav_l = cv.ellipse(cx + 0.17, cy - 0.37, 0.14, 0.016, angle=-12) < 1
    scap_r = cv.ellipse(cx - 0.36, cy - 0.22, 0.06, 0.13) < 1
    scap_l = cv.ellipse(cx + 0.36, cy - 0.22, 0.06, 0.13) < 1

    img = 0.04 + 0.46 * cv.soft(body, 0.04)
    lungs_soft = np.maximum(cv.soft(r_lung_r, 0.06), cv.soft(r_lung_l, 0.06)) * (1 - heart)
    lung_level = 0.14 - (0.06 if "Emphysema" in findings else 0.0)
    img = img * (1 - lungs_soft) + lung_level * lungs_soft
    img += 0.2 * cv.soft(r_heart, 0.1) + 0.22 * mediastinum + 0.1 * spine - 0.12 * trachea + 0.08 * aorta
    img += 0.12 * (hilus_r | hilus_l) + 0.2 * (clav_r | clav_l) + 0.06 * (scap_r | scap_l) + 0.2 * diaphragm
    for k in range(9):  # ribs: bright arcs across each lung
        for side in (-1, 1):
            arc = cy - 0.33 + 0.066 * k + 0.05 * ((cv.u - (cx + side * 0.17)) / 0.16) ** 2
            img += 0.05 * ((np.abs(cv.v - arc) < 0.009) & (body < 1))

    boxes: List[Tuple[str, float, float, float, float]] = []
    lungs = [lung_r, lung_l]
    for name in findings:
        delta, box = _lesion(name, rng, cv, lungs, heart, mediastinum, diaphragm, (hilus_r, hilus_l), cx, cy)
        img = img + delta
        if box is not None:
            boxes.append((name, *box))
    img = gaussian_filter(img, sigma=size / 300)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05) + rng.normal(0, 0.015, img.shape)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.2)
    region = {"Left Clavicle": clav_l, "Right Clavicle": clav_r, "Left Scapula": scap_l, "Right Scapula": scap_r,
              "Left Lung": lung_l, "Right Lung": lung_r, "Left Hilus Pulmonis": hilus_l,
              "Right Hilus Pulmonis": hilus_r, "Heart": heart, "Aorta": aorta, "Facies Diaphragmatica": diaphragm,
              "Mediastinum": mediastinum, "Weasand": trachea, "Spine": spine}
    return dict(image=img.astype(np.float32), regions=np.stack([region[r] for r in REGION_NAMES]),
                findings=findings, boxes=boxes)


def _lesion(name, rng, cv, lungs, heart, mediastinum, diaphragm, hili, cx, cy):
    """Intensity change and box (u0, v0, u1, v1) of one lesion of class ``name``."""
    side = int(rng.integers(2))
    lung = lungs[side]
    core = lung & (cv.ellipse(cx + (0.165 if side else -0.165), cy - 0.05, 0.09, 0.22) < 1)
    lower = core & (cv.v > cy)
    zero = np.zeros_like(cv.u)
    if name == "Cardiomegaly":  # drawn through the enlarged heart
        return zero, _bbox(heart)
    if name == "Nodule":
        u, v = _pick(rng, core)
        r = rng.uniform(0.018, 0.03)
        m = cv.ellipse(u, v, r, r) < 1
        return 0.3 * cv.soft(cv.ellipse(u, v, r, r), 0.2), _bbox(m)
    if name == "Mass":
        u, v = _pick(rng, core)
        r = rng.uniform(0.05, 0.075)
        m = (cv.ellipse(u, v, r, r * 0.9) < 1) & (lung | mediastinum)
        return 0.32 * cv.soft(cv.ellipse(u, v, r, r * 0.9), 0.15) * (lung | mediastinum), _bbox(m)
    if name == "Atelectasis":
        u, v = _pick(rng, lower)
        m = (cv.ellipse(u, v, 0.08, 0.018, angle=rng.uniform(-25, 25)) < 1) & lung
        return 0.28 * m, _bbox(m)
    if name in ("Consolidation", "Pneumonia"):
        u, v = _pick(rng, lower if name == "Pneumonia" else core)
        blob = np.zeros_like(cv.u, dtype=bool)
        for _ in range(4):
            du, dv = rng.normal(0, 0.025, 2)
            blob |= cv.ellipse(u + du, v + dv, rng.uniform(0.03, 0.05), rng.uniform(0.03, 0.05)) < 1
        m = blob & lung
        strength = 0.32 if name == "Consolidation" else 0.26
        return strength * gaussian_filter(m.astype(float), cv.size / 150), _bbox(m)
    if name == "Infiltration":
        u, v = _pick(rng, core)
        region = (cv.ellipse(u, v, 0.07, 0.09) < 1) & lung
        spots = (rng.random(cv.u.shape) < 0.05) & region
        patchy = gaussian_filter(spots.astype(float), cv.size / 120)
        patchy = 0.22 * patchy / max(patchy.max(), 1e-6)
        return patchy, _bbox(region & (patchy > 0.03))
    if name == "Edema":
        m = np.zeros_like(cv.u, dtype=bool)
        for hilus, lg in zip(hili, lungs):
            hu, hv = _pick(rng, hilus)
            m |= (cv.ellipse(hu, hv, 0.12, 0.12) < 1) & (lg | hilus)
        return 0.2 * gaussian_filter(m.astype(float), cv.size / 100), _bbox(m)
    if name == "Effusion":
        ys = np.nonzero(lung.any(axis=1))[0]
        bottom = ys.max() / cv.size
        level = bottom - rng.uniform(0.06, 0.11)
        m = lung & (cv.v > level + 0.02 * np.cos((cv.u - 0.5) * 20))
        return 0.34 * m, _bbox(m)
    if name == "Emphysema":  # drawn through the darker, larger lungs
        return zero, _bbox(lungs[0] | lungs[1])
    if name == "Fibrosis":
        m = lower & (np.abs(cv.u - 0.5) > 0.17)
        lines = (np.sin(cv.u * 160) > 0.7) | (np.sin(cv.v * 150 + cv.u * 40) > 0.75)
        return 0.14 * (m & lines), _bbox(m)
    if name == "Hernia":
        hu, hv = cx + rng.normal(0, 0.01), cy + 0.27
        m = cv.ellipse(hu, hv, 0.05, 0.04) < 1
        return 0.22 * m - 0.1 * (cv.ellipse(hu, hv - 0.01, 0.03, 0.015) < 1), _bbox(m)
    if name == "Pleural_Thickening":
        ys, xs = np.nonzero(lung)
        edge = xs.min() if side == 0 else xs.max()
        eu = (edge + 0.5) / cv.size
        top = rng.uniform(cy - 0.2, cy + 0.05)
        m = (np.abs(cv.u - eu) < 0.018) & (cv.v > top) & (cv.v < top + 0.16)
        return 0.3 * m, _bbox(m)
    if name == "Pneumothorax":
        ys, _ = np.nonzero(lung)
        apex = ys.min() / cv.size
        m = lung & (cv.v < apex + rng.uniform(0.1, 0.16))
        line = m & ~(np.roll(m, 2, axis=1) & np.roll(m, -2, axis=1) & np.roll(m, 2, axis=0))
        return -0.1 * m + 0.25 * line, _bbox(m)
    raise InputError(f"unknown class {name!r}")


class PhantomDataset(torch.utils.data.Dataset):
    """Deterministic phantom chest radiographs in the common sample format.

    Sample: ``image`` (1, H, W) float32 in [0, 1]; ``labels`` (C,) float32; ``masks`` (C, h, w) bool
    anatomical priors and ``dist`` (C, h, w) float32 distance maps at grid resolution (SPEC §5);
    ``boxes`` (K, 5) float32 rows (class index, x, y, w, h) in pixels; ``id`` and ``patient`` strings.
    """

    def __init__(self, num_images: int = 1000, img_size: int = 224, patch_size: int = 16, seed: int = 0,
                 classes: Tuple[str, ...] = CLASS_NAMES) -> None:
        if img_size % patch_size:
            raise InputError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}")
        self.num_images, self.img_size, self.seed, self.classes = num_images, img_size, seed, tuple(classes)
        self.grid = (img_size // patch_size, img_size // patch_size)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        p = render(self.seed * 1_000_003 + index, self.img_size)
        masks = class_masks(grid_regions(p["regions"], self.grid), self.classes)
        labels = torch.tensor([float(c in p["findings"]) for c in self.classes])
        n = self.img_size
        boxes = torch.tensor([[self.classes.index(c), x0 * n, y0 * n, (x1 - x0) * n, (y1 - y0) * n]
                              for c, x0, y0, x1, y1 in p["boxes"] if c in self.classes],
                             dtype=torch.float32).reshape(-1, 5)
        return dict(image=torch.from_numpy(p["image"]).unsqueeze(0), labels=labels, masks=masks,
                    dist=distance_map(masks), boxes=boxes, id=f"phantom_{self.seed}_{index:06d}",
                    patient=f"phantom_{self.seed}_{index:06d}")
