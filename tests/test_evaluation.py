"""Evaluation (SPEC §6): AUC against scikit-learn, IoU accuracy on hand-made cases."""
import numpy as np
import pytest
import torch

from clarity_fast.evaluation import (BoxRecord, box_from_map, classification_report, iou, localization_report,
                                     markdown_report, patient_folds, random_maps, roc_auc, write_report)


def test_auc_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.random(200) > 0.7
        scores = rng.normal(size=200) + labels * rng.uniform(0, 2)
        scores[:20] = np.round(scores[:20])  # ties
        assert roc_auc(scores, labels) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(roc_auc(np.ones(5), np.zeros(5)))
    rep = classification_report(rng.random((50, 3)), rng.random((50, 3)) > 0.5, ["a", "b", "c"])
    assert set(rep["auc"]) == {"a", "b", "c"} and 0 <= rep["macro_auc"] <= 1


def test_iou_by_hand():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou(None, (0, 0, 1, 1)) == 0.0


def test_box_from_map_largest_component():
    m = torch.zeros(40, 60)
    m[5:15, 10:30] = 1.0  # 200 px
    m[30:33, 50:53] = 1.0  # 9 px, smaller
    assert box_from_map(m, (40, 60), 0.5) == (10.0, 5.0, 20.0, 10.0)
    assert box_from_map(torch.ones(4, 4), (8, 8), 0.5) is None


def _records_and_maps(shift: int):
    records, maps = [], {}
    for i in range(12):
        H = W = 64
        x, y = 8 + i, 10 + i
        records.append(BoxRecord(f"img{i}", f"p{i // 2}", i % 2, (x, y, 20.0, 20.0), (H, W)))
        m = torch.zeros(2, H, W)
        m[i % 2, y:y + 20, x + shift:x + shift + 20] = 1.0
        maps[f"img{i}"] = m
    return records, maps


def test_localization_perfect_maps_give_one_everywhere():
    records, maps = _records_and_maps(shift=0)
    rep = localization_report(records, maps, ["A", "B"])
    assert all(v == 1.0 for a in rep["accuracy"].values() for v in a.values())
    assert rep["mean_iou_accuracy"] == 1.0 and rep["num_boxes"] == 12


def test_localization_shifted_maps_known_iou():
    records, maps = _records_and_maps(shift=10)  # IoU = 10*20 / (2*400 - 200) = 1/3
    rep = localization_report(records, maps, ["A", "B"])
    for acc in rep["accuracy"].values():
        assert acc["0.1"] == acc["0.2"] == acc["0.3"] == 1.0
        assert acc["0.4"] == acc["0.5"] == acc["0.7"] == 0.0
    text = markdown_report({"localization": rep})
    assert "| A |" in text and "T=0.5" in text


def test_folds_split_by_patient_and_random_baseline(tmp_path):
    records, maps = _records_and_maps(shift=0)
    folds = patient_folds(records)
    by_patient = {}
    for r, f in zip(records, folds):
        by_patient.setdefault(r.patient, set()).add(int(f))
    assert all(len(v) == 1 for v in by_patient.values()) and set(folds.tolist()) == {0, 1}
    rand = localization_report(records, random_maps(maps), ["A", "B"])
    assert rand["mean_iou_accuracy"] < 0.5
    json_path, md_path = write_report({"localization": rand}, tmp_path)
    assert json_path.exists() and "Localization" in md_path.read_text()


def test_missing_maps_named():
    records, maps = _records_and_maps(shift=0)
    del maps["img3"]
    with pytest.raises(ValueError, match="localization maps Ξ are missing"):
        localization_report(records, maps, ["A", "B"])


def test_report_shows_both_folds_with_their_xi_and_the_criterion(tmp_path):
    records, maps = _records_and_maps(shift=0)
    rep = localization_report(records, maps, ["A", "B"])
    assert rep["xi_criterion"].startswith("mean IoU accuracy over T = 0.1")
    for fold in rep["folds"]:
        assert set(fold["xi"]) == set(fold["accuracy"]) and fold["macro"]["0.3"] == 1.0 and fold["num_boxes"] > 0
    text = markdown_report({"localization": rep})
    assert "fold 0 scored" in text and "fold 1 scored" in text and "| ξ |" in text
    assert rep["xi_criterion"] in text


