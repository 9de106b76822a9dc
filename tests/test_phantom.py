"""The built-in phantom data set (SPEC §5)."""
import math

import torch

from clarity_fast.pathologies import CLASS_NAMES, REGION_NAMES
from clarity_fast.phantom import PhantomDataset, render
from clarity_fast.priors import grid_regions
from clarity_fast.viz import contact_sheet


def test_deterministic_from_seed():
    a, b, c = PhantomDataset(5, 96, seed=3), PhantomDataset(5, 96, seed=3), PhantomDataset(5, 96, seed=4)
    for i in range(5):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["boxes"], b[i]["boxes"])
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_boxes_inside_image_and_their_class_region():
    """Every box lies inside its class's anatomical prior at the demo's grid (8-px patches), all but a cell or
    two of the mediastinum where a box spans both lungs (Emphysema): the priors never hide a lesion."""
    ds = PhantomDataset(120, 128, patch_size=8, seed=1)
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (1, 128, 128) and 0 <= s["image"].min() and s["image"].max() <= 1
        assert set(torch.nonzero(s["labels"]).flatten().tolist()) == set(s["boxes"][:, 0].long().tolist())
        for c, x, y, w, h in s["boxes"].tolist():
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
            cells = s["masks"][int(c), int(y // 8):int(math.ceil((y + h) / 8)), int(x // 8):int(math.ceil((x + w) / 8))]
            assert cells.numel() and cells.float().mean() >= 0.99, f"{CLASS_NAMES[int(c)]} box outside its prior"
            seen.add(int(c))
    assert seen == set(range(14)), f"classes never drawn: {set(range(14)) - seen}"


def test_region_masks_align_with_anatomy():
    p = render(7, 160)
    img = torch.from_numpy(p["image"])
    reg = dict(zip(REGION_NAMES, torch.from_numpy(p["regions"])))
    lungs = reg["Left Lung"] | reg["Right Lung"]
    assert img[lungs].mean() + 0.15 < img[reg["Mediastinum"]].mean()  # lungs are dark, mediastinum bright
    assert img[lungs].mean() + 0.1 < img[reg["Heart"]].mean()
    assert reg["Right Lung"].nonzero()[:, 1].float().mean() < 80 < reg["Left Lung"].nonzero()[:, 1].float().mean()
    grid = grid_regions(p["regions"], (10, 10))
    assert grid.shape == (14, 10, 10) and grid[REGION_NAMES.index("Left Lung")].any()


def test_contact_sheet(tmp_path):
    path = contact_sheet(PhantomDataset(4, 64), tmp_path / "sheet.png", count=4, columns=2)
    from PIL import Image
    assert Image.open(path).size == (128, 128)


def test_generation_does_not_depend_on_the_worker_count():
    """The demo's data are the same on any machine: serial and parallel generation give identical samples."""
    import torch

    from clarity_fast.data import InMemoryDataset
    serial = InMemoryDataset(PhantomDataset(6, 64, 8, seed=5), progress=False, workers=0)
    parallel = InMemoryDataset(PhantomDataset(6, 64, 8, seed=5), progress=False, workers=2)
    for a, b in zip(serial.samples, parallel.samples):
        assert a["id"] == b["id"]
        for key in ("image", "labels", "masks", "dist", "boxes"):
            assert torch.equal(a[key], b[key]), key
