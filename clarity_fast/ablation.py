"""``clarity-fast ablate``: the full CLARiTy and its ablations, trained and evaluated alike, side by side.

Each arm is the demo's configuration (or any base config) with one change; every arm is trained on the same
phantom images with the same budget and scored by the same localization protocol (same ξ tuning, same folds).
The prior-only and random baselines, and the ceiling of the ground-truth boxes on the grid, come with the full
model's report. Results: ``ablation.json``,
``ablation.md`` (one table) and ``ablation.png`` (IoU accuracy against T, one line per arm, baselines dashed),
and ``ablation_auc_pointing.png``: per class and seed, the class's AUC against how often its map peaks in the box
(does a map find the lesion where the class token learned the class?). With ``--readout``, each CLARiTy arm's run
also gets the token readout of :mod:`clarity_fast.readout`, and the table where the maps miss against where the
tokens could point.
"""
from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputError
from .evaluation import REPORT_MAPS, format_figure, json_safe, write_report
from .files import write_text_atomic
from .pathologies import SMALL_LESIONS
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
                 seeds: Optional[Sequence[int]] = None, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, with_readout: bool = False) -> Dict:
    """Train and evaluate each arm of ``arms`` (default: all of :data:`ARMS`, in that order) from ``base``, once
    per seed of ``seeds`` (default: ``base.seed``; the seed draws the phantoms, train and test, and the
    initialisation), each in ``out_dir/<arm>/seed-<k>``; the summary (see :func:`summarise`) is rewritten after
    each run and returned. ``resume``: continue the arms' interrupted runs and re-score finished ones with the
    current protocol (their training minutes kept); ``overwrite``: start them over. ``with_readout``: also the
    token readout of each CLARiTy arm's run (not the Grad-CAM arm's, a plain ViT), summarised by
    :func:`readout_summary`."""
    from .experiment import train_and_evaluate
    from .gradcam_baseline import GradCAMViT
    from .pathologies import CLASS_NAMES
    wanted = list(arms) if arms else arm_names()
    unknown = [a for a in wanted if a not in arm_names()]
    if unknown:
        raise InputError(f"unknown ablation arms {unknown}; known: {arm_names()}")
    if resume and overwrite:
        raise InputError("resume and overwrite contradict each other: pick one")
    seeds = list(seeds) if seeds else [base.seed]
    if len(set(seeds)) != len(seeds) or not all(isinstance(k, int) and k >= 0 for k in seeds):
        raise InputError(f"seeds must be distinct integers >= 0, got {seeds}")
    out_dir = Path(out_dir)
    reports: Dict[str, Dict[int, Dict]] = {}
    for name, overrides in ARMS:
        if name not in wanted:
            continue
        for seed in seeds:
            run_dir = out_dir / _slug(name) / f"seed-{seed}"
            cfg = load_config(None, list(overrides) + [f"seed={seed}", f"output_dir={run_dir}"], base=base)
            model = None
            if name == GRADCAM:  # the data sets' classes (NIH's 14, phantom and NIH alike)
                model = GradCAMViT.like(cfg.model_args, CLASS_NAMES, drop_path_rate=cfg.drop_path)
            if progress:
                print(f"ablation arm '{name}', seed {seed}: {' '.join(overrides) or 'as configured'}", flush=True)
            previous = run_dir / "eval" / "report.json"
            trained = json.loads(previous.read_text()).get("train_minutes") if resume and previous.is_file() else None
            report = train_and_evaluate(cfg, resume=resume and run_dir.is_dir(), overwrite=overwrite,
                                        progress=progress, model=model, with_readout=with_readout and model is None)
            if trained is not None:  # a finished run, re-scored: its training time is the first one's
                report["train_minutes"] = trained
                write_report(report, run_dir / "eval")
            reports.setdefault(name, {})[seed] = report
            summary = summarise(reports)
            write_summary(summary, out_dir)  # after every run: a long ablation stopped early keeps what it measured
    return summary


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean of the figures that exist (None when none does)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(present) / len(present)) if present else None


def _row(locs: Sequence[Dict], aucs: Sequence[Optional[float]], minutes: Sequence[Optional[float]], seeds,
         baseline: bool) -> Dict:
    """One table row: figures averaged over the seeds' reports ``locs``, and each seed's T = 0.3 and mean."""
    return dict(macro={t: _mean([loc["macro"].get(t) for loc in locs]) for t in locs[0]["macro"]},
                mean=_mean([loc["mean_iou_accuracy"] for loc in locs]),
                pointing=_mean([loc.get("pointing_macro") for loc in locs]), auc=_mean(aucs),
                minutes=_mean(minutes), baseline=baseline,
                per_seed={str(k): dict(at_0_3=loc["macro"].get("0.3"), mean=loc["mean_iou_accuracy"])
                          for k, loc in zip(seeds, locs)})


