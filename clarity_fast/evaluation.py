"""Evaluation (SPEC §6): per-class / macro ROC AUC and IoU accuracy of boxes drawn from maps.

Boxes come from Ξ by the one protocol of :mod:`clarity_fast.boxes` (upsample, min-max normalise,
threshold at ξ(c), largest connected component). ξ(c) is tuned per class on
one half of the box images (split by patient) and reported on the other half, and the reverse.
The tuning criterion is the mean IoU accuracy over T = 0.1 … 0.7 by default, or the accuracy at
one T (``tune_at``); every report states which. Ties (all candidates at 0 when no tuning box passes) go
to the candidate with the highest mean IoU on the tuning fold, not to an arbitrary end of the ξ range.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import rankdata

from .boxes import Box, box_from_map, iou, largest_component_box, normalised_upsample, peak_in_box
from .errors import InputError
from .files import write_text_atomic
from .progress import progress as progress_bar

IOU_THRESHOLDS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
XI_CANDIDATES: Tuple[float, ...] = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties get half credit); NaN if one class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Dict:
    """Per-class AUC and Macro AUC of ``(N, C)`` arrays. A class without both outcomes has AUC NaN
    (``null`` in JSON) and is left out of the macro mean; ``macro_auc_classes`` counts the classes averaged."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.shape != labels.shape or probs.ndim != 2 or probs.shape[1] != len(classes):
        raise InputError(f"probs and labels must both be (N, {len(classes)}), got {probs.shape} and {labels.shape}")
    per_class = {c: roc_auc(probs[:, i], labels[:, i]) for i, c in enumerate(classes)}
    valid = [v for v in per_class.values() if not math.isnan(v)]
    return {"auc": per_class, "macro_auc": float(np.mean(valid)) if valid else float("nan"),
            "macro_auc_classes": len(valid), "num_classes": len(classes)}


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


def _iou_table(records: Sequence[BoxRecord], loc_maps: Dict[str, torch.Tensor],
               candidates: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """IoU of every record's box with the box drawn at every candidate ξ, and that box's area in pixels (0 for
    no box), both ``(n_records, n_candidates)``; each (image, class) map is upsampled and normalised once."""
    table = np.zeros((len(records), len(candidates)))
    areas = np.zeros((len(records), len(candidates)))
    groups: Dict[Tuple, list] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.image_id, r.class_index, tuple(r.image_size)), []).append(i)
    for (image_id, c, size), rows in groups.items():
        m = normalised_upsample(loc_maps[image_id][c], size)
        if m is None:
            continue
        for j, xi in enumerate(candidates):
            box = largest_component_box(m >= xi)
            for i in rows:
                table[i, j] = iou(box, records[i].box)
                areas[i, j] = box[2] * box[3] if box is not None else 0.0
    return table, areas


def best_candidate(score: np.ndarray, mean_iou: np.ndarray) -> int:
    """Index of the ξ candidate with the best tuning ``score``; among tied candidates (e.g. all at 0 when no box
    of the tuning fold passes), the one with the highest mean IoU on the tuning fold, then the smallest ξ.
    Both arrays are ``(n_candidates,)``."""
    tied = np.flatnonzero(score >= score.max() - 1e-12)
    return int(tied[np.argmax(mean_iou[tied])])


def xi_criterion(tune_at: Optional[float]) -> str:
    """The ξ tuning criterion in words, as reports state it."""
    ties = ", ties to the highest mean IoU"
    if tune_at is None:
        return "mean IoU accuracy over T = " + ", ".join(f"{t:.1f}" for t in IOU_THRESHOLDS) + ties
    return f"IoU accuracy at T = {tune_at:.1f}{ties}"