def test_xi_tuning_criterion_at_one_threshold_changes_the_choice():
    """Every patient has two images of a 30 x 30 box inside a wide 0.3 halo (51 x 51, IoU 900/2601 = 0.35 at
    ξ <= 0.3). Above the halo, one image's core is the box (IoU 1), the other's a 9 x 9 corner of it (IoU 0.09).
    Tuned at T=0.3 the halo's ξ passes every box (1.0 against 0.5); tuned at T=0.7, or for the mean over T
    (3/7 against 1/2), the core's ξ wins."""
    records, maps = [], {}
    for i in range(8):
        records.append(BoxRecord(f"i{i}", f"p{i // 2}", 0, (10.0, 10.0, 30.0, 30.0), (64, 64)))
        m = torch.zeros(1, 64, 64)
        m[0, 0:51, 0:51] = 0.3
        (m[0, 10:40, 10:40] if i % 2 == 0 else m[0, 10:19, 10:19]).fill_(1.0)
        maps[f"i{i}"] = m
    at_03 = localization_report(records, maps, ["A"], tune_at=0.3)
    assert all(f["xi"]["A"] == 0.05 for f in at_03["folds"]) and at_03["accuracy"]["A"]["0.3"] == 1.0
    assert at_03["accuracy"]["A"]["0.7"] == 0.0
    at_07 = localization_report(records, maps, ["A"], tune_at=0.7)
    assert all(f["xi"]["A"] == 0.35 for f in at_07["folds"]) and at_07["accuracy"]["A"]["0.7"] == 0.5
    default = localization_report(records, maps, ["A"])
    assert all(f["xi"]["A"] == 0.35 for f in default["folds"])
    assert at_07["xi_criterion"] == "IoU accuracy at T = 0.7, ties to the highest mean IoU"
    with pytest.raises(ValueError, match="tune_at must be one of"):
        localization_report(records, maps, ["A"], tune_at=0.33)


def test_xi_ties_go_to_the_highest_mean_iou():
    """No box passes any T at any ξ: a 0.2 plateau over the image (IoU 64/3600), a 0.6 square around the 8 x 8
    box (IoU 64/900) and a 1.0 spot away from it (IoU 0). All ξ tie at accuracy 0; the square's ξ (the first
    above 0.2, i.e. 0.25) has the highest mean IoU and is chosen, so the scored box is the square's."""
    records, maps = [], {}
    for i in range(6):
        records.append(BoxRecord(f"i{i}", f"p{i}", 0, (10.0, 10.0, 8.0, 8.0), (60, 60)))
        m = torch.zeros(1, 60, 60)
        m[0] = 0.2
        m[0, 0:30, 0:30] = 0.6
        m[0, 44:48, 44:48] = 1.0
        m[0, 0, 59] = 0.0  # the minimum, so min-max normalisation keeps the levels
        maps[f"i{i}"] = m
    rep = localization_report(records, maps, ["A"])
    assert all(f["xi"]["A"] == 0.25 for f in rep["folds"])
    assert all(v == 0.0 for v in rep["accuracy"]["A"].values())
    assert rep["box_area"]["A"]["predicted"] == 900.0 and rep["box_area"]["A"]["truth"] == 64.0


def test_out_of_fold_xi_is_the_one_each_record_was_scored_with():
    from clarity_fast.evaluation import out_of_fold_xi
    records, maps = _records_and_maps(shift=0)
    rep = localization_report(records, maps, ["A", "B"])
    folds = patient_folds(records)
    xis = out_of_fold_xi(rep, records, ["A", "B"])
    for r, f, xi in zip(records, folds, xis):
        assert xi == rep["folds"][f]["xi"]["AB"[r.class_index]]


def test_nan_auc_is_null_in_json_and_the_macro_row_counts_its_classes(tmp_path):
    import json
    probs = np.random.default_rng(0).random((20, 3))
    labels = np.zeros((20, 3))
    labels[:10, 0] = 1
    labels[::3, 1] = 1  # class c never positive: AUC undefined
    rep = classification_report(probs, labels, ["a", "b", "c"])
    assert np.isnan(rep["auc"]["c"]) and rep["macro_auc_classes"] == 2
    json_path, md_path = write_report({"classification": rep}, tmp_path)
    data = json.loads(json_path.read_text())  # strict JSON: no NaN token
    assert data["classification"]["auc"]["c"] is None
    text = md_path.read_text()
    assert "| c | n/a |" in text and "Macro (2 of 3 classes)" in text