def _per_class(locs: Sequence[Dict]) -> Dict:
    """Per class, over the seeds: IoU accuracy at T = 0.3 and the ratio of the mean box areas (scored / truth)."""
    names = [c for c in locs[0]["accuracy"]]
    return {c: dict(at_0_3=_mean([loc["accuracy"].get(c, {}).get("0.3") for loc in locs]),
                    area_ratio=_ratio({k: _mean([loc["box_area"][c][k] for loc in locs if c in loc["box_area"]])
                                       for k in ("predicted", "truth")}))
            for c in names}


def summarise(reports: Dict[str, Dict[int, Dict]]) -> Dict:
    """``reports[arm][seed]`` -> one row per arm (and per baseline, from the first arm's reports), averaged over
    the seeds: macro IoU accuracy per T, its mean, the pointing game, macro AUC, training minutes, and each
    seed's T = 0.3 and mean; per class, IoU accuracy at T = 0.3 and the box area scored against truth; per arm,
    seed and class, AUC and peak in box (``classes``) and how they go together (``auc_and_pointing``); per arm
    whose reports carry a token readout, :func:`readout_summary` (``readout``)."""
    rows, per_class, classes = {}, {}, {}
    for name, by_seed in reports.items():
        seeds = list(by_seed)
        missing = [k for k, r in by_seed.items() if not r.get("localization")]
        if missing:
            raise InputError(f"arm '{name}' has no localization report for seeds {missing} "
                             f"(no box images in the test set)")
        locs = [r["localization"] for r in by_seed.values()]
        rows[name] = _row(locs, [r["classification"]["macro_auc"] for r in by_seed.values()],
                          [r.get("train_minutes") for r in by_seed.values()], seeds, baseline=False)
        per_class[name] = _per_class(locs)
        classes[name] = {str(k): _class_points(r) for k, r in by_seed.items()}
    first = next(iter(reports.values()))
    for key, _, label in REPORT_MAPS[1:]:  # the baselines and the ceiling
        bases = [r[key] for r in first.values() if r.get(key)]
        if bases:
            sigmas = sorted({f"{b['sigma']:g}" for b in bases if "sigma" in b})
            label = f"{label} (σ={'/'.join(sigmas)})" if sigmas else label
            rows[label] = _row(bases, [None] * len(bases), [None] * len(bases), list(first), baseline=True)
            per_class[label] = _per_class(bases)
    readout = {name: readout_summary({k: r["readout"] for k, r in by_seed.items()})
               for name, by_seed in reports.items() if all("readout" in r for r in by_seed.values())}
    return dict(rows=rows, per_class=per_class, classes=classes, auc_and_pointing=auc_and_pointing(classes),
                readout=readout, seeds=[str(k) for k in first])


def _class_points(report: Dict) -> Dict[str, Dict]:
    """Per class with boxes in one run's report: its AUC, peak in box, IoU accuracy at T = 0.3 and box area ratio."""
    loc, auc = report["localization"], report["classification"]["auc"]
    return {c: dict(auc=auc.get(c), pointing=loc["pointing"][c], at_0_3=loc["accuracy"][c]["0.3"],
                    area_ratio=_ratio(loc["box_area"][c])) for c in loc["pointing"]}


def _has_auc(point: Dict) -> bool:
    return point["auc"] is not None and not math.isnan(point["auc"])


AUC_BANDS = (0.9, 0.75, 0.0)  # lower edges of the bands of class AUC: >= 0.9, 0.75 to 0.9, below 0.75
FOUND = 0.5  # a class's map "finds" its lesions when it peaks in the box on at least this fraction of them


