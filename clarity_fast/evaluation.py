"""Evaluation (SPEC §6): per-class / macro ROC AUC and IoU accuracy of boxes drawn from maps.

Box protocol: upsample the class's map bilinearly to image size, min-max normalise, threshold
at ξ(c), take the bounding box of the largest connected component. ξ(c) is tuned per class on
one half of the box images (split by patient) and reported on the other half, and the reverse.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import rankdata

IOU_THRESHOLDS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
XI_CANDIDATES: Tuple[float, ...] = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))

Box = Tuple[float, float, float, float]  # x, y, w, h in image pixels


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties get half credit); NaN if one class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Dict:
    """Per-class AUC and Macro AUC (mean over classes with both outcomes present) of ``(N, C)`` arrays."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs and labels must both be (N, {len(classes)}), got {probs.shape} and {labels.shape}")
    per_class = {c: roc_auc(probs[:, i], labels[:, i]) for i, c in enumerate(classes)}
    valid = [v for v in per_class.values() if not math.isnan(v)]
    return {"auc": per_class, "macro_auc": float(np.mean(valid)) if valid else float("nan")}


def box_from_map(heatmap: torch.Tensor, image_size: Tuple[int, int], threshold: float) -> Optional[Box]:
    """``(h, w)`` map -> box of the largest connected component above ``threshold`` after bilinear
    upsampling to ``image_size = (H, W)`` and min-max normalisation; None if the map is flat."""
    m = F.interpolate(heatmap.detach().float().cpu()[None, None], size=tuple(image_size), mode="bilinear",
                      align_corners=False)[0, 0].numpy()
    lo, hi = m.min(), m.max()
    if not hi > lo:
        return None
    fg = (m - lo) / (hi - lo) >= threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    ys, xs = np.nonzero(labels == largest)
    return float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)


