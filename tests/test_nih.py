"""NIH ChestX-ray14 path on files the test makes: CSV parsing, prepare, masks, loader, evaluation."""
import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from clarity_fast import Clarity
from clarity_fast.evaluation import evaluate_model
from clarity_fast.nih import (ChestXDetSegmenter, NIHCacheDataset, compute_masks, load_chestx_det, load_index,
                              prepare, read_boxes, read_labels, read_split, scaled_boxes)
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
    report = evaluate_model(model, test, tmp_path, batch_size=4, progress=False)
    assert report["localization"]["num_boxes"] >= 8
    assert (tmp_path / "report.md").exists() and (tmp_path / "overlays.png").exists()



def test_training_on_nih_reports_the_validation_split_prepare_carved(cache, tmp_path, capsys):
    import json
    from clarity_fast.cli import main
    cache_dir, _ = cache
    assert "val" in load_index(cache_dir)["split"]
    run = tmp_path / "nih_run"
    assert main(["train", "--set", "dataset=nih", "--set", f"cache_dir={cache_dir}", "--set", "model_args={img_size: 64, "
                 "patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, num_map_layers: 2, num_oct_layers: 2, "
                 "in_chans: 1}", "--set", "batch_size=4", "--set", "epochs=1", "--set", f"output_dir={run}",
                 "--set", "device=cpu"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["validation_classification"]["num_classes"] == 14
    assert "validation Macro AUC" in capsys.readouterr().out

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


# --------------------------------------------------------------------------- real box list (issue 9)


def _raw_box_list():
    """The box list as NIH wrote it, read without this project's parser: image -> [(label, x, y, w, h)]."""
    import csv
    import gzip
    import torchxrayvision
    from pathlib import Path
    path = Path(torchxrayvision.__file__).parent / "data" / "BBox_List_2017.csv.gz"
    rows = {}
    with gzip.open(path, "rt") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            rows.setdefault(row[0], []).append((row[1], *map(float, row[2:6])))
    return rows


def test_box_list_is_in_1024_pixel_space_and_scaled_from_it():
    raw = _raw_box_list()
    assert sum(map(len, raw.values())) == 984 and len(raw) == 880
    assert max(x + w for bs in raw.values() for _, x, _, w, _ in bs) <= 1024
    assert max(y + h for bs in raw.values() for _, _, y, _, h in bs) <= 1024
    for size in (512, 224):
        scaled = scaled_boxes(size)
        assert set(scaled) == set(raw)
        for image, boxes in raw.items():
            got = sorted(tuple(b[1:]) for b in scaled[image])
            want = sorted(tuple(v * size / 1024 for v in b[1:]) for b in boxes)
            np.testing.assert_allclose(got, want, rtol=1e-12)
            names = sorted(CLASS_NAMES[int(b[0])] for b in scaled[image])
            assert names == sorted("Infiltration" if b[0] == "Infiltrate" else b[0] for b in boxes)


def test_cache_dataset_boxes_are_the_1024_boxes_in_cache_pixels(cache):
    cache_dir, _ = cache
    raw = _raw_box_list()
    test = NIHCacheDataset(cache_dir, "test", patch_size=8)
    for i in range(len(test)):
        s = test[i]
        want = sorted(tuple(v * 64 / 1024 for v in b[1:]) for b in raw[s["id"]])
        np.testing.assert_allclose(sorted(tuple(b[1:].tolist()) for b in s["boxes"]), want, rtol=1e-5)


class _BoxMaps:
    """Lazy ``{image id: (C, S, S)}`` maps for the evaluation: each class channel an indicator of
    that class's boxes (pixels whose centres lie inside), or uniform noise."""

    def __init__(self, boxes, size, noise=False):
        self.boxes, self.size, self.noise = boxes, size, noise

    def __contains__(self, image_id):
        return image_id in self.boxes

    def __call__(self, image_id, c):
        S = self.size
        if self.noise:
            g = torch.Generator().manual_seed(zlib.crc32(f"{image_id}/{c}".encode()))  # same in every process
            return torch.rand(S // 16, S // 16, generator=g)
        m = torch.zeros(S, S)
        centres = torch.arange(S) + 0.5
        for b in self.boxes[image_id]:
            if int(b[0]) == c:
                inside_y = (centres >= b[2]) & (centres < b[2] + b[4])
                inside_x = (centres >= b[1]) & (centres < b[1] + b[3])
                m[inside_y[:, None] & inside_x[None, :]] = 1.0
        return m


class _PerImage(dict):
    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def __contains__(self, image_id):
        return image_id in self.maps

    def __missing__(self, image_id):
        return _Channels(self.maps, image_id)


class _Channels:
    def __init__(self, maps, image_id):
        self.maps, self.image_id = maps, image_id

    def __getitem__(self, c):
        return self.maps(self.image_id, c)


def _real_records(size):
    from clarity_fast.evaluation import BoxRecord
    patients = read_labels().set_index("image")["patient"].to_dict()
    boxes = scaled_boxes(size)
    return boxes, [BoxRecord(image, patients[image], int(b[0]), tuple(b[1:]), (size, size))
                   for image, bs in sorted(boxes.items()) for b in bs]


def test_perfect_maps_score_one_at_every_threshold_on_the_real_box_list():
    from clarity_fast.evaluation import localization_report
    boxes, records = _real_records(512)
    assert len(records) == 984 and len({r.image_id for r in records}) == 880
    rep = localization_report(records, _PerImage(_BoxMaps(boxes, 512)), CLASS_NAMES)
    assert rep["num_boxes"] == 984 and rep["num_images"] == 880
    assert all(v == 1.0 for acc in rep["accuracy"].values() for v in acc.values()), rep["macro"]
    some = {r.image_id for r in records[::8]}  # the chance baseline on an eighth of the images (time)
    subset = [r for r in records if r.image_id in some]
    noise = localization_report(subset, _PerImage(_BoxMaps(boxes, 512, noise=True)), CLASS_NAMES)
    assert noise["macro"]["0.3"] < 0.2 and noise["mean_iou_accuracy"] < 0.15, noise["macro"]


# --------------------------------------------------------------------------- preparation (issue 9)


def test_predict_decodes_exactly_as_prepare_cached(nih_folder, cache, tmp_path):
    """One decoder: a 16-bit PNG (and a 12-bit one) reaches predict as it reached training."""
    from clarity_fast.predict import load_image
    root, plain, box_images = nih_folder
    cache_dir, _ = cache
    index = load_index(cache_dir)
    images = np.memmap(cache_dir / "images_64.u8", dtype=np.uint8, mode="r", shape=(len(index["ids"]), 64, 64))
    ids = plain + box_images
    sixteen = [name for k, name in enumerate(ids) if k % 7 == 5 and name in index["ids"]]
    assert sixteen
    for name in sixteen:
        cached = torch.from_numpy(np.array(images[index["ids"].index(name)])).float() / 255
        torch.testing.assert_close(load_image(root / "images" / name, 64)[0], cached, atol=0, rtol=0)
    twelve = tmp_path / "twelve_bit.png"
    Image.fromarray((np.random.default_rng(1).random((96, 96)) * 4095).astype(np.uint16)).save(twelve)
    assert load_image(twelve, 64).max() > 0.5  # scaled by its own maximum (by 65535 it would stay under 0.07)


def test_prepare_refuses_another_size_in_the_same_cache(nih_folder, cache):
    root, _, _ = nih_folder
    cache_dir, _ = cache
    with pytest.raises(ValueError, match="holds images of size 64, not 32"):
        prepare(root, cache_dir, size=32, progress=False)
    assert not (cache_dir / "images_32.u8").exists()
    assert load_index(cache_dir)["size"] == 64


def test_interrupted_prepare_stops_fast_and_resumes_with_every_reason(nih_folder, tmp_path, monkeypatch):
    import time
    import clarity_fast.nih as nih
    root, plain, _ = nih_folder
    real = nih.decode_xray
    calls = []

    def decode(path):
        calls.append(path)
        if len(calls) == 12:
            raise KeyboardInterrupt
        time.sleep(0.02)
        return real(path)

    monkeypatch.setattr(nih, "decode_xray", decode)
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        prepare(root, tmp_path / "c", size=64, workers=1, progress=False)
    assert time.time() - start < 5 and len(calls) < 20  # no draining of the remaining images
    partial = (tmp_path / "c" / "unreadable.txt").read_text()
    assert plain[0] in partial and "cannot decode" in partial  # the reason found before the interruption
    monkeypatch.setattr(nih, "decode_xray", real)
    summary = prepare(root, tmp_path / "c", size=64, workers=1, progress=False)
    assert summary["unreadable"] == sorted([plain[0], plain[1]])
    names = [line.split("\t")[0] for line in (tmp_path / "c" / "unreadable.txt").read_text().splitlines()]
    assert names == sorted([plain[0], plain[1]])
    assert load_index(tmp_path / "c")["complete"]


def test_masks_with_a_file_that_is_not_pspnet_weights_is_one_line(tmp_path, cache, capsys):
    from clarity_fast.cli import main
    cache_dir, _ = cache
    bad = tmp_path / "not_weights.pth"
    torch.save({"something": torch.zeros(3)}, bad)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path in (bad, text):
        assert main(["masks", str(cache_dir), "--weights", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not ChestX-Det PSPNet weights" in err[0], err