def localization_report(records: Sequence[BoxRecord], loc_maps: Dict[str, torch.Tensor], classes: Sequence[str],
                        thresholds: Sequence[float] = IOU_THRESHOLDS, candidates: Sequence[float] = XI_CANDIDATES,
                        seed: int = 0, tune_at: Optional[float] = None) -> Dict:
    """IoU accuracy per class and T, for both folds (ξ tuned on the other) and their mean.

    loc_maps: image id -> ``(C, h, w)`` localization maps Ξ. ``tune_at``: None tunes ξ for the mean
    accuracy over ``thresholds``, a number for the accuracy at that T. Returns a dict with
    ``accuracy[class][T]`` (mean of the two folds), ``folds`` (each fold's accuracy, macro and tuned ξ),
    ``macro`` (per T, over classes with boxes), ``mean_iou_accuracy`` (over classes and T),
    ``box_area[class]`` (mean area in pixels of the boxes scored, 0 for a flat map, and of the ground truth),
    ``pointing[class]`` and ``pointing_macro`` (the pointing game, no ξ involved: the fraction of boxes whose
    map peaks in a grid cell that overlaps the box, see :func:`~clarity_fast.boxes.peak_in_box`) and
    ``xi_criterion``.
    """
    missing = sorted({r.image_id for r in records if r.image_id not in loc_maps})
    if missing:
        raise InputError(f"localization maps Ξ are missing for {len(missing)} box images, e.g. {missing[:3]}")
    if tune_at is not None and not any(abs(tune_at - t) < 1e-9 for t in thresholds):
        raise InputError(f"tune_at must be one of the thresholds {tuple(thresholds)} or None, got {tune_at}")
    table, areas = _iou_table(records, loc_maps, candidates)  # (n_records, n_candidates) each
    scored_area = np.zeros(len(records))  # area of the box each record is scored with
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
                hits = table[tune][:, :, None] > T  # (records, ξ, T)
                score = hits.mean(axis=(0, 2)) if tune_at is None else hits[:, :, int(np.argmin(abs(T - tune_at)))].mean(0)
                best = best_candidate(score, table[tune].mean(0))
            else:
                best = len(candidates) // 2
            xi[classes[c]] = float(candidates[best])
            scored_area[test] = areas[test, best]
            acc[classes[c]] = {f"{t:.1f}": float((table[test, best] > t).mean()) for t in T}
        fold_macro = {f"{t:.1f}": float(np.mean([a[f"{t:.1f}"] for a in acc.values()])) for t in T} if acc else {}
        fold_results.append({"accuracy": acc, "xi": xi, "macro": fold_macro,
                             "num_boxes": int((folds == held_out).sum())})
    accuracy = {}
    for name in sorted({k for f in fold_results for k in f["accuracy"]}, key=list(classes).index):
        per_fold = [f["accuracy"][name] for f in fold_results if name in f["accuracy"]]
        accuracy[name] = {t: float(np.mean([p[t] for p in per_fold])) for t in per_fold[0]}
    macro = {f"{t:.1f}": float(np.mean([a[f"{t:.1f}"] for a in accuracy.values()])) for t in T} if accuracy else {}
    mean_acc = float(np.mean(list(macro.values()))) if macro else float("nan")
    truth_area = np.array([r.box[2] * r.box[3] for r in records])
    box_area = {name: {"predicted": float(scored_area[cls == classes.index(name)].mean()),
                       "truth": float(truth_area[cls == classes.index(name)].mean())} for name in accuracy}
    hits = np.array([peak_in_box(loc_maps[r.image_id][r.class_index], r.image_size, r.box) for r in records])
    pointing = {name: float(hits[cls == classes.index(name)].mean()) for name in accuracy}
    return {"accuracy": accuracy, "macro": macro, "mean_iou_accuracy": mean_acc, "folds": fold_results,
            "box_area": box_area, "pointing": pointing,
            "pointing_macro": float(np.mean(list(pointing.values()))) if pointing else float("nan"),
            "xi_criterion": xi_criterion(tune_at), "num_boxes": len(records),
            "num_images": len({r.image_id for r in records})}


def out_of_fold_xi(report: Dict, records: Sequence[BoxRecord], classes: Sequence[str], seed: int = 0) -> List[float]:
    """The ξ each record is scored with in ``report``: the one tuned on the other patient fold."""
    folds = patient_folds(records, seed)
    return [report["folds"][f]["xi"][classes[r.class_index]] for r, f in zip(records, folds)]