def auc_and_pointing(classes: Dict[str, Dict[str, Dict]]) -> Dict[str, Dict]:
    """``classes[arm][seed][class]`` (see :func:`_class_points`) -> per arm, over its (seed, class) pairs with an
    AUC: Spearman's ρ between class AUC and peak in box; per band of :data:`AUC_BANDS` the number of pairs and
    their mean peak in box; and for :data:`SMALL_LESIONS`, the number of pairs and their median box area ratio
    (scored / truth) where the map finds the lesions (peak in box ≥ :data:`FOUND`) and where it does not, and
    per seed the mean of their box area ratios (``small_area_by_seed``)."""
    from scipy.stats import spearmanr
    out = {}
    for arm, by_seed in classes.items():
        points = [(c, p) for per_class in by_seed.values() for c, p in per_class.items() if _has_auc(p)]
        auc = [p["auc"] for _, p in points]
        pointing = [p["pointing"] for _, p in points]
        in_band = [next(i for i, low in enumerate(AUC_BANDS) if x >= low) for x in auc]
        bands = [dict(low=low, count=in_band.count(i), pointing=_mean([y for b, y in zip(in_band, pointing) if b == i]))
                 for i, low in enumerate(AUC_BANDS)]
        small = [p for c, p in points if c in SMALL_LESIONS and p["area_ratio"] is not None]
        found = [p["area_ratio"] for p in small if p["pointing"] >= FOUND]
        missed = [p["area_ratio"] for p in small if p["pointing"] < FOUND]
        out[arm] = dict(count=len(points), bands=bands,
                        spearman=float(spearmanr(auc, pointing)[0]) if len(points) > 2 else float("nan"),
                        small_found=dict(count=len(found), area_ratio=float(np.median(found)) if found else None),
                        small_missed=dict(count=len(missed), area_ratio=float(np.median(missed)) if missed else None),
                        small_area_by_seed={seed: _mean([p["area_ratio"] for c, p in per_class.items()
                                                         if c in SMALL_LESIONS and _has_auc(p)])
                                            for seed, per_class in by_seed.items()})
    return out


READOUT_MARGIN = 0.1  # the readout "beats" position only where it points in the box on this much more of the boxes


def readout_summary(readouts: Dict) -> Dict:
    """``readouts[seed]`` (reports of :func:`~clarity_fast.readout.readout_report`) -> per kind of map (the maps,
    the token readout, position only): the pointing game's macro, averaged over the seeds; over the (seed, class)
    pairs, split by whether the map finds the lesions (``found``: its peak in box ≥ :data:`FOUND`) or not
    (``missed``), the number of pairs and each kind's mean peak in box; the number of missed pairs where the
    readout beats position only by :data:`READOUT_MARGIN` or more, and of all pairs where the map points below
    position only."""
    from .readout import MAP_KINDS
    kinds = [k for k, _ in MAP_KINDS]
    pairs = [{k: r["pointing"][k][c] for k in kinds} for r in readouts.values() for c in r["pointing"]["maps"]]

    def split(group: List[Dict]) -> Dict:
        return dict(count=len(group), pointing={k: _mean([p[k] for p in group]) for k in kinds})
    missed = [p for p in pairs if p["maps"] < FOUND]  # below, 1e-9: 0.6 - 0.5 is a hair under 0.1 in floats
    return dict(macro={k: _mean([r["pointing_macro"][k] for r in readouts.values()]) for k in kinds},
                pairs=len(pairs), found=split([p for p in pairs if p["maps"] >= FOUND]), missed=split(missed),
                missed_readout_ahead=sum(p["readout"] - p["position"] >= READOUT_MARGIN - 1e-9 for p in missed),
                maps_below_position=sum(p["maps"] < p["position"] for p in pairs))


def _ratio(area: Dict) -> Optional[float]:
    if area["predicted"] is None or not area["truth"]:
        return None
    return area["predicted"] / area["truth"]


_cell = partial(format_figure, missing="–")  # a table cell: "–" where there is no figure


def markdown(summary: Dict) -> str:
    """The ablation as Markdown: the macro table (with the pointing game: peak in box, and each seed's T = 0.3 and
    mean), then IoU accuracy at T = 0.3 per class and arm; every figure a mean over the seeds."""
    rows = summary["rows"]
    seeds = summary.get("seeds", [])
    ts = list(next(iter(rows.values()))["macro"])
    lines = [f"Mean over seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}.", "",
             "| arm | " + " | ".join(f"T={t}" for t in ts) + " | mean | peak in box | macro AUC | train minutes "
             "| per seed: T=0.3 / mean |", "|---|" + "---|" * (len(ts) + 5)]
    for name, r in rows.items():
        label = f"*{name}*" if r["baseline"] else name
        minutes = f"{r['minutes']:.1f}" if r["minutes"] is not None else "–"
        per_seed = ", ".join(f"{k}: {_cell(v['at_0_3'])} / {_cell(v['mean'])}" for k, v in r["per_seed"].items())
        lines.append(f"| {label} | " + " | ".join(_cell(r["macro"].get(t)) for t in ts)
                     + f" | **{_cell(r['mean'])}** | {_cell(r.get('pointing'))} | {_cell(r['auc'])} | {minutes} "
                     f"| {per_seed} |")
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
    lines += [""] + _auc_and_pointing_lines(summary["auc_and_pointing"])
    if summary.get("readout"):
        lines += [""] + _readout_lines(summary["readout"])
    return "\n".join(lines) + "\n"


