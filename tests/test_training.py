"""Training pipeline: config, loss decrease, exact resume, atomic checkpoints, DDP, predict, CLI errors."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from clarity_fast import cli
from clarity_fast.data import InMemoryDataset
from clarity_fast.phantom import PhantomDataset
from clarity_fast.training import (TrainConfig, Trainer, latest_checkpoint, load_config, load_model_weights,
                                   save_config)

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_map_layers=2, num_oct_layers=2,
            in_chans=1)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-samples"


def tiny_cfg(tmp_path, **kw):
    base = dict(model="clarity_s16_224", model_args=dict(TINY), batch_size=8, epochs=2, lr=2e-3, warmup_epochs=0.5,
                layer_decay=1.0, drop_path=0.1, output_dir=str(tmp_path / "run"), log_every=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture(scope="module")
def phantoms():
    return InMemoryDataset(PhantomDataset(48, 64, 8, seed=0), progress=False)


def test_config_round_trip_and_override_errors(tmp_path):
    cfg = load_config(None, ["epochs=3", "loss.lambda_oct=0.2", "model_args.depth=2", "ema_decay=0.99"])
    assert cfg.epochs == 3 and cfg.loss == {"lambda_oct": 0.2} and cfg.model_args == {"depth": 2}
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    for bad, match in (("bogus=1", "unknown config key 'bogus'"), ("loss.lambda_x=1", "unknown loss keys"),
                       ("model_args.width=3", "unknown model_args keys"), ("epochs=abc", "must be a number"),
                       ("epochs", "key=value"), ("amp=3", "true or false"), ("dataset=imagenet", "dataset must be")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [bad])


def test_short_training_loss_decreases(tmp_path, phantoms):
    cfg = tiny_cfg(tmp_path, epochs=6, augment=False, drop_path=0.0)
    Trainer(cfg, phantoms, progress=False).fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    losses = [float(r["total"]) for r in rows]
    assert len(losses) == 36 and set(rows[0]) >= {"cls", "oct", "prx", "cnf", "ac", "bas", "kd", "images_per_s"}
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.05


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reaches_the_same_weights(tmp_path, phantoms, accum):
    full = Trainer(tiny_cfg(tmp_path / "a", accum_steps=accum, ema_decay=0.9), phantoms, progress=False)
    full.fit()
    part = Trainer(tiny_cfg(tmp_path / "b", accum_steps=accum, ema_decay=0.9, max_steps=4), phantoms, progress=False)
    part.fit()
    resumed = Trainer(tiny_cfg(tmp_path / "b", accum_steps=accum, ema_decay=0.9), phantoms, progress=False)
    resumed.resume()
    assert resumed.batch_index == 4
    resumed.fit()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(full.ema.module.state_dict().values(), resumed.ema.module.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_killed_midway_leaves_previous_loadable(tmp_path, phantoms, monkeypatch):
    trainer = Trainer(tiny_cfg(tmp_path, max_steps=3), phantoms, progress=False)
    trainer.fit()
    good = latest_checkpoint(tmp_path / "run")
    trainer.batch_index = 5

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run") == good
    model = Trainer(tiny_cfg(tmp_path), phantoms, progress=False).model
    load_model_weights(model, tmp_path / "run")
    torch.testing.assert_close(model.state_dict()["cls_token"], trainer.model.state_dict()["cls_token"])


def _ddp_worker(rank, world, init_file, out_dir, data):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = TrainConfig(model="clarity_s16_224", model_args=dict(TINY), batch_size=4, epochs=1, lr=1e-3,
                      layer_decay=1.0, output_dir=str(out_dir), device="cpu", max_steps=3, log_every=1).validate()
    trainer = Trainer(cfg, data, progress=False)
    trainer.fit()
    torch.save({k: v for k, v in trainer.model.named_parameters()}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, phantoms):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), phantoms), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = Trainer(tiny_cfg(tmp_path / "fresh"), phantoms, progress=False).model.state_dict()
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])


def test_predict_on_png_files(tmp_path, phantoms):
    trainer = Trainer(tiny_cfg(tmp_path, max_steps=1), phantoms, progress=False)
    trainer.fit()
    img = tmp_path / "xray.png"
    Image.fromarray((phantoms[0]["image"][0].numpy() * 255).astype(np.uint8)).resize((300, 280)).save(img)
    files = [str(img)] + ([str(SHARED / "00000001_000.png")] if SHARED.exists() else [])
    assert cli.main(["predict", str(tmp_path / "run"), *files, "--output", str(tmp_path / "pred")]) == 0
    import json
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(results) == len(files) and len(results[0]["probabilities"]) == 14
    assert all(Path(r["overlay"]).exists() for r in results)
    for box in results[0]["boxes"].values():
        assert 0 <= box[0] <= 300 and 0 <= box[1] <= 280


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad_img = tmp_path / "broken.png"
    bad_img.write_bytes(b"nope")
    cases = [(["train", "--set", "bogus=1"], "unknown config key"),
             (["train", "--set", "dataset=nih"], "cache_dir"),
             (["eval", str(tmp_path / "missing_run")], "no checkpoint"),
             (["prepare", str(tmp_path), str(tmp_path / "cache")], "images/*.png")]
    for argv, match in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
    run = tmp_path / "run"
    cfg = tiny_cfg(tmp_path, max_steps=1)
    Trainer(cfg, InMemoryDataset(PhantomDataset(8, 64, 8), progress=False), progress=False).fit()
    assert cli.main(["predict", str(run), str(bad_img), "--output", str(tmp_path / "p")]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_cli_train_then_eval_round_trip(tmp_path, capsys):
    run = tmp_path / "cli_run"
    args = ["train", "--set", "model_args={img_size: 64, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
            "num_map_layers: 2, num_oct_layers: 2, in_chans: 1}", "--set", "num_train=16", "--set", "num_val=12",
            "--set", "epochs=1", "--set", "batch_size=8", "--set", f"output_dir={run}", "--set", "device=cpu"]
    assert cli.main(args) == 0
    assert "Macro AUC" in capsys.readouterr().out
    assert cli.main(["eval", str(run), "--output", str(tmp_path / "again")]) == 0
    report = __import__("json").loads((tmp_path / "again" / "report.json").read_text())
    assert set(report) >= {"classification", "localization", "random_baseline"}


def test_teacher_logits_then_distillation(tmp_path, capsys):
    import timm
    teacher = timm.create_model("test_convnext", num_classes=14)
    ckpt = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), ckpt)
    data = ["--set", "model_args={img_size: 64, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
            "num_map_layers: 2, num_oct_layers: 2, in_chans: 1}", "--set", "num_train=16", "--set", "num_val=8"]
    out = tmp_path / "teacher_logits.pt"
    assert cli.main(["teacher-logits", "--model", "test_convnext", "--checkpoint", str(ckpt), "--output", str(out),
                     *data]) == 0
    stored = torch.load(out)
    assert len(stored["ids"]) == 16 and stored["logits"].shape == (16, 14)
    run = tmp_path / "kd_run"
    assert cli.main(["train", *data, "--set", f"teacher_logits={out}", "--set", "epochs=1", "--set", "batch_size=8",
                     "--set", f"output_dir={run}", "--set", "device=cpu", "--set", "log_every=1"]) == 0
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert all(float(r["kd"]) > 0 for r in rows)


def test_augmentation_moves_masks_with_images():
    from clarity_fast.data import augment
    B, S, g = 6, 64, 8
    image = torch.zeros(B, 1, S, S)
    image[:, :, 16:40, 8:32] = 1.0  # bright block = cells (2..4, 1..3)
    masks = torch.zeros(B, 3, g, g, dtype=torch.bool)
    masks[:, :, 2:5, 1:4] = True
    batch = dict(image=image, masks=masks, dist=torch.zeros(B, 3, g, g), labels=torch.zeros(B, 3))
    out = augment(batch, torch.Generator().manual_seed(0), brightness=0.0, contrast=0.0)
    assert not torch.equal(out["image"], image)
    cells = torch.nn.functional.avg_pool2d(out["image"], S // g)[:, 0] > 0.5  # bright cells after the transform
    agree = (cells == out["masks"][:, 0]).float().mean()
    assert agree > 0.9, agree
    assert (out["dist"][out["masks"]] == 0).all() and (out["dist"][~out["masks"]] > 0).all()


def test_demo_command_end_to_end_small(tmp_path, capsys):
    """The README's main job, shrunk: the CPU preset's model on a few phantoms, then the report."""
    assert cli.main(["demo", "--cpu", "--set", "num_train=64", "--set", "num_val=24", "--set", "epochs=1",
                     "--set", f"output_dir={tmp_path / 'demo'}"]) == 0
    out = capsys.readouterr().out
    assert "Macro AUC" in out and "random maps (baseline)" in out
    assert (tmp_path / "demo" / "eval" / "overlays.png").exists()