def random_maps(loc_maps: Dict[str, torch.Tensor], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Uniform random maps of the same shapes: the chance baseline, evaluated the same way."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) for k, v in sorted(loc_maps.items())}


PRIOR_SIGMAS: Tuple[float, ...] = (0.0, 1.0, 2.0)


def prior_maps(priors: Dict[str, torch.Tensor], sigma: float) -> Dict[str, torch.Tensor]:
    """Each image's anatomical prior of each class ``(C, h, w)`` as a map, Gaussian-blurred by ``sigma`` grid
    cells (0: the bare mask): the baseline that knows where a finding may be, and nothing about the lesion."""
    return {k: torch.from_numpy(ndimage.gaussian_filter(v.float().numpy(), sigma=(0, sigma, sigma)))
            for k, v in sorted(priors.items())}


def prior_baseline(records: Sequence[BoxRecord], priors: Dict[str, torch.Tensor], classes: Sequence[str],
                   seed: int = 0, tune_at: Optional[float] = None, sigmas: Sequence[float] = PRIOR_SIGMAS) -> Dict:
    """:func:`localization_report` of :func:`prior_maps` at its best blur (highest mean IoU accuracy over the
    ``sigmas``, chosen on these records: the strongest prior-only baseline), with ``sigma`` and
    ``mean_by_sigma``."""
    reports = {s: localization_report(records, prior_maps(priors, s), classes, seed=seed, tune_at=tune_at)
               for s in sigmas}
    best = max(sigmas, key=lambda s: reports[s]["mean_iou_accuracy"])
    return dict(reports[best], sigma=best, mean_by_sigma={f"{s:g}": reports[s]["mean_iou_accuracy"] for s in sigmas})


def box_maps(records: Sequence[BoxRecord], grid: Tuple[int, int], num_classes: int) -> Dict[str, torch.Tensor]:
    """Each box image's ground-truth boxes as maps ``{id: (num_classes, h, w)}`` float32 on a ``grid = (h, w)``:
    the fraction of each cell that a box of the class covers (the largest, where a class has several). Scored like
    Ξ, they are the ceiling of the protocol at this grid: what a map that is the ground truth itself reaches."""
    h, w = grid
    maps: Dict[str, torch.Tensor] = {}
    for r in records:
        cell_h, cell_w = r.image_size[0] / h, r.image_size[1] / w  # in pixels
        x, y, bw, bh = r.box
        cx, cy = np.arange(w) * cell_w, np.arange(h) * cell_h  # cells' left and top edges
        along_x = np.clip(np.minimum(cx + cell_w, x + bw) - np.maximum(cx, x), 0, None)
        along_y = np.clip(np.minimum(cy + cell_h, y + bh) - np.maximum(cy, y), 0, None)
        cover = torch.from_numpy(np.outer(along_y / cell_h, along_x / cell_w).astype(np.float32))
        m = maps.setdefault(r.image_id, torch.zeros(num_classes, h, w))
        m[r.class_index] = torch.maximum(m[r.class_index], cover)
    return maps


def format_figure(v: Optional[float], missing: str = "n/a") -> str:
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _accuracy_table(accuracy: Dict, macro: Dict, xi: Optional[Dict] = None) -> List[str]:
    ts = list(macro)
    head = "| class | " + " | ".join(f"T={t}" for t in ts) + (" | ξ |" if xi is not None else " |")
    lines = [head, "|---|" + "---|" * (len(ts) + (xi is not None))]
    for c, a in accuracy.items():
        tail = f" | {xi[c]:.2f} |" if xi is not None else " |"
        lines.append(f"| {c} | " + " | ".join(f"{a[t]:.3f}" for t in ts) + tail)
    lines.append("| **Macro** | " + " | ".join(f"**{macro[t]:.3f}**" for t in ts) + (" | |" if xi is not None else " |"))
    return lines


# the maps a report scores: report key, short name for tables, name for plots (PIL's default font has no Ξ)
REPORT_MAPS = (("localization", "Ξ", "CLARiTy maps Xi"), ("prior_baseline", "prior", "prior-only maps"),
               ("random_baseline", "random", "random maps"),
               ("grid_ceiling", "ceiling", "truth boxes on the grid (ceiling)"))


def _side_by_side(report: Dict, t: str = "0.3") -> List[str]:
    """Per class: IoU accuracy at T = ``t``, the mean over T and the pointing game, of Ξ and of each baseline in the
    report, and the mean area of the boxes scored from Ξ against the ground truth's."""
    arms = [(key, name) for key, name, _ in REPORT_MAPS if report.get(key)]
    loc = report["localization"]
    head = ("| class | " + " | ".join(f"{n} T={t}" for _, n in arms) + " | " + " | ".join(f"{n} mean" for _, n in arms)
            + " | " + " | ".join(f"{n} peak in box" for _, n in arms) + " | "
            + " | ".join(f"{n} box area / truth" for _, n in arms) + " |")
    lines = ["## Localization side by side (same protocol, same folds)", "",
             "Peak in box: the pointing game, the fraction of boxes whose map peaks in a grid cell overlapping the "
             "box (no ξ involved). Box area / truth: the mean area of the boxes scored against the ground truth's.",
             "", head, "|---|" + "---|" * (4 * len(arms))]
    for c in loc["accuracy"]:
        at_t = [report[k]["accuracy"].get(c, {}).get(t, float("nan")) for k, _ in arms]
        means = [float(np.mean(list(report[k]["accuracy"][c].values()))) if c in report[k]["accuracy"]
                 else float("nan") for k, _ in arms]
        pointing = [report[k].get("pointing", {}).get(c, float("nan")) for k, _ in arms]
        areas = [report[k].get("box_area", {}).get(c) for k, _ in arms]
        ratios = [a["predicted"] / a["truth"] if a and a["truth"] > 0 else float("nan") for a in areas]
        lines.append(f"| {c} | " + " | ".join(format_figure(v) for v in at_t + means + pointing + ratios) + " |")
    lines.append("| **Macro** | " + " | ".join(f"**{format_figure(report[k]['macro'].get(t))}**" for k, _ in arms)
                 + " | " + " | ".join(f"**{format_figure(report[k]['mean_iou_accuracy'])}**" for k, _ in arms)
                 + " | " + " | ".join(f"**{format_figure(report[k].get('pointing_macro'))}**" for k, _ in arms)
                 + " |" * (len(arms) + 1))
    return lines + [""]


def markdown_report(report: Dict) -> str:
    """Markdown tables of a report made by :func:`evaluate_model`: classification, then each
    localization report with both patient folds (their accuracy and tuned ξ) and their mean."""
    lines = []
    env = report.get("environment")
    if env:
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    cls = report.get("classification")
    if cls:
        lines += ["## Classification (ROC AUC)", "", "| class | AUC |", "|---|---|"]
        lines += [f"| {c} | {format_figure(v)} |" for c, v in cls["auc"].items()]
        n, total = cls.get("macro_auc_classes", len(cls["auc"])), cls.get("num_classes", len(cls["auc"]))
        lines += [f"| **Macro ({n} of {total} classes)** | **{format_figure(cls['macro_auc'])}** |", ""]
    if report.get("localization"):
        lines += _side_by_side(report)
    for key, title in (("localization", "Localization (IoU accuracy of boxes from Ξ)"),
                       ("prior_baseline", "Prior-only baseline (same protocol)"),
                       ("random_baseline", "Random-map baseline (same protocol)"),
                       ("grid_ceiling", "Ceiling: the ground-truth boxes on the grid (same protocol)")):
        loc = report.get(key)
        if not loc:
            continue
        if key == "prior_baseline":
            lines += [f"Each image's anatomical prior of the class as the map, Gaussian blur σ = {loc['sigma']:g} "
                      f"grid cells: the best mean IoU accuracy of σ in "
                      + ", ".join(f"{k} ({v:.3f})" for k, v in loc["mean_by_sigma"].items()) + ".", ""]
        if key == "grid_ceiling":
            lines += ["Each image's ground-truth boxes of the class as the map, the fraction of each grid cell they "
                      "cover: what a map that is the truth itself scores at this grid.", ""]
        lines += [f"## {title}", "", f"ξ(c) tuned on one patient fold for the {loc['xi_criterion']}, "
                  f"scored on the other. Mean of the two folds:", ""]
        lines += _accuracy_table(loc["accuracy"], loc["macro"])
        lines += ["", f"mean IoU accuracy: {loc['mean_iou_accuracy']:.3f} "
                      f"({loc['num_boxes']} boxes on {loc['num_images']} images)", ""]
        for f, fold in enumerate(loc["folds"]):
            lines += [f"### {title.split(' (')[0]}, fold {f} scored ({fold['num_boxes']} boxes; ξ tuned on the "
                      f"other fold)", ""]
            lines += _accuracy_table(fold["accuracy"], fold["macro"], fold["xi"]) + [""]
    return "\n".join(lines)


def json_safe(value):
    """NaN and inf as JSON ``null`` (json.dumps would write the invalid token NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: Dict, out_dir: Union[str, Path], stem: str = "report") -> Tuple[Path, Path]:
    """Write ``<stem>.json`` (NaN as null) and ``<stem>.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(json_safe(report), indent=2, allow_nan=False))
    write_text_atomic(md_path, markdown_report(report))
    return json_path, md_path


