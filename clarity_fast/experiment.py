"""The library layer under the command line: data sets, model loading, train-then-evaluate, prediction.

Every ``clarity-fast`` command is one call here, so the same work runs from Python::

    from clarity_fast import experiment
    cfg = experiment.demo_config(cpu=True)                  # the README's demo, as a TrainConfig
    report = experiment.train_and_evaluate(cfg)             # trains, evaluates, writes <output_dir>/eval
    model, cfg, which = experiment.load_model("runs/demo")  # EMA weights of the latest checkpoint
    report = experiment.evaluate(model, cfg, "runs/demo/eval")
    results = clarity_fast.predict.predict_files(model, ["chest.png"], "predictions")
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .clarity import Clarity
from .errors import InputError
from .files import write_atomic
from .progress import progress as progress_bar
from .training import TrainConfig

PathLike = Union[str, Path]

# The main job on a CPU: a small CLARiTy on 128 px phantoms (8 px patches -> 16 x 16 maps). 12 epochs, not 6:
# at 6 seeds 0 and 2 stay near the anatomical region, at 12 they find lesions (docs/results/*-budget-cpu.md).
DEMO_CPU = dict(model="clarity_s16_224", num_train=4000, num_val=400, epochs=12, batch_size=32, lr=1.5e-3,
                warmup_epochs=0.5, layer_decay=1.0, drop_path=0.0, output_dir="runs/demo",
                model_args=dict(img_size=128, patch_size=8, embed_dim=96, depth=6, num_heads=3,
                                num_map_layers=4, num_oct_layers=4, in_chans=1))
# On a GPU: the real CLARiTy-S-16-224 configuration on 224 px phantoms.
DEMO_GPU = dict(model="clarity_s16_224", num_train=8000, num_val=1000, epochs=8, batch_size=64, lr=5e-4,
                warmup_epochs=1, layer_decay=1.0, output_dir="runs/demo", model_args=dict(in_chans=1))


def demo_config(cpu: bool = False, overrides: Sequence[str] = ()) -> TrainConfig:
    """The demo's config: the GPU preset on CUDA unless ``cpu``, ``overrides`` (``KEY=VALUE``) applied, and
    an ``output_dir`` of its own (``runs/demo``, ``runs/demo-2``, ...) so no earlier run is touched."""
    from .training import LATEST, load_config
    use_gpu = torch.cuda.is_available() and not cpu
    cfg = load_config(None, overrides, base=TrainConfig(**(DEMO_GPU if use_gpu else DEMO_CPU)))
    out, k = Path(cfg.output_dir), 1
    while (out / LATEST).exists() or any(out.glob("ckpt-*")):
        k += 1
        out = Path(f"{cfg.output_dir}-{k}")
    cfg.output_dir = str(out)
    if not use_gpu:
        cfg.device = "cpu"
    return cfg


def model_geometry(cfg: TrainConfig) -> Tuple[int, int]:
    """(img_size, patch_size) of the configured model."""
    import timm
    img = cfg.model_args.get("img_size")
    if img is None:
        img = timm.models.get_pretrained_cfg(cfg.model).input_size[-1]
    patch = cfg.model_args.get("patch_size", 16)
    if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
        raise InputError(f"patch_size must be an integer >= 1, got {patch!r}")
    if not isinstance(img, int) or img % patch:
        raise InputError(f"img_size {img!r} must be an integer divisible by patch_size {patch}")
    return img, patch


def build_datasets(cfg: TrainConfig, progress: bool = True, train: bool = True, split: str = "test"):
    """(train, evaluation) data sets for ``cfg``: phantom (made in memory) or NIH (from the ``prepare``
    cache; ``split`` "test" or "val" for the second). With ``train=False`` the first is None."""
    img, patch = model_geometry(cfg)
    if cfg.dataset == "phantom":
        from .data import InMemoryDataset
        from .phantom import PhantomDataset
        train_set = InMemoryDataset(PhantomDataset(cfg.num_train, img, patch, seed=cfg.seed), progress,
                                    "generating phantoms") if train else None
        test = InMemoryDataset(PhantomDataset(cfg.num_val, img, patch, seed=cfg.seed + 1), progress,
                               "generating test phantoms")
        return train_set, test
    from .nih import NIHCacheDataset
    if not cfg.cache_dir:
        raise InputError("dataset=nih needs cache_dir=<folder made by 'clarity-fast prepare'>")
    return (NIHCacheDataset(cfg.cache_dir, "train", patch_size=patch) if train else None,
            NIHCacheDataset(cfg.cache_dir, split, patch_size=patch))


def load_teacher_logits(path: Optional[PathLike]) -> Optional[Dict[str, torch.Tensor]]:
    """``{image id: (C,) logits}`` from a file made by :func:`teacher_logits`, or None without a path."""
    if not path:
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return dict(zip(data["ids"], data["logits"].float()))
    except Exception as e:
        raise InputError(f"teacher_logits {path} is not a file made by 'clarity-fast teacher-logits' "
                         f"({str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__})") from None


def init_distributed() -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); nothing otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def train_and_evaluate(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
                       progress: bool = True, model: Optional[torch.nn.Module] = None,
                       with_readout: bool = False) -> Dict:
    """Train ``cfg`` (``resume``: from its run folder's latest checkpoint; ``overwrite``: start over in a folder
    holding another run), then evaluate the EMA (or raw) weights on the held-out set and, for NIH, the
    validation split. Writes ``<output_dir>/eval/report.{json,md}`` and overlays; returns the report (empty on
    ranks other than 0). ``model``: train this module instead of the one ``cfg`` names (see :class:`Trainer`);
    ``with_readout``: also the token readout of :func:`readout`, as the report's ``readout``."""
    from .evaluation import classification_report, evaluate_model, run_model, write_report
    from .training import Trainer, check_setup
    if resume and overwrite:
        raise InputError("resume and overwrite contradict each other: pick one")
    check_setup(cfg)  # fail before minutes of data preparation
    train_set, test_set = build_datasets(cfg, progress)
    trainer = Trainer(cfg, train_set, teacher=load_teacher_logits(cfg.teacher_logits), progress=progress,
                      overwrite=overwrite, model=model)
    if resume:
        trainer.resume()
    t0 = time.perf_counter()
    trainer.fit()
    minutes = (time.perf_counter() - t0) / 60
    if trainer.rank != 0:
        return {}
    out_dir = Path(cfg.output_dir) / "eval"
    model = trainer.eval_model()
    report = evaluate_model(model, test_set, out_dir, device=trainer.device, progress=progress,
                            tune_at=cfg.xi_tune_at)
    report["train_minutes"] = minutes
    report["environment"] = environment(trainer.device)
    if cfg.dataset == "nih":  # the validation split prepare carved: a reported validation AUC
        _, val_set = build_datasets(cfg, progress, train=False, split="val")
        val = run_model(model, val_set, device=trainer.device, progress=progress)
        report["validation_classification"] = classification_report(val["probs"], val["labels"], model.class_names)
    if with_readout:
        report["readout"] = readout(model, cfg, out_dir, progress, test_set)
    write_report(report, out_dir)
    return report


