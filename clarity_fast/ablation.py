"""``clarity-fast ablate``: the full CLARiTy and its ablations, trained and evaluated alike, side by side.

Each arm is the demo's configuration (or any base config) with one change; every arm is trained on the same
phantom images with the same budget and scored by the same localization protocol (same ξ tuning, same folds).
The prior-only and random baselines come with the full model's report. Results: ``ablation.json``,
``ablation.md`` (one table) and ``ablation.png`` (IoU accuracy against T, one line per arm, baselines dashed).
"""
from __future__ import annotations

import json
import re
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .errors import InputError
from .evaluation import REPORT_MAPS, format_figure, json_safe
from .files import write_text_atomic
from .training import TrainConfig, load_config

GRADCAM = "1 class token + Grad-CAM"
# (arm, config overrides); the Grad-CAM arm trains a plain ViT of the same size instead (gradcam_baseline.py)
# (in the order they run: what users would otherwise use first, then the components the paper credits)
ARMS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("full", ()),
    (GRADCAM, ()),
    ("no SegmentCAM", ("model_args.segmentcam=false",)),
    ("maps of the last block", ("model_args.num_map_layers=1",)),
    ("no OCT loss", ("loss.lambda_oct=0",)),
    ("oct_mode=cct", ("loss.oct_mode=cct",)),
    ("pool=gap", ("model_args.pool=gap",)),
)


def _slug(arm: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", arm.lower()).strip("-")


def arm_names() -> List[str]:
    return [name for name, _ in ARMS]


def run_ablation(base: TrainConfig, out_dir: Union[str, Path], arms: Optional[Sequence[str]] = None,
                 overwrite: bool = False, progress: bool = True) -> Dict:
    """Train and evaluate each arm of ``arms`` (default: all of :data:`ARMS`, in that order) from ``base``, each
    in ``out_dir/<arm>``; the summary (see :func:`summarise`) is rewritten after each arm and returned."""
    from .experiment import train_and_evaluate
    from .gradcam_baseline import GradCAMViT
    from .pathologies import CLASS_NAMES
    wanted = list(arms) if arms else arm_names()
    unknown = [a for a in wanted if a not in arm_names()]
    if unknown:
        raise InputError(f"unknown ablation arms {unknown}; known: {arm_names()}")
    out_dir = Path(out_dir)
    reports, minutes = {}, {}
    for name, overrides in ARMS:
        if name not in wanted:
            continue
        cfg = load_config(None, list(overrides) + [f"output_dir={out_dir / _slug(name)}"], base=base)
        model = None
        if name == GRADCAM:  # the data sets' classes (NIH's 14, phantom and NIH alike)
            model = GradCAMViT.like(cfg.model_args, CLASS_NAMES, drop_path_rate=cfg.drop_path)
        if progress:
            print(f"ablation arm '{name}': {' '.join(overrides) or 'as configured'}", flush=True)
        t0 = time.perf_counter()
        reports[name] = train_and_evaluate(cfg, overwrite=overwrite, progress=progress, model=model)
        minutes[name] = (time.perf_counter() - t0) / 60
        summary = summarise(reports, minutes)
        write_summary(summary, out_dir)  # after every arm: a long run stopped early keeps what it measured
    return summary


def summarise(reports: Dict[str, Dict], minutes: Dict[str, float]) -> Dict:
    """One row per arm (and per baseline, from the first arm's report): macro IoU accuracy per T, its mean,
    macro AUC, minutes; per class, IoU accuracy at T = 0.3 and the mean area of the boxes scored against truth."""
    rows, per_class = {}, {}
    for name, report in reports.items():
        loc = report.get("localization")
        if not loc:
            raise InputError(f"arm '{name}' has no localization report (no box images in the test set)")
        rows[name] = dict(macro=loc["macro"], mean=loc["mean_iou_accuracy"], pointing=loc.get("pointing_macro"),
                          auc=report["classification"]["macro_auc"], minutes=minutes.get(name), baseline=False)
        per_class[name] = {c: dict(at_0_3=a.get("0.3"), area_ratio=_ratio(loc["box_area"][c]))
                           for c, a in loc["accuracy"].items()}
    first = next(iter(reports.values()))
    for key, _, label in REPORT_MAPS[1:]:  # the baselines
        base = first.get(key)
        if base:
            label = f"{label} (σ={base['sigma']:g})" if "sigma" in base else label
            rows[label] = dict(macro=base["macro"], mean=base["mean_iou_accuracy"],
                               pointing=base.get("pointing_macro"), auc=None, minutes=None, baseline=True)
            per_class[label] = {c: dict(at_0_3=a.get("0.3"), area_ratio=_ratio(base["box_area"][c]))
                                for c, a in base["accuracy"].items()}
    return dict(rows=rows, per_class=per_class)


def _ratio(area: Dict) -> Optional[float]:
    return area["predicted"] / area["truth"] if area["truth"] > 0 else None


_cell = partial(format_figure, missing="–")  # a table cell: "–" where there is no figure


def markdown(summary: Dict) -> str:
    """The ablation as Markdown: the macro table (with the pointing game: peak in box), then IoU accuracy at
    T = 0.3 per class and arm."""
    rows = summary["rows"]
    ts = list(next(iter(rows.values()))["macro"])
    lines = ["| arm | " + " | ".join(f"T={t}" for t in ts) + " | mean | peak in box | macro AUC | minutes |",
             "|---|" + "---|" * (len(ts) + 4)]
    for name, r in rows.items():
        label = f"*{name}*" if r["baseline"] else name
        minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else "–"
        lines.append(f"| {label} | " + " | ".join(_cell(r["macro"].get(t)) for t in ts)
                     + f" | **{_cell(r['mean'])}** | {_cell(r.get('pointing'))} | {_cell(r['auc'])} | {minutes} |")
    arms = list(summary["per_class"])
    classes = list(next(iter(summary["per_class"].values())))
    lines += ["", "IoU accuracy at T = 0.3 per class (box area of the scored boxes / ground truth in brackets):", "",
              "| class | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for c in classes:
        cells = []
        for a in arms:
            v = summary["per_class"][a].get(c, {})
            cells.append(f"{_cell(v.get('at_0_3'))} ({_cell(v.get('area_ratio'))}×)" if v else "–")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: Dict, out_dir: Union[str, Path]) -> None:
    """``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``out_dir``."""
    from .viz import line_plot
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "ablation.json", json.dumps(json_safe(summary), indent=2, allow_nan=False))
    write_text_atomic(out_dir / "ablation.md", markdown(summary))
    series = [dict(name=name.replace("σ", "sigma "), x=[float(t) for t in r["macro"]], y=list(r["macro"].values()),
                   dashed=r["baseline"]) for name, r in summary["rows"].items()]  # PIL's default font has no σ
    line_plot(series, out_dir / "ablation.png", "IoU accuracy against T (macro over classes; same protocol)",
              "IoU threshold T", "IoU accuracy", ylim=(0.0, 1.0))