def check_classes(model: torch.nn.Module, dataset) -> Tuple[str, ...]:
    """The model's class names, after checking that ``dataset`` (if it names its classes) uses the same ones."""
    classes = tuple(model.class_names)
    theirs = getattr(dataset, "classes", None)
    if theirs is not None and tuple(theirs) != classes:
        raise InputError(f"the data set's classes {list(theirs)} are not the model's class_names {list(classes)}")
    return classes


@torch.no_grad()
def run_model(model: torch.nn.Module, dataset, batch_size: int = 32, device: Union[str, torch.device] = "cpu",
              num_workers: int = 0, progress: bool = True, with_patch_tokens: bool = False) -> Dict:
    """Inference over ``dataset``: ``probs`` and ``labels`` (N, C) arrays, ``ids``, localization maps Ξ
    ``loc_maps`` and anatomical priors ``priors`` (bool), both ``{id: (C, h, w)}``, :class:`BoxRecord` s and
    ``images``, for the images that have boxes; ``with_patch_tokens``: also their last block's patch tokens
    before the final norm, ``patch_tokens`` ``{id: (h * w, D)}`` float32, from the same forward pass."""
    from .data import collate, normalize
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate)
    probs, labels, ids, loc_maps, priors, records, images, tokens = [], [], [], {}, {}, [], {}, {}
    amp = torch.device(device).type == "cuda"
    last_block: List[torch.Tensor] = []  # the last block's output tokens (B, C + P, D) of the current batch
    hook = (model.blocks[-1].register_forward_hook(lambda _module, _args, out: last_block.append(out[0]))
            if with_patch_tokens else None)
    try:
        for batch in progress_bar(loader, desc="evaluating", enabled=progress, leave=False):
            x = normalize(batch["image"].to(device), model.in_chans)
            last_block.clear()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model.forward_outputs(x)
            probs.append(out.logits.float().sigmoid().cpu())
            labels.append(batch["labels"])
            ids += batch["id"]
            size = tuple(batch["image"].shape[-2:])
            for i, boxes in enumerate(batch["boxes"]):
                if len(boxes):
                    key = batch["id"][i]
                    loc_maps[key] = out.loc_map[i].float().cpu()
                    if "masks" in batch:
                        priors[key] = batch["masks"][i].bool().cpu()
                    images[key] = batch["image"][i]
                    if with_patch_tokens:
                        tokens[key] = last_block[0][i, model.num_classes:].float().cpu()
                    records += [BoxRecord(key, batch["patient"][i], int(b[0]), tuple(b[1:].tolist()), size)
                                for b in boxes]
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    res = dict(probs=torch.cat(probs).numpy(), labels=torch.cat(labels).numpy(), ids=ids, loc_maps=loc_maps,
               priors=priors, records=records, images=images)
    if with_patch_tokens:
        res["patch_tokens"] = tokens
    return res


