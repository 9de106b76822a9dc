"""The ``clarity-fast`` command line: demo, train, eval, predict, prepare, masks, teacher-logits.

Mistakes in what a user gave (missing data, bad config values, unreadable files) end with one
clear line on stderr and exit code 2 (:class:`clarity_fast.errors.InputError`); any other exception
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .errors import InputError
from .pathologies import CLASS_NAMES

# The main job on a CPU: a small CLARiTy on 128 px phantoms (8 px patches -> 16 x 16 maps).
DEMO_CPU = dict(model="clarity_s16_224", num_train=4000, num_val=400, epochs=6, batch_size=32, lr=1.5e-3,
                warmup_epochs=0.5, layer_decay=1.0, drop_path=0.0, output_dir="runs/demo",
                model_args=dict(img_size=128, patch_size=8, embed_dim=96, depth=6, num_heads=3,
                                num_map_layers=4, num_oct_layers=4, in_chans=1))
# On a GPU: the real CLARiTy-S-16-224 configuration on 224 px phantoms.
DEMO_GPU = dict(model="clarity_s16_224", num_train=8000, num_val=1000, epochs=8, batch_size=64, lr=5e-4,
                warmup_epochs=1, layer_decay=1.0, output_dir="runs/demo", model_args=dict(in_chans=1))


def model_geometry(cfg) -> Tuple[int, int]:
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


def build_datasets(cfg, progress: bool = True, train: bool = True):
    """(train, evaluation) data sets for ``cfg``: phantom (made in memory) or NIH (from the cache).
    With ``train=False`` the first is None."""
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
            NIHCacheDataset(cfg.cache_dir, "test", patch_size=patch))


def _load_teacher(path: Optional[str]):
    if not path:
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return dict(zip(data["ids"], data["logits"].float()))
    except Exception as e:
        raise InputError(f"teacher_logits {path} is not a file made by 'clarity-fast teacher-logits' "
                         f"({str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__})") from None


def _train_and_report(cfg, resume: bool, progress: bool = True, overwrite: bool = False) -> dict:
    from .evaluation import evaluate_model, write_report
    from .training import Trainer, check_setup
    check_setup(cfg)  # fail before minutes of data preparation
    train_set, test_set = build_datasets(cfg, progress)
    trainer = Trainer(cfg, train_set, teacher=_load_teacher(cfg.teacher_logits), progress=progress,
                      overwrite=overwrite)
    if resume:
        trainer.resume()
    t0 = time.perf_counter()
    trainer.fit()
    minutes = (time.perf_counter() - t0) / 60
    if trainer.rank != 0:
        return {}
    out_dir = Path(cfg.output_dir) / "eval"
    model = trainer.eval_model()
    report = evaluate_model(model, test_set, CLASS_NAMES, out_dir, device=trainer.device, progress=progress,
                            tune_at=cfg.xi_tune_at)
    report["train_minutes"] = minutes
    if cfg.dataset == "nih":  # the validation split prepare carved: a reported validation AUC
        from .evaluation import classification_report, run_model
        from .nih import NIHCacheDataset
        val = run_model(model, NIHCacheDataset(cfg.cache_dir, "val", patch_size=model_geometry(cfg)[1]),
                        device=trainer.device, progress=progress)
        report["validation_classification"] = classification_report(val["probs"], val["labels"], CLASS_NAMES)
    write_report(report, out_dir)
    _print_summary(report, out_dir)
    return report


def _print_summary(report: dict, out_dir: Path, stem: str = "report") -> None:
    cls = report["classification"]
    print(f"\nMacro AUC: {cls['macro_auc']:.3f} ({cls['macro_auc_classes']} of {cls['num_classes']} classes)")
    if "validation_classification" in report:
        print(f"validation Macro AUC: {report['validation_classification']['macro_auc']:.3f}")
    loc, rnd = report.get("localization"), report.get("random_baseline")
    if loc:
        print(f"IoU accuracy (macro over classes; ξ tuned on the other patient fold for the {loc['xi_criterion']})")
        print("                                    " + "  ".join(f"T={t}" for t in loc["macro"]) + "   mean")
        rows = [("CLARiTy maps, mean of folds", loc["macro"], loc["mean_iou_accuracy"])]
        rows += [(f"  fold {f} scored", fold["macro"], sum(fold["macro"].values()) / len(fold["macro"]))
                 for f, fold in enumerate(loc["folds"])]
        rows += [("random maps (baseline)", rnd["macro"], rnd["mean_iou_accuracy"])]
        for name, macro, mean in rows:
            print(f"  {name:<34}" + "  ".join(f"{v:.3f}" for v in macro.values()) + f"  {mean:.3f}")
    overlays = "overlays.png" if stem == "report" else f"{stem}_overlays.png"
    print(f"report: {out_dir / (stem + '.md')}, overlays: {out_dir / overlays}")


def cmd_demo(args) -> None:
    from .training import LATEST, TrainConfig, load_config
    preset = DEMO_GPU if torch.cuda.is_available() and not args.cpu else DEMO_CPU
    cfg = load_config(None, args.set, base=TrainConfig(**preset))
    out, k = Path(cfg.output_dir), 1
    while (out / LATEST).exists() or any(out.glob("ckpt-*")):  # each demo run gets its own folder
        k += 1
        out = Path(f"{cfg.output_dir}-{k}")
    cfg.output_dir = str(out)
    print(f"clarity-fast demo: training {cfg.model} {cfg.model_args} on {cfg.num_train} phantom images "
          f"({'CUDA' if torch.cuda.is_available() and not args.cpu else 'CPU'}), then evaluating on {cfg.num_val}; "
          f"run folder {out}")
    if args.cpu:
        cfg.device = "cpu"
    _train_and_report(cfg, resume=False)


def cmd_train(args) -> None:
    from .training import load_config
    _init_distributed()
    cfg = load_config(args.config, args.set)
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite contradict each other: pick one")
    _train_and_report(cfg, resume=args.resume, overwrite=args.overwrite)


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _load_model(args):
    """The model of ``args.checkpoint`` (EMA weights where the run kept them, unless ``--raw-weights``),
    on ``args.device``, with its config; says which weights it loaded."""
    from .training import load_config, load_model_weights, resolve_device
    from .weights import create_model
    path = Path(args.checkpoint)
    config = args.config
    if config is None and path.is_dir() and (path / "config.yaml").exists():
        config = str(path / "config.yaml")
    cfg = load_config(config, args.set)
    device = resolve_device(args.device)
    model = create_model(cfg.model, **cfg.model_args)
    which = load_model_weights(model, path, ema=not args.raw_weights)
    print(f"clarity-fast {args.command}: {which} on {device}", file=sys.stderr)
    return model.to(device).eval(), cfg, device


def cmd_eval(args) -> None:
    from .evaluation import evaluate_model
    model, cfg, device = _load_model(args)
    _, test_set = build_datasets(cfg, train=False)
    out_dir = Path(args.output or Path(args.checkpoint) / "eval")
    # beside the training report (report.md), never over it
    report = evaluate_model(model, test_set, CLASS_NAMES, out_dir, tune_at=cfg.xi_tune_at, device=device,
                            stem="eval_report")
    _print_summary(report, out_dir, stem="eval_report")


def cmd_predict(args) -> None:
    from .predict import predict_files
    model, _, _ = _load_model(args)
    results = predict_files(model, args.images, args.output, threshold=args.threshold)
    for r in results:
        top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{r['image']}: " + ", ".join(f"{k} {v:.2f}" for k, v in top) + f" -> {r['overlay']}")


def cmd_prepare(args) -> None:
    from .nih import prepare
    args.interrupt_hint = f"; the cache at {args.cache_dir} is kept: run the same command again to resume"
    summary = prepare(args.data_dir, args.cache_dir, size=args.size, workers=args.workers)
    print(f"cached {summary['cached']} images into {summary['cache']}; {len(summary['unreadable'])} unreadable "
          f"(listed in unreadable.txt), {summary['missing']} listed in the CSV but not in images/")


def cmd_masks(args) -> None:
    from .nih import compute_masks, load_chestx_det
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = compute_masks(args.cache_dir, load_chestx_det(args.weights), patch_size=args.patch_size,
                            batch_size=args.batch_size, device=device)
    print(f"anatomical priors for {summary['images']} images at grid {summary['grid']} in {args.cache_dir}")


@torch.no_grad()
def cmd_teacher_logits(args) -> None:
    import timm

    from .data import collate, normalize
    from .training import load_config
    cfg = load_config(args.config, args.set)
    train_set, _ = build_datasets(cfg)
    teacher = timm.create_model(args.model, pretrained=False, num_classes=len(CLASS_NAMES))
    if args.checkpoint:
        timm.models.load_checkpoint(teacher, args.checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = teacher.to(device).eval()
    in_chans = teacher.default_cfg.get("input_size", (3,))[0] if hasattr(teacher, "default_cfg") else 3
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, collate_fn=collate)
    ids, logits = [], []
    from tqdm.auto import tqdm
    for batch in tqdm(loader, desc="teacher logits"):
        logits.append(teacher(normalize(batch["image"].to(device), in_chans)).float().cpu())
        ids += batch["id"]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": ids, "logits": torch.cat(logits), "model": args.model}, args.output)
    print(f"{len(ids)} teacher logits from {args.model} -> {args.output} (use teacher_logits={args.output})")


def cmd_phantom(args) -> None:
    from .phantom import PhantomDataset
    from .viz import contact_sheet
    path = contact_sheet(PhantomDataset(args.count, args.size, seed=args.seed), args.output, args.count, args.columns)
    print(f"{args.count} phantom images with their boxes and priors -> {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clarity-fast", description="CLARiTy: train, evaluate and run.")
    sub = parser.add_subparsers(dest="command", required=True)
    sets = dict(action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")

    p = sub.add_parser("demo", help="train a small CLARiTy on built-in phantom data, then evaluate it")
    p.add_argument("--set", **sets)
    p.add_argument("--cpu", action="store_true", help="use the CPU preset even when CUDA is available")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train from a YAML config (torchrun for several GPUs)")
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--set", **sets)
    p.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds another run's checkpoints (they are deleted)")
    p.set_defaults(func=cmd_train)
    weights = dict(action="store_true", help="use the raw weights even where the run kept EMA weights")
    device = dict(default="auto", help="auto (CUDA when present), cpu, cuda or cuda:<index> (default: %(default)s)")

    p = sub.add_parser("eval", help="evaluate a run (classification AUC and localization IoU accuracy)")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or weights file")
    p.add_argument("--config", help="YAML config (default: the run folder's config.yaml)")
    p.add_argument("--set", **sets)
    p.add_argument("--output", help="report folder (default: <checkpoint>/eval; writes eval_report.*)")
    p.add_argument("--raw-weights", **weights)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="image files -> PNG overlays and a JSON of probabilities and boxes")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or weights file")
    p.add_argument("images", nargs="+", help="PNG/JPEG chest X-rays")
    p.add_argument("--output", default="predictions", help="output folder (default: %(default)s)")
    p.add_argument("--config", help="YAML config (default: the run folder's config.yaml)")
    p.add_argument("--set", **sets)
    p.add_argument("--threshold", type=float, default=0.5, help="ξ for the box of each finding")
    p.add_argument("--raw-weights", **weights)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("phantom", help="a PNG contact sheet of the built-in phantom data set")
    p.add_argument("--output", default="phantom_contact_sheet.png")
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("prepare", help="resize NIH ChestX-ray14 once into a uint8 memory-mapped cache")
    p.add_argument("data_dir", help="folder with images/*.png, train_val_list.txt and test_list.txt")
    p.add_argument("cache_dir", help="cache folder to create or resume")
    p.add_argument("--size", type=int, default=512, help="training image size (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads (default: %(default)s)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("masks", help="anatomical priors from torchxrayvision's ChestX-Det PSPNet, once per image")
    p.add_argument("cache_dir", help="a cache made by 'prepare'")
    p.add_argument("--weights", help="local pspnet_chestxray_best_model_4.pth (default: torchxrayvision's cache)")
    p.add_argument("--patch-size", type=int, default=16, help="model patch size: masks are stored per patch")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("teacher-logits", help="store a timm teacher's logits for distillation (L_KD)")
    p.add_argument("--model", default="convnextv2_base", help="timm model name (default: %(default)s)")
    p.add_argument("--checkpoint", help="local weights of the teacher, fine-tuned for the 14 classes")
    p.add_argument("--config", help="YAML config naming the data set")
    p.add_argument("--set", **sets)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default="teacher_logits.pt")
    p.set_defaults(func=cmd_teacher_logits)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        print(f"clarity-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nclarity-fast {args.command}: interrupted{getattr(args, 'interrupt_hint', '')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