def _auc_and_pointing_lines(analysis: Dict[str, Dict]) -> List[str]:
    """The table of :func:`auc_and_pointing`, one row per arm."""
    bands = ["AUC ≥ 0.9" if i == 0 else f"AUC {low:g}–{AUC_BANDS[i - 1]:g}" for i, low in enumerate(AUC_BANDS)]
    bands[-1] = f"AUC < {AUC_BANDS[-2]:g}"
    lines = ["Does a map find the lesions of the classes its token learned? Per (seed, class): the class's AUC "
             f"against its peak in box (plot: ablation_auc_pointing.png). Mean peak in box per AUC band (pairs); for "
             f"the small lesions ({', '.join(SMALL_LESIONS)}), the median box area / truth where the map finds them "
             f"(peak in box ≥ {FOUND:g}) and where it does not (pairs), and per seed their mean box area / truth.", "",
             "| arm | pairs | Spearman ρ | " + " | ".join(f"peak in box, {b}" for b in bands)
             + " | small lesions found: box area / truth | not found | small lesions per seed: mean box area / truth |",
             "|---|" + "---|" * (len(bands) + 5)]
    for arm, a in analysis.items():
        cells = [f"{_cell(b['pointing'])} ({b['count']})" for b in a["bands"]]
        found, missed = a["small_found"], a["small_missed"]
        lines.append(f"| {arm} | {a['count']} | {_cell(a['spearman'])} | " + " | ".join(cells)
                     + f" | {_cell(found['area_ratio'])}× ({found['count']}) | {_cell(missed['area_ratio'])}× "
                     f"({missed['count']}) | "
                     + ", ".join(f"{k}: {_cell(v)}×" for k, v in a["small_area_by_seed"].items()) + " |")
    return lines


def _readout_lines(readout: Dict[str, Dict]) -> List[str]:
    """The table of :func:`readout_summary`, one row per arm: maps / readout / position in each cell."""
    def kinds(pointing: Dict) -> str:
        return " / ".join(_cell(pointing[k]) for k in ("maps", "readout", "position"))
    lines = ["Where the maps miss, could the tokens point? Pointing game (peak in box) of the maps Ξ / a logistic "
             "readout of the last block's patch tokens / a position-only map, the last two fitted on the boxes of "
             f"the other patient fold (clarity_fast.readout); over (seed, class) pairs, split by whether the map "
             f"finds the lesions (peak in box ≥ {FOUND:g}).", "",
             "| arm | macro | pairs the map finds | mean there | pairs it misses | mean there | misses where the "
             f"readout beats position by ≥ {READOUT_MARGIN:g} | pairs where the map points below position |",
             "|---|" + "---|" * 7]
    for arm, r in readout.items():
        lines.append(f"| {arm} | {kinds(r['macro'])} | {r['found']['count']} | {kinds(r['found']['pointing'])} "
                     f"| {r['missed']['count']} | {kinds(r['missed']['pointing'])} | {r['missed_readout_ahead']} "
                     f"| {r['maps_below_position']} of {r['pairs']} |")
    return lines


def write_summary(summary: Dict, out_dir: Union[str, Path]) -> None:
    """``ablation.json``, ``ablation.md``, ``ablation.png`` and ``ablation_auc_pointing.png`` in ``out_dir``."""
    from .viz import line_plot
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "ablation.json", json.dumps(json_safe(summary), indent=2, allow_nan=False))
    write_text_atomic(out_dir / "ablation.md", markdown(summary))
    series = [dict(name=name.replace("σ", "sigma "), x=[float(t) for t in r["macro"]], y=list(r["macro"].values()),
                   dashed=r["baseline"]) for name, r in summary["rows"].items()]  # PIL's default font has no σ
    line_plot(series, out_dir / "ablation.png", "IoU accuracy against T (macro over classes; same protocol)",
              "IoU threshold T", "IoU accuracy", ylim=(0.0, 1.0))
    points = []
    for arm, by_seed in summary["classes"].items():
        pairs = [p for per_class in by_seed.values() for p in per_class.values() if _has_auc(p)]
        points.append(dict(name=arm, line=False, x=[p["auc"] for p in pairs], y=[p["pointing"] for p in pairs]))
    lowest = min([3] + [math.floor(x * 10) for p in points for x in p["x"]])  # x axis from 0.3, or lower if needed
    line_plot(points, out_dir / "ablation_auc_pointing.png", "Per class and seed: does the map find what the token "
              "learned?", "class AUC", "peak in box", xticks=[k / 10 for k in range(lowest, 11)], ylim=(0.0, 1.0))
