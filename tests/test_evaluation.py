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
    with pytest.raises(ValueError, match="maps are missing"):
        localization_report(records, maps, ["A", "B"])