def evaluate_model(model: torch.nn.Module, dataset, out_dir: Union[str, Path, None] = None,
                   batch_size: int = 32, device: Union[str, torch.device] = "cpu", num_overlays: int = 8,
                   seed: int = 0, progress: bool = True, tune_at: Optional[float] = None,
                   stem: str = "report") -> Dict:
    """Classification and localization report of ``model`` on ``dataset`` with the random-map baseline,
    the ceiling of the ground-truth boxes on the grid (:func:`box_maps`) and,
    where the data set has anatomical priors, the prior-only baseline,
    per class of ``model.class_names`` (the data set's ``classes``, where it has them, must be the same);
    with ``out_dir``: ``<stem>.json``, ``<stem>.md`` and PNG overlays of the first box images, each box
    drawn with the ξ the report scored it with (tuned on the other patient fold)."""
    from .viz import overlay, tile
    classes = check_classes(model, dataset)
    res = run_model(model, dataset, batch_size, device, progress=progress)
    report = {"classification": classification_report(res["probs"], res["labels"], classes)}
    if res["records"]:
        report["localization"] = localization_report(res["records"], res["loc_maps"], classes, seed=seed,
                                                     tune_at=tune_at)
        report["random_baseline"] = localization_report(res["records"], random_maps(res["loc_maps"], seed), classes,
                                                        seed=seed, tune_at=tune_at)
        if any(p.any() for p in res["priors"].values()):  # a data set with anatomical priors
            report["prior_baseline"] = prior_baseline(res["records"], res["priors"], classes, seed=seed,
                                                      tune_at=tune_at)
        grid = tuple(next(iter(res["loc_maps"].values())).shape[-2:])
        report["grid_ceiling"] = localization_report(res["records"], box_maps(res["records"], grid, len(classes)),
                                                     classes, seed=seed, tune_at=tune_at)
    if out_dir is not None:
        write_report(report, out_dir, stem)
        records = res["records"][:num_overlays]
        xis = out_of_fold_xi(report["localization"], res["records"], classes, seed)[:num_overlays] if records else []
        pictures = []
        for r, xi in zip(records, xis):
            loc_map = res["loc_maps"][r.image_id][r.class_index]
            pred = box_from_map(loc_map, r.image_size, xi)
            pictures.append(overlay(res["images"][r.image_id], loc_map, [pred] if pred else [], [r.box],
                                    title=f"{classes[r.class_index]} ξ={xi:.2f} IoU={iou(pred, r.box):.2f}"))
        if pictures:
            tile(pictures, min(4, len(pictures))).save(Path(out_dir) / ("overlays.png" if stem == "report"
                                                                        else f"{stem}_overlays.png"))
        if "localization" in report:
            write_plots(report, out_dir, stem)
    return report


