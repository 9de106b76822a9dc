"""Training pipeline: config, loss decrease, exact resume, atomic checkpoints, DDP, predict, CLI errors."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from clarity_fast import cli
from conftest import tiny_train_args
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
                       ("model_args.width=3", "unknown model_args keys"), ("epochs=abc", "must be an integer >= 1"),
                       ("epochs", "key=value"), ("amp=3", "true or false"),
                       ("dataset=imagenet", "'dataset' must be 'phantom' or 'nih'")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [bad])


def test_short_training_loss_decreases(tmp_path, phantoms):
    cfg = tiny_cfg(tmp_path, epochs=6, augment=False, drop_path=0.0)
    Trainer(cfg, phantoms, progress=False).fit()
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    losses = [float(r["total"]) for r in rows]
    assert len(losses) == 36 and set(rows[0]) >= {"cls", "oct", "prx", "cnf", "ac", "bas", "kd", "images_per_s"}
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.05
    assert Image.open(tmp_path / "run" / "training.png").size == (900, 560)  # the curves, drawn from log.csv


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
    torch.save(trainer.model.state_dict(), Path(out_dir) / f"rank{rank}.pt")  # parameters and buffers
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_end_with_identical_weights_and_buffers(tmp_path, phantoms):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), phantoms), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)  # SegmentCAM BatchNorm statistics
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
    assert cli.main(tiny_train_args(run)) == 0
    assert "Macro AUC" in capsys.readouterr().out
    assert cli.main(["eval", str(run), "--output", str(tmp_path / "again")]) == 0
    report = __import__("json").loads((tmp_path / "again" / "eval_report.json").read_text())
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
    assert "prior-only maps" in out  # the anatomical-prior baseline beside the model
    assert all((tmp_path / "demo" / "eval" / f"report_{kind}.png").exists() for kind in ("iou", "classes"))
    before = sorted(p.name for p in (tmp_path / "demo").glob("ckpt-*"))
    assert cli.main(["demo", "--cpu", "--set", "num_train=64", "--set", "num_val=24", "--set", "epochs=1",
                     "--set", f"output_dir={tmp_path / 'demo'}"]) == 0  # a second demo: its own folder
    assert f"run folder {tmp_path / 'demo'}-2" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "demo").glob("ckpt-*")) == before
    assert (tmp_path / "demo-2" / "eval" / "report.md").exists()


# --------------------------------------------------------------------------- never lose work (issue 10)


def test_a_new_run_never_writes_into_another_runs_folder(tmp_path, phantoms, capsys):
    Trainer(tiny_cfg(tmp_path, max_steps=12, save_every_steps=2), phantoms, progress=False).fit()
    run = tmp_path / "run"
    before = sorted(p.name for p in run.glob("ckpt-*"))
    assert before == ["ckpt-00000010", "ckpt-00000012"]
    log_before = (run / "log.csv").read_text()
    with pytest.raises(ValueError, match="already holds a run's checkpoints: pass --resume"):
        Trainer(tiny_cfg(tmp_path, max_steps=4), phantoms, progress=False).fit()
    assert sorted(p.name for p in run.glob("ckpt-*")) == before and (run / "log.csv").read_text() == log_before
    assert latest_checkpoint(run).name == "ckpt-00000012"
    assert cli.main(["train", "--set", f"output_dir={run}", "--set", "device=cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    Trainer(tiny_cfg(tmp_path, max_steps=4), phantoms, progress=False, overwrite=True).fit()
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000004"]


def test_rotation_is_by_step_number_and_keeps_the_newest(tmp_path):
    from clarity_fast.training import save_checkpoint
    model = torch.nn.Linear(2, 2)
    for step in (99_999_998, 99_999_999, 100_000_000):  # as text, "ckpt-100000000" sorts before "ckpt-99999998"
        save_checkpoint(tmp_path, model, dict(step=step))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-100000000", "ckpt-99999999"]
    assert latest_checkpoint(tmp_path).name == "ckpt-100000000"


def test_resume_runs_no_pickled_code_and_follows_no_outside_pointer(tmp_path, phantoms):
    import pickle
    Trainer(tiny_cfg(tmp_path, max_steps=2), phantoms, progress=False).fit()
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    state["extra"] = Payload()
    with open(ckpt / "trainer_state.pt", "wb") as f:
        pickle.dump(state, f)
    trainer = Trainer(tiny_cfg(tmp_path), phantoms, progress=False)
    with pytest.raises(ValueError, match="is not a clarity_fast trainer state; refusing to load it"):
        trainer.resume()
    assert not marker.exists()
    outside = tmp_path / "elsewhere" / "ckpt-00000001"
    outside.mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.pt"):
        (outside / name).write_bytes(b"x")
    for pointer in ("../elsewhere/ckpt-00000001", str(outside), "ckpt-1/../../elsewhere"):
        (run / "latest").write_text(pointer)
        with pytest.raises(ValueError, match="not a checkpoint folder of this run"):
            latest_checkpoint(run)


def test_resume_with_a_changed_config_lists_the_differences(tmp_path, phantoms):
    Trainer(tiny_cfg(tmp_path, max_steps=2), phantoms, progress=False).fit()
    changed = Trainer(tiny_cfg(tmp_path, lr=5e-3, batch_size=4), phantoms, progress=False)
    with pytest.raises(ValueError, match=r"batch_size: 8 -> 4; lr: 0.002 -> 0.005.*only max_steps"):
        changed.resume()
    allowed = Trainer(tiny_cfg(tmp_path, max_steps=3, log_every=2), phantoms, progress=False)
    allowed.resume()
    assert allowed.batch_index == 2


def test_divergence_stops_with_one_line_and_keeps_a_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """The loss turns NaN after 5 steps (as with a too-high learning rate): the bad steps are skipped, the
    run stops after max_bad_steps of them with one line and a non-zero exit, every checkpoint is finite."""
    from safetensors.torch import load_file
    import clarity_fast.losses as losses
    real, calls = losses.ClarityLoss.forward, []

    def turning_nan(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) > 5:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(losses.ClarityLoss, "forward", turning_nan)
    run = tmp_path / "nan_run"
    args = ["train", "--set", "model_args={img_size: 64, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
            "num_map_layers: 2, num_oct_layers: 2, in_chans: 1}", "--set", "num_train=48", "--set", "num_val=8",
            "--set", "batch_size=8", "--set", "epochs=4", "--set", f"output_dir={run}", "--set", "device=cpu",
            "--set", "save_every_steps=2", "--set", "max_bad_steps=3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("clarity-fast train:")]
    assert len(lines) == 1 and "training diverged" in lines[0] and "Traceback" not in err
    assert "not finite for 3 optimizer steps in a row" in lines[0] and "ckpt-00000006" in lines[0]
    assert len(calls) == 8
    for ckpt in sorted(run.glob("ckpt-*")):
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, phantoms):
    from clarity_fast.training import TrainingDiverged
    trainer = Trainer(tiny_cfg(tmp_path, max_steps=2), phantoms, progress=False)
    trainer.fit()
    good = latest_checkpoint(tmp_path / "run")
    trainer.batch_index = 3
    bn = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("inf")  # a buffer, not a parameter
    with pytest.raises(TrainingDiverged, match="not finite"):
        trainer.save()
    assert latest_checkpoint(tmp_path / "run") == good


def test_numbers_in_any_notation(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 5e-4\nweight_decay: 1E-2\nbatch_size: 32.0\nema_decay: '0.999'\n")
    cfg = load_config(tmp_path / "c.yaml", ["warmup_epochs=1e-1"])
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.ema_decay, cfg.warmup_epochs) == (5e-4, 1e-2, 32, 0.999, 0.1)
    assert isinstance(cfg.batch_size, int)
    assert load_config(None, ["lr=1e-3"]).lr == 1e-3


def test_predict_never_writes_over_its_inputs(tmp_path, phantoms, capsys):
    import json
    Trainer(tiny_cfg(tmp_path, max_steps=1), phantoms, progress=False).fit()
    folder = tmp_path / "xrays"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    png = (phantoms[0]["image"][0].numpy() * 255).astype(np.uint8)
    same_stem = [folder / "a" / "scan.png", folder / "b" / "scan.png"]
    for p in same_stem:
        Image.fromarray(png).save(p)
    Image.fromarray(png).save(folder / "img.png")
    target = folder / "img.png"
    before = target.read_bytes()
    assert cli.main(["predict", str(tmp_path / "run"), str(target), "--output", str(folder)]) == 2
    assert "would overwrite its input" in capsys.readouterr().err
    assert target.read_bytes() == before
    out = tmp_path / "pred"
    assert cli.main(["predict", str(tmp_path / "run"), *map(str, same_stem), "--output", str(out)]) == 0
    results = json.loads((out / "predictions.json").read_text())
    assert [Path(r["overlay"]).name for r in results] == ["scan.png", "scan-2.png"]
    assert not list(out.glob(".*tmp*"))


def test_eval_uses_the_ema_weights_training_reported_with(tmp_path, capsys):
    import json
    run = tmp_path / "ema_run"
    args = ["train", "--set", "model_args={img_size: 64, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, "
            "num_map_layers: 2, num_oct_layers: 2, in_chans: 1}", "--set", "num_train=32", "--set", "num_val=16",
            "--set", "epochs=2", "--set", "batch_size=8", "--set", f"output_dir={run}", "--set", "device=cpu",
            "--set", "ema_decay=0.5"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert (latest_checkpoint(run) / "ema.safetensors").is_file()
    trained = json.loads((run / "eval" / "report.json").read_text())
    assert cli.main(["eval", str(run)]) == 0
    assert "EMA weights" in capsys.readouterr().err
    again = json.loads((run / "eval" / "eval_report.json").read_text())
    assert again["classification"]["macro_auc"] == pytest.approx(trained["classification"]["macro_auc"], abs=1e-6)
    assert json.loads((run / "eval" / "report.json").read_text()) == trained  # the training report is untouched
    assert cli.main(["eval", str(run), "--raw-weights", "--output", str(tmp_path / "raw")]) == 0
    assert "raw weights" in capsys.readouterr().err


def _bomb_png(path, side=30000):
    """A PNG whose header claims side x side pixels (PIL refuses such sizes as decompression bombs)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_user_mistakes_are_one_line_with_exit_2(tmp_path, phantoms, capsys):
    Trainer(tiny_cfg(tmp_path, max_steps=1), phantoms, progress=False).fit()
    run = tmp_path / "run"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: [1, 2\nepochs: 3\n")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((latest_checkpoint(run) / "model.safetensors").read_bytes()[:500])
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bomb = tmp_path / "bomb.png"
    _bomb_png(bomb)
    small = ["--set", "num_train=16", "--set", "num_val=8"]
    cases = [
        (["train", "--config", str(bad_yaml)], "is not valid YAML at line"),
        (["train", "--config", str(tmp_path)], "is not a file"),
        (["eval", str(truncated)], "is not a readable .safetensors file"),
        (["train", "--set", f"pretrained={notes}", "--set", "device=cpu"], "is not a readable checkpoint file"),
        (["eval", str(run), "--set", "model_args.num_classes=5"], "model_args.num_classes=5 does not fit"),
        (["train", "--set", "model=resnet18"], "must be a CLARiTy model name"),
        (["train", "--set", "model_args.patch_size=0"], "patch_size must be an integer >= 1"),
        (["train", "--set", "batch_size=1.5"], "'batch_size' must be an integer >= 1"),
        (["train", "--set", "drop_path=2"], "'drop_path' must be a number in [0, 1)"),
        (["train", "--set", f"output_dir={a_file}", "--set", "device=cpu"], "is a file, not a folder"),
        (["predict", str(run), str(bomb), "--output", str(tmp_path / "p")], "image too large"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "--set", "device=cuda"], "no CUDA GPU is available"))
        cases.append((["eval", str(run), "--device", "cuda"], "no CUDA GPU is available"))
    for argv, match in cases:
        assert cli.main(argv + (small if argv[0] == "train" else [])) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("clarity-fast ")]
        assert lines and match in lines[-1] and "Traceback" not in err, (argv, err[-500:])
        assert sum("error:" in line for line in lines) == 1