def iou(a: Optional[Box], b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes; 0 when ``a`` is None."""
    if a is None:
        return 0.0
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass
class BoxRecord:
    """One ground-truth box: image id, patient id, class index, (x, y, w, h) and the image size (H, W)."""
    image_id: str
    patient: str
    class_index: int
    box: Box
    image_size: Tuple[int, int]


def patient_folds(records: Sequence[BoxRecord], seed: int = 0) -> np.ndarray:
    """Fold (0 or 1) of each record: the patients are split in two halves at random."""
    patients = sorted({r.patient for r in records})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    fold_of = {patients[i]: int(rank >= len(patients) / 2) for rank, i in enumerate(order)}
    return np.array([fold_of[r.patient] for r in records], dtype=int)


def _iou_table(records: Sequence[BoxRecord], maps: Dict[str, torch.Tensor], candidates: Sequence[float]) -> np.ndarray:
    return np.array([[iou(box_from_map(maps[r.image_id][r.class_index], r.image_size, xi), r.box)
                      for xi in candidates] for r in records])


def localization_report(records: Sequence[BoxRecord], maps: Dict[str, torch.Tensor], classes: Sequence[str],
                        thresholds: Sequence[float] = IOU_THRESHOLDS, candidates: Sequence[float] = XI_CANDIDATES,
                        seed: int = 0) -> Dict:
    """IoU accuracy per class and T, for both folds (ξ tuned on the other) and their mean.

    maps: image id -> ``(C, h, w)`` localization maps Ξ. Returns a dict with ``accuracy[class][T]``
    (mean of the two folds), ``folds`` (each fold's table and tuned ξ), ``macro`` (per T, over classes
    with boxes) and ``mean_iou_accuracy`` (over classes and T).
    """
    missing = sorted({r.image_id for r in records if r.image_id not in maps})
    if missing:
        raise ValueError(f"maps are missing for {len(missing)} box images, e.g. {missing[:3]}")
    table = _iou_table(records, maps, candidates)  # (n_records, n_candidates)
    folds = patient_folds(records, seed)
    cls = np.array([r.class_index for r in records])
    T = np.asarray(thresholds)
    fold_results = []
    for held_out in (0, 1):
        acc, xi = {}, {}
        for c in sorted(set(cls.tolist())):
            tune = (cls == c) & (folds != held_out)
            test = (cls == c) & (folds == held_out)
            if not test.any():
                continue
            if tune.any():
                score = (table[tune][:, :, None] > T).mean(axis=(0, 2))  # mean accuracy over T per ξ
                best = int(np.argmax(score))
            else:
                best = len(candidates) // 2
            xi[classes[c]] = float(candidates[best])
            acc[classes[c]] = {f"{t:.1f}": float((table[test, best] > t).mean()) for t in T}
        fold_results.append({"accuracy": acc, "xi": xi})
    accuracy = {}
    for name in sorted({k for f in fold_results for k in f["accuracy"]}, key=list(classes).index):
        per_fold = [f["accuracy"][name] for f in fold_results if name in f["accuracy"]]
        accuracy[name] = {t: float(np.mean([p[t] for p in per_fold])) for t in per_fold[0]}
    macro = {f"{t:.1f}": float(np.mean([a[f"{t:.1f}"] for a in accuracy.values()])) for t in T} if accuracy else {}
    mean_acc = float(np.mean(list(macro.values()))) if macro else float("nan")
    return {"accuracy": accuracy, "macro": macro, "mean_iou_accuracy": mean_acc, "folds": fold_results,
            "num_boxes": len(records), "num_images": len({r.image_id for r in records})}


def random_maps(maps: Dict[str, torch.Tensor], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Uniform random maps of the same shapes: the chance baseline, evaluated the same way."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) for k, v in sorted(maps.items())}


def markdown_report(report: Dict) -> str:
    """Markdown tables of a report made by :func:`evaluate` (classification and localization)."""
    lines = []
    cls = report.get("classification")
    if cls:
        lines += ["## Classification (ROC AUC)", "", "| class | AUC |", "|---|---|"]
        lines += [f"| {c} | {v:.3f} |" for c, v in cls["auc"].items()]
        lines += [f"| **Macro** | **{cls['macro_auc']:.3f}** |", ""]
    for key, title in (("localization", "Localization (IoU accuracy, ξ tuned on the other patient fold)"),
                       ("random_baseline", "Random-map baseline (same protocol)")):
        loc = report.get(key)
        if not loc:
            continue
        ts = list(loc["macro"])
        lines += [f"## {title}", "", "| class | " + " | ".join(f"T={t}" for t in ts) + " |",
                  "|---|" + "---|" * len(ts)]
        lines += [f"| {c} | " + " | ".join(f"{a[t]:.3f}" for t in ts) + " |" for c, a in loc["accuracy"].items()]
        lines += ["| **Macro** | " + " | ".join(f"**{loc['macro'][t]:.3f}**" for t in ts) + " |",
                  "", f"mean IoU accuracy: {loc['mean_iou_accuracy']:.3f} "
                       f"({loc['num_boxes']} boxes on {loc['num_images']} images)", ""]
    return "\n".join(lines)


def write_report(report: Dict, out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown_report(report))
    return out_dir / "report.json", out_dir / "report.md"


@torch.no_grad()
def run_model(model: torch.nn.Module, dataset, batch_size: int = 32, device: Union[str, torch.device] = "cpu",
              num_workers: int = 0, progress: bool = True) -> Dict:
    """Inference over ``dataset``: ``probs`` and ``labels`` (N, C) arrays, ``ids``, localization maps Ξ
    ``{id: (C, h, w)}`` and :class:`BoxRecord` s for the images that have boxes, and their images."""
    from tqdm.auto import tqdm

    from .data import collate, normalize
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    probs, labels, ids, maps, records, images = [], [], [], {}, [], {}
    amp = torch.device(device).type == "cuda"
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        x = normalize(batch["image"].to(device), model.in_chans)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model.forward_outputs(x)
        probs.append(out.logits.float().sigmoid().cpu())
        labels.append(batch["labels"])
        ids += batch["id"]
        size = tuple(batch["image"].shape[-2:])
        for i, boxes in enumerate(batch["boxes"]):
            if len(boxes):
                key = batch["id"][i]
                maps[key] = out.loc_map[i].float().cpu()
                images[key] = batch["image"][i]
                records += [BoxRecord(key, batch["patient"][i], int(b[0]), tuple(b[1:].tolist()), size)
                            for b in boxes]
    model.train(was_training)
    return dict(probs=torch.cat(probs).numpy(), labels=torch.cat(labels).numpy(), ids=ids, maps=maps,
                records=records, images=images)


def evaluate_model(model: torch.nn.Module, dataset, classes: Sequence[str], out_dir: Union[str, Path, None] = None,
                   batch_size: int = 32, device: Union[str, torch.device] = "cpu", num_overlays: int = 8,
                   seed: int = 0, progress: bool = True) -> Dict:
    """Classification and localization report of ``model`` on ``dataset`` with the random-map baseline;
    with ``out_dir``: report.json, report.md and PNG overlays of the first box images."""
    from .viz import overlay, tile
    res = run_model(model, dataset, batch_size, device, progress=progress)
    report = {"classification": classification_report(res["probs"], res["labels"], classes)}
    if res["records"]:
        report["localization"] = localization_report(res["records"], res["maps"], classes, seed=seed)
        report["random_baseline"] = localization_report(res["records"], random_maps(res["maps"], seed), classes,
                                                        seed=seed)
    if out_dir is not None:
        write_report(report, out_dir)
        loc = report.get("localization")
        pictures = []
        for r in res["records"][:num_overlays]:
            name = classes[r.class_index]
            xi = loc["folds"][0]["xi"].get(name, loc["folds"][1]["xi"].get(name, 0.5)) if loc else 0.5
            heat = res["maps"][r.image_id][r.class_index]
            pred = box_from_map(heat, r.image_size, xi)
            pictures.append(overlay(res["images"][r.image_id], heat, [pred] if pred else [], [r.box],
                                    title=f"{name} IoU={iou(pred, r.box):.2f}"))
        if pictures:
            tile(pictures, min(4, len(pictures))).save(Path(out_dir) / "overlays.png")
    return report