def environment(device: torch.device) -> Dict[str, str]:
    """What a run's figures depend on beyond its config: training on a CPU is bitwise repeatable for the same
    torch build, CPU and number of threads; phantom generation and evaluation do not depend on them."""
    import platform
    return dict(torch=torch.__version__, device=str(device), threads=str(torch.get_num_threads()),
                cpu=platform.processor() or platform.machine(),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "none")


def load_model(checkpoint: PathLike, config: Optional[PathLike] = None, overrides: Sequence[str] = (),
               device: str = "auto", ema: bool = True) -> Tuple[Clarity, TrainConfig, str]:
    """The model of a run folder, checkpoint folder or weights file, in eval mode on ``device``, with its
    config (default: the run folder's ``config.yaml``) and, in words, which weights were loaded (the EMA
    weights where the run kept them, unless ``ema=False``). Class names come with the checkpoint."""
    from .training import (load_config, load_model_weights, model_class_args, resolve_device, saved_class_names,
                           weights_file)
    from .weights import create_model
    path = Path(checkpoint)
    if config is None and path.is_dir() and (path / "config.yaml").exists():
        config = path / "config.yaml"
    cfg = load_config(config, overrides)
    target = resolve_device(device)
    file, _ = weights_file(path, ema)
    model = create_model(cfg.model, **model_class_args(cfg.model_args, saved_class_names(file), str(file)))
    which = load_model_weights(model, path, ema=ema)
    return model.to(target).eval(), cfg, which


def evaluate(model: Clarity, cfg: TrainConfig, out_dir: PathLike, progress: bool = True) -> Dict:
    """Evaluate a trained model on its config's held-out set; writes ``eval_report.{json,md}`` and overlays
    into ``out_dir`` (beside a training report, never over it) and returns the report."""
    from .evaluation import evaluate_model
    _, test_set = build_datasets(cfg, progress, train=False)
    return evaluate_model(model, test_set, out_dir, tune_at=cfg.xi_tune_at, progress=progress,
                          device=next(model.parameters()).device, stem="eval_report")


def readout(model: Clarity, cfg: TrainConfig, out_dir: PathLike, progress: bool = True, test_set=None) -> Dict:
    """What the tokens know against what the maps show, on the config's held-out set (or ``test_set``): writes
    ``readout.{json,md,png}`` into ``out_dir`` (see :mod:`clarity_fast.readout`) and returns the report."""
    from .readout import readout_report, write_readout
    if test_set is None:
        _, test_set = build_datasets(cfg, progress, train=False)
    report = readout_report(model, test_set, device=next(model.parameters()).device, progress=progress)
    write_readout(report, out_dir)
    return report


@torch.no_grad()
def teacher_logits(cfg: TrainConfig, model_name: str, output: PathLike, checkpoint: Optional[PathLike] = None,
                   batch_size: int = 32, progress: bool = True) -> int:
    """Store a timm teacher's logits on ``cfg``'s training images for distillation (L_KD); returns the count."""
    import timm

    from .data import collate, normalize
    from .pathologies import CLASS_NAMES
    train_set, _ = build_datasets(cfg, progress)
    num_classes = len(getattr(train_set, "classes", None) or CLASS_NAMES)
    teacher = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    if checkpoint:
        timm.models.load_checkpoint(teacher, str(checkpoint))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = teacher.to(device).eval()
    in_chans = teacher.pretrained_cfg.get("input_size", (3,))[0] if hasattr(teacher, "pretrained_cfg") else 3
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, collate_fn=collate)
    ids, logits = [], []
    for batch in progress_bar(loader, desc="teacher logits", enabled=progress):
        logits.append(teacher(normalize(batch["image"].to(device), in_chans)).float().cpu())
        ids += batch["id"]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    data = {"ids": ids, "logits": torch.cat(logits), "model": model_name}
    write_atomic(output, lambda tmp: torch.save(data, tmp))
    return len(ids)
