"""The ``clarity-fast`` command line: demo, train, eval, predict, prepare, masks, teacher-logits.

It only parses arguments, calls :mod:`clarity_fast.experiment` (or the data modules) and prints.

Mistakes in what a user gave (missing data, bad config values, unreadable files) end with one
clear line on stderr and exit code 2 (:class:`clarity_fast.errors.InputError`); any other exception
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from . import experiment
from .errors import InputError

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
        prior = report.get("prior_baseline")
        if prior:
            rows += [(f"prior-only maps, σ={prior['sigma']:g} (baseline)", prior["macro"], prior["mean_iou_accuracy"])]
        rows += [("random maps (baseline)", rnd["macro"], rnd["mean_iou_accuracy"])]
        ceiling = report.get("grid_ceiling")
        if ceiling:
            rows += [("truth boxes on the grid (ceiling)", ceiling["macro"], ceiling["mean_iou_accuracy"])]
        for name, macro, mean in rows:
            print(f"  {name:<34}" + "  ".join(f"{v:.3f}" for v in macro.values()) + f"  {mean:.3f}")
    overlays = "overlays.png" if stem == "report" else f"{stem}_overlays.png"
    print(f"report: {out_dir / (stem + '.md')}, overlays: {out_dir / overlays}")


def cmd_demo(args) -> None:
    cfg = experiment.demo_config(cpu=args.cpu, overrides=args.set)
    print(f"clarity-fast demo: training {cfg.model} {cfg.model_args} on {cfg.num_train} phantom images "
          f"({'CPU' if cfg.device == 'cpu' else 'CUDA'}), then evaluating on {cfg.num_val}; "
          f"run folder {cfg.output_dir}")
    _report(experiment.train_and_evaluate(cfg), Path(cfg.output_dir) / "eval")


def cmd_train(args) -> None:
    from .training import load_config
    experiment.init_distributed()
    cfg = load_config(args.config, args.set)
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite contradict each other: pick one")
    _report(experiment.train_and_evaluate(cfg, resume=args.resume, overwrite=args.overwrite),
            Path(cfg.output_dir) / "eval")


def _report(report: dict, out_dir: Path) -> None:
    if report:  # rank 0
        _print_summary(report, out_dir)


def _load_model(args):
    """The model of ``args.checkpoint`` on ``args.device`` with its config; says which weights it loaded."""
    model, cfg, which = experiment.load_model(args.checkpoint, args.config, args.set, args.device,
                                              ema=not args.raw_weights)
    print(f"clarity-fast {args.command}: {which} on {next(model.parameters()).device}", file=sys.stderr)
    return model, cfg


def cmd_eval(args) -> None:
    model, cfg = _load_model(args)
    out_dir = Path(args.output or Path(args.checkpoint) / "eval")
    _print_summary(experiment.evaluate(model, cfg, out_dir), out_dir, stem="eval_report")
    if args.readout:
        macro = experiment.readout(model, cfg, out_dir)["pointing_macro"]
        print("pointing game (macro): " + ", ".join(f"{k} {v:.3f}" for k, v in macro.items())
              + f"; per class: {out_dir / 'readout.md'}")


def cmd_predict(args) -> None:
    from .predict import phantom_warning, predict_files
    model, _ = _load_model(args)
    if phantom_warning(model):
        print(f"clarity-fast predict: warning: {phantom_warning(model)}", file=sys.stderr)
    with warnings.catch_warnings():  # said once above, in the command's own words
        warnings.simplefilter("ignore")
        results = predict_files(model, args.images, args.output, threshold=args.threshold, classes=args.classes,
                                top_k=args.top_k)
    for r in results:
        top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{r['image']}: " + ", ".join(f"{k} {v:.2f}" for k, v in top) + f" -> {r['overlay']}")


def cmd_ablate(args) -> None:
    from .ablation import run_ablation
    cfg = experiment.demo_config(cpu=args.cpu, overrides=args.set)
    print(f"clarity-fast ablate: {len(args.arms or [])  or 'all'} arms of {cfg.model} {cfg.model_args} on "
          f"{cfg.num_train} phantom images, {cfg.epochs} epochs each ({'CPU' if cfg.device == 'cpu' else 'CUDA'}) "
          f"-> {args.output}")
    summary = run_ablation(cfg, args.output, arms=args.arms, seeds=args.seeds, resume=args.resume,
                           overwrite=args.overwrite, with_readout=args.readout)
    for name, row in summary["rows"].items():
        print(f"  {name:<36} mean IoU accuracy {row['mean']:.3f}   T=0.3 {row['macro'].get('0.3', float('nan')):.3f}")
    print(f"table: {Path(args.output) / 'ablation.md'}, plot: {Path(args.output) / 'ablation.png'}")


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


def cmd_teacher_logits(args) -> None:
    from .training import load_config
    count = experiment.teacher_logits(load_config(args.config, args.set), args.model, args.output,
                                      checkpoint=args.checkpoint, batch_size=args.batch_size)
    print(f"{count} teacher logits from {args.model} -> {args.output} (use teacher_logits={args.output})")


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
    p.add_argument("--readout", action="store_true",
                   help="also fit a box-supervised linear readout of the last block's patch tokens and write "
                        "readout.{json,md,png}: where the features could point against where the maps point")
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
    which = p.add_mutually_exclusive_group()
    which.add_argument("--classes", nargs="+", metavar="NAME", help="draw these classes (the model's names)")
    which.add_argument("--top-k", type=int, metavar="K", help="draw the K most likely classes "
                       "(default: every finding with p >= 0.5, else the most likely)")
    p.add_argument("--raw-weights", **weights)
    p.add_argument("--device", **device)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ablate", help="train and evaluate CLARiTy and its ablations side by side on phantoms")
    p.add_argument("--set", **sets)
    p.add_argument("--arms", nargs="+", metavar="ARM", help="arms to run (default: all; see clarity_fast.ablation)")
    p.add_argument("--output", default="runs/ablation", help="folder of the arms and the table (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="train every arm once per seed (phantoms and initialisation) and report the mean and each "
                        "seed (default: the config's seed)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted arms and re-score finished ones with the current protocol")
    p.add_argument("--overwrite", action="store_true", help="retrain arms whose folders hold an earlier run")
    p.add_argument("--readout", action="store_true",
                   help="also fit each CLARiTy run's token readout (see eval --readout) and tabulate, over (seed, "
                        "class) pairs, where the maps miss against where the tokens could point")
    p.add_argument("--cpu", action="store_true", help="use the CPU preset even when CUDA is available")
    p.set_defaults(func=cmd_ablate)

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