def test_internal_errors_keep_their_traceback(monkeypatch):
    import clarity_fast.training as training

    def bug(*a, **k):
        raise ValueError("an internal bug, not a user mistake")

    monkeypatch.setattr(training, "load_config", bug)
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["train"])


FIVE = ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")


def test_class_names_flow_from_data_to_checkpoint_to_predict(tmp_path):
    """A 5-class phantom run: the model takes the data set's names, the checkpoint keeps them, and a model
    rebuilt from the config alone gets them back with the weights, up to predict's JSON and overlay."""
    five = InMemoryDataset(PhantomDataset(24, 64, 8, seed=3, classes=FIVE), progress=False)
    trainer = Trainer(tiny_cfg(tmp_path, max_steps=1), five, progress=False)
    assert trainer.model.class_names == FIVE
    trainer.fit()
    from clarity_fast import experiment
    model, cfg, _ = experiment.load_model(tmp_path / "run", device="cpu")
    assert model.class_names == FIVE and model.pretrained_cfg["label_names"] == FIVE
    img = tmp_path / "xray.png"
    Image.fromarray((five[0]["image"][0].numpy() * 255).astype(np.uint8)).save(img)
    assert cli.main(["predict", str(tmp_path / "run"), str(img), "--output", str(tmp_path / "pred")]) == 0
    import json
    result, = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert tuple(result["probabilities"]) == FIVE and set(result["boxes"]) <= set(FIVE)
    with pytest.raises(ValueError, match="classes .* are not the model's class_names"):
        from clarity_fast.evaluation import evaluate_model
        evaluate_model(model, InMemoryDataset(PhantomDataset(4, 64, 8, seed=4), progress=False), progress=False)