def test_box_area_of_the_scored_boxes():
    records, maps = _records_and_maps(shift=10)  # every map's box is 20 x 20, like the truth
    rep = localization_report(records, maps, ["A", "B"])
    assert rep["box_area"] == {"A": {"predicted": 400.0, "truth": 400.0}, "B": {"predicted": 400.0, "truth": 400.0}}
    records, maps = _records_and_maps(shift=0)
    for m in maps.values():
        m.zero_()  # flat maps draw no box: area 0
    assert localization_report(records, maps, ["A", "B"])["box_area"]["A"]["predicted"] == 0.0


def test_prior_baseline_known_truth():
    """Priors on an 8 x 8 grid of 8-px cells. Cell-aligned priors equal to the boxes: the unblurred prior draws
    each box exactly at ξ = 0.5 (bilinear upsampling crosses 0.5 on the cell edges) and nearly at the other ξ, so
    σ = 0 wins, with accuracy 1 up to T = 0.5.
    Priors covering the whole image are flat maps: no box, accuracy 0 at every σ."""
    from clarity_fast.evaluation import prior_baseline, prior_maps
    records, priors, whole = [], {}, {}
    for i in range(10):
        cx, cy = i % 4, i % 3
        records.append(BoxRecord(f"img{i}", f"p{i}", i % 2, (8.0 * cx, 8.0 * cy, 24.0, 16.0), (64, 64)))
        p = torch.zeros(2, 8, 8, dtype=torch.bool)
        p[i % 2, cy:cy + 2, cx:cx + 3] = True
        priors[f"img{i}"] = p
        whole[f"img{i}"] = torch.ones(2, 8, 8, dtype=torch.bool)
    rep = prior_baseline(records, priors, ["A", "B"])
    assert rep["sigma"] == 0 and rep["mean_iou_accuracy"] > 0.95
    assert all(rep["macro"][t] == 1.0 for t in ("0.1", "0.2", "0.3", "0.4", "0.5"))
    assert rep["box_area"]["A"]["truth"] == 384.0 and rep["box_area"]["A"]["predicted"] == pytest.approx(384, rel=0.3)
    assert rep["mean_by_sigma"]["2"] < 1.0
    assert prior_baseline(records, whole, ["A", "B"])["mean_iou_accuracy"] == 0.0
    blurred = prior_maps(priors, 1.0)["img0"]
    assert blurred.shape == (2, 8, 8) and blurred[1].abs().max() == 0 and 0 < blurred[0].max() < 1


def test_box_maps_against_a_pixel_raster():
    """Each cell of a box map is the fraction of the cell the box covers: against boxes rasterised on a 4x finer
    pixel grid and averaged over the cells, for boxes at fractional positions on a grid of non-square cells;
    two boxes of one class keep the larger cover, other classes stay 0."""
    from clarity_fast.evaluation import box_maps
    rng = np.random.default_rng(3)
    H, W, grid, k = 60, 45, (6, 9), 4  # cells of 10 x 5 px
    records = []
    for i in range(45):  # three boxes per image, two of them class 0
        x, y = rng.uniform(0, W - 2), rng.uniform(0, H - 2)
        box = (x, y, rng.uniform(1, W - x), rng.uniform(1, H - y))
        records.append(BoxRecord(f"img{i // 3}", "p", (0, 2, 0)[i % 3], tuple(np.round(np.array(box) * k) / k),
                                 (H, W)))
    maps = box_maps(records, grid, 3)
    for image_id, m in maps.items():
        assert m.shape == (3, 6, 9) and m.dtype == torch.float32 and m[1].abs().max() == 0
        for c in (0, 2):
            expected = torch.zeros(6, 9, dtype=torch.float64)
            for r in records:
                if r.image_id == image_id and r.class_index == c:
                    x, y, bw, bh = (round(v * k) for v in r.box)
                    raster = torch.zeros(H * k, W * k, dtype=torch.float64)
                    raster[y:y + bh, x:x + bw] = 1
                    cover = torch.nn.functional.avg_pool2d(raster[None], (10 * k, 5 * k))[0]
                    expected = torch.maximum(expected, cover)
            torch.testing.assert_close(m[c].double(), expected, atol=1e-6, rtol=0)


