"""What the patch tokens know against what the maps show: a box-supervised linear readout.

The maps Ξ are trained with image labels only. To tell a map that misses a lesion because the features never
saw it from one that misses it because the class token does not look there, this module fits, per class, a
logistic regression from each patch token of the last block to "this grid cell overlaps a box of the class",
on the box images of one patient fold, and plays the pointing game with its scores on the other fold (and the
other way round). Beside it: the model's own maps Ξ and a position-only map (how often each cell lies in a box
of the class on the fitting fold), all scored by :func:`~clarity_fast.boxes.peak_in_box` on the same records.
The readout uses the boxes, so it is an upper reference for the features, not a competitor of Ξ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from .boxes import box_cells, peak_in_box
from .errors import InputError
from .evaluation import BoxRecord, check_classes, format_figure, json_safe, patient_folds, run_model
from .files import write_text_atomic

MAP_KINDS: Tuple[Tuple[str, str], ...] = (
    ("maps", "maps Xi (labels only)"),
    ("readout", "token readout (boxes)"),
    ("position", "position only (boxes)"),
)  # (key, name in tables and legends: at most 25 characters)


def fit_logistic(features: torch.Tensor, targets: torch.Tensor, weight_decay: float = 1e-3,
                 max_iter: int = 200) -> torch.nn.Module:
    """A logistic regression ``features (n, D) float -> scores (n,)``, fitted by L-BFGS on standardised features
    with positives and negatives weighted to equal total weight. ``targets (n,)`` in {0, 1}, both present."""
    x, y = features.double(), targets.double()
    if not (0 < y.sum() < len(y)):
        raise InputError(f"targets need both classes, got {int(y.sum())} positives of {len(y)}")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    linear = torch.nn.Linear(x.shape[1], 1).double()
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    pos_weight = (len(y) - y.sum()) / y.sum()
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")
    xs = (x - mean) / std

    def closure():
        opt.zero_grad()
        logits = linear(xs).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return torch.nn.Sequential(_Standardise(mean, std), linear, torch.nn.Flatten(0))


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.std


@torch.no_grad()
def pointing_hits(records: Sequence[BoxRecord], loc_maps: Dict[str, torch.Tensor], tokens: Dict[str, torch.Tensor],
                  num_classes: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Per kind of :data:`MAP_KINDS`, a bool per record: does that map peak in the record's box? The readout and
    the position map of a record are fitted on the box images of its class in the other patient fold."""
    grid = next(iter(loc_maps.values())).shape[-2:]
    folds = patient_folds(records, seed)
    cells: Dict[Tuple[str, int], np.ndarray] = {}
    for r in records:
        key = (r.image_id, r.class_index)
        cells[key] = cells.get(key, np.zeros(grid, bool)) | box_cells(r.box, r.image_size, grid)
    hits = {kind: np.zeros(len(records), bool) for kind, _ in MAP_KINDS}
    hits["maps"] = np.array([peak_in_box(loc_maps[r.image_id][r.class_index], r.image_size, r.box)
                             for r in records])
    for c in range(num_classes):
        for held_out in (0, 1):
            test = [i for i, r in enumerate(records) if r.class_index == c and folds[i] == held_out]
            fit_ids = sorted({r.image_id for i, r in enumerate(records) if r.class_index == c and folds[i] != held_out})
            if not test or not fit_ids:
                continue
            targets = np.stack([cells[(k, c)] for k in fit_ids])  # (n, h, w)
            position = torch.from_numpy(targets.mean(0))
            readout = None
            if 0 < targets.sum() < targets.size:
                readout = fit_logistic(torch.cat([tokens[k] for k in fit_ids]),
                                       torch.from_numpy(targets.reshape(-1)).float())
            for i in test:
                r = records[i]
                hits["position"][i] = peak_in_box(position, r.image_size, r.box)
                if readout is not None:
                    score = readout(tokens[r.image_id]).reshape(grid).float()
                    hits["readout"][i] = peak_in_box(score, r.image_size, r.box)
    return hits


def readout_report(model: torch.nn.Module, dataset, batch_size: int = 32, device: Union[str, torch.device] = "cpu",
                   seed: int = 0, progress: bool = True) -> Dict:
    """Pointing game per class for each kind of :data:`MAP_KINDS` on ``dataset``'s box images: ``pointing[kind]
    [class]``, ``pointing_macro[kind]`` (over classes with boxes), ``num_boxes`` and ``features``."""
    classes = check_classes(model, dataset)
    res = run_model(model, dataset, batch_size, device, progress=progress, with_patch_tokens=True)
    records: List[BoxRecord] = res["records"]
    if not records:
        raise InputError("the data set has no box images: nothing to point at")
    hits = pointing_hits(records, res["loc_maps"], res["patch_tokens"], len(classes), seed)
    cls = np.array([r.class_index for r in records])
    present = [c for c in range(len(classes)) if (cls == c).any()]
    pointing = {kind: {classes[c]: float(hits[kind][cls == c].mean()) for c in present} for kind, _ in MAP_KINDS}
    return {"pointing": pointing,
            "pointing_macro": {k: float(np.mean(list(v.values()))) for k, v in pointing.items()},
            "num_boxes": len(records), "features": f"patch tokens of block {len(model.blocks) - 1} (the last)"}


def markdown_readout(report: Dict) -> str:
    """The readout report as a Markdown table, one row per class."""
    kinds = [k for k, _ in MAP_KINDS]
    lines = ["# What the tokens know against what the maps show", "",
             f"Pointing game (the map's peak cell overlaps the box) on {report['num_boxes']} boxes. The readout is "
             f"a logistic regression on the {report['features']}, fitted on the boxes of the other patient fold; "
             "the position map is how often each cell lies in a box of the class there.", "",
             "| class | " + " | ".join(name for _, name in MAP_KINDS) + " |",
             "|---|" + "---:|" * len(kinds)]
    for name in report["pointing"]["maps"]:
        lines.append(f"| {name} | " + " | ".join(format_figure(report["pointing"][k][name]) for k in kinds) + " |")
    lines.append("| **macro** | " + " | ".join(f"**{format_figure(report['pointing_macro'][k])}**" for k in kinds)
                 + " |")
    return "\n".join(lines) + "\n"


def write_readout(report: Dict, out_dir: Union[str, Path]) -> List[Path]:
    """``readout.json``, ``readout.md`` and ``readout.png`` (per-class bars) into ``out_dir``."""
    import json

    from .viz import bar_chart
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "readout.json", out_dir / "readout.md"]
    write_text_atomic(paths[0], json.dumps(json_safe(report), indent=2, allow_nan=False))
    write_text_atomic(paths[1], markdown_readout(report))
    classes = list(report["pointing"]["maps"])
    series = [dict(name=name, values=[report["pointing"][k][c] for c in classes]) for k, name in MAP_KINDS]
    paths.append(bar_chart(classes, series, out_dir / "readout.png",
                           "Pointing game per class: the maps, a box-supervised readout of the tokens, position only",
                           "peak in box"))
    return paths