def test_conflicting_num_classes_is_refused(tmp_path, phantoms):
    cfg = tiny_cfg(tmp_path, model_args=dict(TINY, num_classes=5))
    with pytest.raises(ValueError, match="num_classes=5 does not fit the training set, which has 14 classes"):
        Trainer(cfg, phantoms, progress=False)


def test_predict_classes_top_k_input_resolution_and_phantom_warning(tmp_path, phantoms, capsys):
    Trainer(tiny_cfg(tmp_path, max_steps=1), phantoms, progress=False).fit()
    img = tmp_path / "wide.png"
    Image.fromarray((phantoms[1]["image"][0].numpy() * 255).astype(np.uint8)).resize((300, 200)).save(img)
    run, out = str(tmp_path / "run"), tmp_path / "pred"
    assert cli.main(["predict", run, str(img), "--output", str(out), "--classes", "Mass", "Effusion"]) == 0
    assert "trained only on phantom images" in capsys.readouterr().err
    import json
    result, = json.loads((out / "predictions.json").read_text())
    assert "phantom" in result["warning"] and set(result["boxes"]) <= {"Mass", "Effusion"}
    assert Image.open(out / "wide.png").size == (2 * 300, 200)  # one panel per class asked for, at input size
    for x, y, w, h in result["boxes"].values():
        assert 0 <= x and x + w <= 300 and 0 <= y and y + h <= 200
    assert cli.main(["predict", run, str(img), "--output", str(out), "--top-k", "6"]) == 0
    assert Image.open(out / "wide.png").size == (4 * 300, 2 * 200)
    assert cli.main(["predict", run, str(img), "--output", str(out), "--classes", "Flu"]) == 2
    assert "['Flu'] are not among the model's class_names" in capsys.readouterr().err
