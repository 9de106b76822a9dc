"""The box-supervised readout: a logistic fit that finds a planted
signal and only that, and pointing figures on records whose answers are known."""
import json

import numpy as np
import pytest
import torch

from clarity_fast import cli
from clarity_fast.boxes import peak_in_box
from clarity_fast.data import InMemoryDataset, normalize
from clarity_fast.evaluation import BoxRecord, localization_report, roc_auc, run_model
from clarity_fast.phantom import PhantomDataset
from clarity_fast.readout import fit_logistic, pointing_hits
from conftest import tiny_model, tiny_train_args


def one_hot(grid, cell):
    m = torch.zeros(grid)
    m[cell] = 1.0
    return m


def test_fit_logistic_finds_a_planted_signal_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=g)
    y = (torch.rand(2000, generator=g) < 0.1).float()
    x[:, 3] += 3.0 * y  # the signal: one feature, positives only
    fitted = fit_logistic(x[:1000], y[:1000])
    auc = roc_auc(fitted(x[1000:]).detach().numpy(), y[1000:].numpy())
    assert auc > 0.95
    noise = fit_logistic(x[:1000, [0, 1, 2, 4, 5]], y[:1000])  # the signal's column left out
    assert abs(roc_auc(noise(x[1000:, [0, 1, 2, 4, 5]]).detach().numpy(), y[1000:].numpy()) - 0.5) < 0.1
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(x[:10], torch.zeros(10))


def test_pointing_hits_on_known_answers():
    """Class 0: a lesion at a random cell that the tokens carry (feature 0) and the maps miss; class 1: always in
    the same cell, tokens carry nothing. The readout must find class 0, position only class 1."""
    rng = np.random.default_rng(1)
    grid, size, D = (4, 4), (32, 32), 6
    records, tokens, loc_maps = [], {}, {}
    for k in range(40):
        key = f"img{k}"
        lesion = int(rng.integers(16))
        t = torch.from_numpy(rng.normal(size=(16, D))).float()
        t[lesion, 0] += 5.0
        tokens[key] = t
        loc_maps[key] = torch.from_numpy(rng.random((2, *grid))).float()
        row, col = divmod(lesion, 4)
        records.append(BoxRecord(key, f"p{k // 2}", 0, (col * 8 + 2.0, row * 8 + 2.0, 4.0, 4.0), size))
        records.append(BoxRecord(key, f"p{k // 2}", 1, (26.0, 2.0, 4.0, 4.0), size))  # cell (0, 3)
    hits = pointing_hits(records, loc_maps, tokens, num_classes=2)
    cls = np.array([r.class_index for r in records])
    assert hits["readout"][cls == 0].all()
    assert hits["position"][cls == 1].all()
    assert hits["position"][cls == 0].mean() < 0.3  # a random cell: about 1 in 16
    expected = [peak_in_box(loc_maps[r.image_id][r.class_index], r.image_size, r.box) for r in records]
    np.testing.assert_array_equal(hits["maps"], expected)
    report = localization_report(records, loc_maps, ["a", "b"])  # its own pointing, computed independently
    assert report["pointing"]["a"] == pytest.approx(hits["maps"][cls == 0].mean())


def test_run_model_patch_tokens_are_the_last_blocks_from_the_same_pass():
    """The readout's features, taken by a hook during the evaluation pass, against timm's feature API (a separate
    pass): the last block's patch tokens before the norm, per box image; the hook is gone afterwards."""
    model = tiny_model(img_size=64, patch_size=8, num_classes=14).eval()
    data = InMemoryDataset(PhantomDataset(12, 64, 8, seed=3), progress=False)
    res = run_model(model, data, batch_size=5, progress=False, with_patch_tokens=True)
    assert set(res["patch_tokens"]) == set(res["images"]) and res["images"]
    for key, image in res["images"].items():
        expected = model.forward_intermediates(normalize(image[None], model.in_chans), indices=1, output_fmt="NLC",
                                               intermediates_only=True)[-1][0]
        torch.testing.assert_close(res["patch_tokens"][key], expected, rtol=1e-5, atol=1e-5)
    assert not model.blocks[-1]._forward_hooks
    assert "patch_tokens" not in run_model(model, data, batch_size=5, progress=False)


def test_cli_eval_readout(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(tiny_train_args(run, num_val=40)) == 0
    assert cli.main(["eval", str(run), "--output", str(tmp_path / "ev"), "--readout"]) == 0
    assert "pointing game (macro): maps" in capsys.readouterr().out
    readout = json.loads((tmp_path / "ev" / "readout.json").read_text())
    report = json.loads((tmp_path / "ev" / "eval_report.json").read_text())
    assert readout["pointing"]["maps"] == pytest.approx(report["localization"]["pointing"])
    assert set(readout["pointing"]) == {"maps", "readout", "position"}
    assert (tmp_path / "ev" / "readout.png").exists()
    assert "| **macro** |" in (tmp_path / "ev" / "readout.md").read_text()
