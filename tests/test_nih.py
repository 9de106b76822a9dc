"""NIH ChestX-ray14 path on files the test makes: CSV parsing, prepare, masks, loader, evaluation."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from clarity_fast import Clarity
from clarity_fast.evaluation import evaluate_model
from clarity_fast.nih import (ChestXDetSegmenter, NIHCacheDataset, compute_masks, load_chestx_det, load_index,
                              prepare, read_boxes, read_labels, read_split)
from clarity_fast.pathologies import BOX_CLASSES, CLASS_NAMES


def test_xrv_box_list_parsed_completely():
    boxes = read_boxes()
    assert len(boxes) == 984
    assert boxes["image"].nunique() == 880
    assert sorted(boxes["label"].unique()) == sorted(BOX_CLASSES)
    test_list = set(read_labels().query("image in @boxes.image")["image"])
    assert set(boxes["image"]) <= test_list


class StandIn(nn.Module):
    """Stands in for pspnet(14): (B, 3, 512, 512) normalised -> (B, 14, 512, 512) logits, one
    intensity band per region."""

    def forward(self, x):
        centres = torch.linspace(-2, 2, 14).view(1, 14, 1, 1)
        return 4 - 10 * (x.mean(1, keepdim=True) - centres).abs()


@pytest.fixture(scope="module")
def nih_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    (root / "images").mkdir()
    labels = read_labels()
    box_images = sorted(read_boxes()["image"].unique())[:8]
    plain = [i for i in labels["image"].head(40) if i not in box_images][:22]
    ids = plain + box_images
    rng = np.random.default_rng(0)
    for k, name in enumerate(ids):
        a = (rng.random((96, 96)) * 255).astype(np.uint8)
        if k % 7 == 3:
            Image.fromarray(a).convert("RGBA").save(root / "images" / name)
        elif k % 7 == 5:
            Image.fromarray(a.astype(np.uint16) * 200).save(root / "images" / name)
        else:
            Image.fromarray(a).save(root / "images" / name)
    (root / "images" / plain[0]).write_bytes(b"not a png at all")
    Image.new("CMYK", (96, 96)).save(root / "images" / plain[1], format="TIFF")
    (root / "train_val_list.txt").write_text("\n".join(plain) + "\n")
    (root / "test_list.txt").write_text("\n".join(box_images) + "\n")
    return root, plain, box_images


@pytest.fixture(scope="module")
def cache(nih_folder, tmp_path_factory):
    root, plain, box_images = nih_folder
    cache = tmp_path_factory.mktemp("cache")
    summary = prepare(root, cache, size=64, workers=2, progress=False)
    return cache, summary


def test_prepare_lists_unreadable_and_completes(nih_folder, cache):
    root, plain, box_images = nih_folder
    cache_dir, summary = cache
    assert summary["cached"] == len(plain) + len(box_images) - 2
    assert summary["unreadable"] == sorted([plain[0], plain[1]])
    text = (cache_dir / "unreadable.txt").read_text()
    assert "cannot decode" in text and plain[1] in text
    index = load_index(cache_dir)
    assert index["complete"] and index["size"] == 64
    assert {s for s in index["split"]} <= {"train", "val", "test"}
    assert index["split"][index["ids"].index(box_images[0])] == "test"
    again = prepare(root, cache_dir, size=64, progress=False)  # resume: nothing left to do
    assert again["cached"] == summary["cached"]


def test_masks_loader_and_evaluation_end_to_end(cache, tmp_path):
    cache_dir, _ = cache
    out = compute_masks(cache_dir, ChestXDetSegmenter(StandIn()), patch_size=8, batch_size=4, progress=False)
    assert out["grid"] == (8, 8) and out["images"] > 0
    train = NIHCacheDataset(cache_dir, "train", patch_size=8)
    test = NIHCacheDataset(cache_dir, "test", patch_size=8)
    s = train[0]
    assert s["image"].shape == (1, 64, 64) and s["masks"].shape == (14, 8, 8) and s["labels"].shape == (14,)
    assert s["masks"].any() and (s["dist"][s["masks"]] == 0).all()
    assert len(test) == 8 and all(len(test[i]["boxes"]) for i in range(len(test)))
    box = test[0]["boxes"][0]
    assert 0 <= box[1] < 64 and box[3] > 0  # scaled from 1024 px to the 64 px cache
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=2,
                                         collate_fn=__import__("clarity_fast.data", fromlist=["collate"]).collate)
    assert sum(len(b["labels"]) for b in loader) == len(train)
    model = Clarity(img_size=64, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_map_layers=2,
                    num_oct_layers=2)
    report = evaluate_model(model, test, CLASS_NAMES, tmp_path, batch_size=4, progress=False)
    assert report["localization"]["num_boxes"] >= 8
    assert (tmp_path / "report.md").exists() and (tmp_path / "overlays.png").exists()


def test_pspnet_weights_load_from_local_file(tmp_path):
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet
    net = pspnet(14)
    path = tmp_path / "pspnet_chestxray_best_model_4.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)  # DataParallel layout, as released
    seg = load_chestx_det(path)
    torch.testing.assert_close(seg.net.state_dict()["cbr_final.cbr_unit.0.weight"],
                               net.state_dict()["cbr_final.cbr_unit.0.weight"])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_chestx_det(tmp_path / "absent.pth")


def test_bad_folders_and_cache(nih_folder, cache, tmp_path):
    root, _, _ = nih_folder
    with pytest.raises(FileNotFoundError, match="images/\\*.png"):
        prepare(tmp_path, tmp_path / "c")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="train_val_list.txt"):
        prepare(tmp_path, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="train_val_list.txt"):
        read_split(tmp_path)
    with pytest.raises(FileNotFoundError, match="run 'clarity-fast prepare'"):
        NIHCacheDataset(tmp_path / "nothing", "train")
    bad = tmp_path / "bad_cache"
    bad.mkdir()
    (bad / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        NIHCacheDataset(bad, "train")
    cache_dir, _ = cache
    index = json.loads((cache_dir / "index.json").read_text())
    index["complete"] = False
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="incomplete"):
        NIHCacheDataset(partial, "train")
    with pytest.raises(ValueError, match="split must be"):
        NIHCacheDataset(cache_dir, "validation")