def test_grid_ceiling_in_the_report():
    """Cell-aligned boxes are their own box maps: boxes drawn exactly (accuracy 1 up to T = 0.5, box area 1x the
    truth's), the map peaks in every box, and the markdown report names the ceiling."""
    from clarity_fast.evaluation import box_maps
    records = [BoxRecord(f"img{i}", f"p{i}", i % 2, (8.0 * (i % 4), 8.0 * (i % 3), 24.0, 16.0), (64, 64))
               for i in range(10)]
    rep = localization_report(records, box_maps(records, (8, 8), 2), ["A", "B"])
    assert all(rep["macro"][t] == 1.0 for t in ("0.1", "0.2", "0.3", "0.4", "0.5")) and rep["pointing_macro"] == 1.0
    assert rep["box_area"]["A"]["predicted"] == pytest.approx(384, rel=0.3) and rep["box_area"]["A"]["truth"] == 384
    text = markdown_report({"localization": rep, "grid_ceiling": rep})
    assert "ceiling box area / truth" in text and "Ceiling: the ground-truth boxes on the grid" in text


def test_box_cells_against_a_pixel_raster():
    """The cells a box overlaps against an independent reference: each cell and the box rasterised on the pixel
    grid, overlap = they share a pixel; random grids, cells of unequal height and width, integer boxes, some
    on cell edges, some past the image's edge."""
    from clarity_fast.boxes import box_cells
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w, kh, kw = (int(v) for v in rng.integers(2, 9, 4))
        H, W = h * kh, w * kw
        x, y = int(rng.integers(0, W)), int(rng.integers(0, H))
        bw, bh = (kw, kh) if rng.random() < 0.2 else (int(rng.integers(1, W)), int(rng.integers(1, H)))
        if rng.random() < 0.2:  # on cell edges
            x, y = (x // kw) * kw, (y // kh) * kh
        box = np.zeros((H, W), bool)
        box[y:y + bh, x:x + bw] = True
        expected = box.reshape(h, kh, w, kw).any(axis=(1, 3))
        np.testing.assert_array_equal(box_cells((float(x), float(y), float(bw), float(bh)), (H, W), (h, w)),
                                      expected)
    assert box_cells((8.0, 0.0, 8.0, 8.0), (128, 128), (16, 16)).sum() == 1  # one cell, edges excluded


def test_peak_in_box_against_a_pixel_raster():
    """The pointing game against an independent reference: the peak cell and the box rasterised on the pixel
    grid (nearest upsampling of a one-hot map), hit = they share a pixel; random maps, grids and integer boxes,
    image sizes that are not multiples of 8 of the grid. Flat maps point nowhere."""
    import torch.nn.functional as F
    from clarity_fast.boxes import peak_in_box
    g = torch.Generator().manual_seed(0)
    hits = 0
    for _ in range(300):
        h, w = int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(3, 9, (1,), generator=g))
        k = int(torch.randint(2, 7, (1,), generator=g))
        H, W = h * k, w * k
        m = torch.rand(h, w, generator=g)
        x, y = (int(v) for v in torch.randint(0, min(H, W) - 1, (2,), generator=g))
        bw, bh = (int(v) for v in torch.randint(1, k + 3, (2,), generator=g))
        one_hot = (m == m.max()).float()
        cell = F.interpolate(one_hot[None, None], size=(H, W), mode="nearest")[0, 0].bool()
        box = torch.zeros(H, W, dtype=torch.bool)
        box[y:y + bh, x:x + bw] = True
        expected = bool((cell & box).any())
        assert peak_in_box(m, (H, W), (float(x), float(y), float(bw), float(bh))) == expected
        hits += expected
    assert 20 < hits < 280  # both outcomes exercised
    assert not peak_in_box(torch.ones(4, 4), (32, 32), (0.0, 0.0, 32.0, 32.0))


def test_pointing_game_in_the_report():
    """Maps equal to the boxes peak inside them (1.0); the same maps shifted by 30 px, beyond each 20-px box,
    never do (0.0); the side-by-side table shows the column."""
    records, maps = _records_and_maps(shift=0)
    rep = localization_report(records, maps, ["A", "B"])
    assert rep["pointing"] == {"A": 1.0, "B": 1.0} and rep["pointing_macro"] == 1.0
    records, maps = _records_and_maps(shift=30)
    assert localization_report(records, maps, ["A", "B"])["pointing_macro"] == 0.0
    assert "Ξ peak in box" in markdown_report({"localization": rep})
