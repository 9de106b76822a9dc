"""``clarity-fast ablate``, shrunk: every arm trains and is scored by the same protocol; one table, one plot."""
import json

import pytest
from PIL import Image

from clarity_fast import cli
from clarity_fast.ablation import ARMS, GRADCAM, auc_and_pointing, readout_summary, run_ablation
from clarity_fast.training import TrainConfig

pytest.importorskip("pytorch_grad_cam")
SMALL = ["num_train=48", "num_val=24", "epochs=1", "batch_size=8", "model_args.img_size=64",
         "model_args.embed_dim=32", "model_args.depth=2", "model_args.num_heads=2", "model_args.num_map_layers=2",
         "model_args.num_oct_layers=2", "ema_decay=null", "device=cpu"]


def test_ablate_command_all_arms(tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["ablate", "--cpu", "--output", str(out)] + [a for s in SMALL for a in ("--set", s)]
    assert cli.main(argv) == 0
    summary = json.loads((out / "ablation.json").read_text())
    arms = [name for name, _ in ARMS]
    assert list(summary["rows"])[:len(arms)] == arms
    baselines = [name for name, row in summary["rows"].items() if row["baseline"]]
    assert [b.split(" (")[0] for b in baselines] == ["prior-only maps", "random maps", "truth boxes on the grid"]
    for name in arms:
        row = summary["rows"][name]
        assert set(row["macro"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"} and row["minutes"] > 0
        assert list(row["per_seed"]) == ["0"] and row["per_seed"]["0"]["mean"] == row["mean"]
        assert 0 <= row["auc"] <= 1
    table = (out / "ablation.md").read_text()
    assert all(f"| {name} |" in table for name in arms) and "*random maps*" in table
    assert Image.open(out / "ablation.png").size == (900, 560)
    assert Image.open(out / "ablation_auc_pointing.png").size == (900, 560)
    full = json.loads((out / "full" / "seed-0" / "eval" / "report.json").read_text())  # the arm's own evaluation report
    points = summary["classes"]["full"]["0"]  # per class: the figures of the arm's own report
    assert set(points) == set(full["localization"]["pointing"]) and points
    for c, p in points.items():
        assert p["auc"] == full["classification"]["auc"][c] and p["pointing"] == full["localization"]["pointing"][c]
        assert p["at_0_3"] == full["localization"]["accuracy"][c]["0.3"]
    assert set(summary["auc_and_pointing"]) == set(arms)
    assert "| full | " in table.split("Does a map find")[1]
    assert summary["rows"]["full"]["mean"] == full["localization"]["mean_iou_accuracy"]
    assert summary["rows"]["full"]["auc"] == full["classification"]["macro_auc"]
    assert summary["rows"]["full"]["pointing"] == full["localization"]["pointing_macro"]
    assert summary["rows"]["full"]["minutes"] == full["train_minutes"]
    assert summary["rows"][baselines[1]]["macro"] == full["random_baseline"]["macro"]
    assert summary["rows"][baselines[2]]["macro"] == full["grid_ceiling"]["macro"]
    grad = json.loads((out / "1-class-token-grad-cam" / "seed-0" / "eval" / "report.json").read_text())
    assert grad["localization"]["num_boxes"] > 0  # Grad-CAM maps went through the same protocol
    # a second run refuses the arms' folders unless told to overwrite
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err


def test_ablate_seeds_average_and_resume_rescores(tmp_path):
    """Two seeds: each its own phantoms and run, the row their mean, each seed's figures beside it; --resume
    trains only the seed that is missing and re-scores the finished one, keeping its training minutes."""
    out = tmp_path / "ablation"
    sets = [a for s in SMALL for a in ("--set", s)]
    assert cli.main(["ablate", "--cpu", "--arms", "full", "--seeds", "3", "--output", str(out)] + sets) == 0
    first = json.loads((out / "full" / "seed-3" / "eval" / "report.json").read_text())
    assert cli.main(["ablate", "--cpu", "--arms", "full", "--seeds", "3", "5", "--resume", "--readout", "--output",
                     str(out)] + sets) == 0
    summary = json.loads((out / "ablation.json").read_text())
    reports = {k: json.loads((out / "full" / f"seed-{k}" / "eval" / "report.json").read_text()) for k in (3, 5)}
    assert reports[3]["train_minutes"] == first["train_minutes"]
    assert reports[3]["localization"]["accuracy"] == first["localization"]["accuracy"]  # same weights, re-scored
    assert reports[5]["localization"]["num_images"] > 0
    row = summary["rows"]["full"]
    assert summary["seeds"] == ["3", "5"] and list(row["per_seed"]) == ["3", "5"]
    means = [reports[k]["localization"]["mean_iou_accuracy"] for k in (3, 5)]
    assert row["mean"] == pytest.approx(sum(means) / 2)
    assert [row["per_seed"][k]["mean"] for k in ("3", "5")] == means
    assert "3: " in (out / "ablation.md").read_text() and "Mean over seeds 3, 5." in (out / "ablation.md").read_text()
    # --readout: each run's token readout, its maps' pointing that of the run's own report, summed up over the pairs
    readouts = {k: json.loads((out / "full" / f"seed-{k}" / "eval" / "readout.json").read_text()) for k in (3, 5)}
    for k in (3, 5):
        assert readouts[k]["pointing"]["maps"] == pytest.approx(reports[k]["localization"]["pointing"])
    r = summary["readout"]["full"]
    assert r["pairs"] == sum(len(readouts[k]["pointing"]["maps"]) for k in (3, 5)) > 0
    assert r["found"]["count"] + r["missed"]["count"] == r["pairs"]
    assert r["macro"]["readout"] == pytest.approx((readouts[3]["pointing_macro"]["readout"]
                                                   + readouts[5]["pointing_macro"]["readout"]) / 2)
    assert "| full | " in (out / "ablation.md").read_text().split("Where the maps miss")[1]


def test_auc_and_pointing_on_known_figures():
    """Spearman's ρ, the AUC bands and the small lesions' box areas, on figures worked out by hand."""
    nan = float("nan")

    def point(auc, pointing, area_ratio):
        return dict(auc=auc, pointing=pointing, at_0_3=0.0, area_ratio=area_ratio)
    classes = {"arm": {
        "0": {"Nodule": point(0.95, 0.9, 1.5), "Mass": point(0.8, 0.6, 2.5), "Fibrosis": point(0.6, 0.1, 10.0),
              "Cardiomegaly": point(1.0, 1.0, 1.2), "Effusion": point(0.9, 0.85, 3.0), "Hernia": point(nan, 0.0, 9.0)},
        "1": {"Nodule": point(0.7, 0.2, 20.0)}}}
    a = auc_and_pointing(classes)["arm"]
    assert a["count"] == 6  # Hernia has no AUC
    assert a["spearman"] == pytest.approx(1.0)  # the pointing rises with the AUC, pair by pair
    assert [b["count"] for b in a["bands"]] == [3, 1, 2]  # AUC 0.9 belongs to the top band
    assert [b["pointing"] for b in a["bands"]] == pytest.approx([(0.85 + 0.9 + 1.0) / 3, 0.6, 0.15])
    assert a["small_found"] == {"count": 2, "area_ratio": pytest.approx(2.0)}  # Nodule (seed 0), Mass
    assert a["small_missed"] == {"count": 2, "area_ratio": pytest.approx(15.0)}  # Fibrosis, Nodule (seed 1)
    assert a["small_area_by_seed"] == {"0": pytest.approx((1.5 + 2.5 + 10.0) / 3), "1": pytest.approx(20.0)}
    classes["arm"]["1"]["Nodule"] = point(0.7, 0.95, 20.0)  # a map that finds what its token barely learned
    assert auc_and_pointing(classes)["arm"]["spearman"] < 0.9


def test_readout_summary_on_known_figures():
    """The split of (seed, class) pairs by whether the map finds the lesions, on figures worked out by hand."""
    def report(maps, readout, position):
        pointing = {"maps": maps, "readout": readout, "position": position}
        return dict(pointing=pointing, pointing_macro={k: sum(v.values()) / len(v) for k, v in pointing.items()})
    readouts = {
        "0": report({"Nodule": 0.9, "Mass": 0.2, "Fibrosis": 0.0}, {"Nodule": 0.8, "Mass": 0.6, "Fibrosis": 0.1},
                    {"Nodule": 0.5, "Mass": 0.5, "Fibrosis": 0.3}),
        "1": report({"Nodule": 0.5, "Mass": 0.1}, {"Nodule": 0.4, "Mass": 0.7}, {"Nodule": 0.6, "Mass": 0.6})}
    r = readout_summary(readouts)
    assert r["pairs"] == 5
    assert r["found"]["count"] == 2  # Nodule on both seeds (0.5 counts as found)
    assert r["found"]["pointing"] == pytest.approx({"maps": 0.7, "readout": 0.6, "position": 0.55})
    assert r["missed"]["count"] == 3
    assert r["missed"]["pointing"] == pytest.approx({"maps": 0.1, "readout": 1.4 / 3, "position": 1.4 / 3})
    assert r["missed_readout_ahead"] == 2  # Mass on seed 0 (0.1 ahead exactly) and seed 1; not Fibrosis (behind)
    assert r["maps_below_position"] == 4  # all but Nodule on seed 0
    assert r["macro"]["maps"] == pytest.approx((1.1 / 3 + 0.3) / 2)


def test_unknown_arm_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation arms \\['bogus'\\]"):
        run_ablation(TrainConfig(), tmp_path, arms=["bogus"])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_ablation(TrainConfig(), tmp_path, seeds=[1, 1])
    assert GRADCAM in [name for name, _ in ARMS]