def write_plots(report: Dict, out_dir: Union[str, Path], stem: str = "report") -> List[Path]:
    """``<stem>_iou.png``: macro IoU accuracy against T for Ξ (written Xi: PIL's default font has no Ξ) and each
    baseline (dashed); ``<stem>_classes.png``: per-class IoU accuracy at T = 0.3 (Ξ beside the baselines) and
    classification AUC."""
    from .viz import bar_chart, line_plot
    arms = [(key, name) for key, _, name in REPORT_MAPS if report.get(key)]
    series = [dict(name=name, x=[float(t) for t in report[key]["macro"]], y=list(report[key]["macro"].values()),
                   dashed=key != "localization") for key, name in arms]
    out_dir = Path(out_dir)
    iou_png = line_plot(series, out_dir / f"{stem}_iou.png", "IoU accuracy against T (macro over classes)",
                        "IoU threshold T", "IoU accuracy", ylim=(0.0, 1.0))
    classes = list(report["localization"]["accuracy"])
    bars = [dict(name=f"{name} T=0.3", values=[report[key]["accuracy"].get(c, {}).get("0.3", float("nan"))
                                                for c in classes]) for key, name in arms]
    auc = report["classification"]["auc"]
    bars.append(dict(name="classification AUC", values=[auc.get(c, float("nan")) for c in classes]))
    classes_png = bar_chart(classes, bars, out_dir / f"{stem}_classes.png",
                            "Per class: IoU accuracy at T = 0.3 (Xi and baselines) and classification AUC", "")
    return [iou_png, classes_png]
