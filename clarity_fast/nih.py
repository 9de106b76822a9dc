"""NIH ChestX-ray14 from a local copy (SPEC §5): labels, boxes, official split, a uint8
memory-mapped cache made once by ``prepare``, anatomical priors made once by ``masks``.

Folder expected by ``prepare``: ``images/*.png``, ``train_val_list.txt`` and ``test_list.txt``
(NIH's files). Labels and boxes come from the CSVs that torchxrayvision ships. All views and all
images are kept. Cache layout (``cache_dir``)::

    index.json            ids, patients, split, original sizes, "complete" flag (written last)
    labels.npy            (N, 14) uint8 in CLASS_NAMES order
    images_<S>.u8         (N, S, S) uint8 memmap; status.u8 (N,) 0 pending, 1 done, 2 unreadable
    unreadable.txt        images skipped, with the reason
    regions_<h>x<w>.u8    (N, 14, h, w) region masks; masks_<h>x<w>.u8 (N, C, h, w) class masks;
    dist_<h>x<w>.f16      (N, C, h, w) distance maps; masks_status_<h>x<w>.u8 (N,)
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .pathologies import CLASS_NAMES, class_masks
from .phantom import grid_regions
from .priors import distance_map

PathLike = Union[str, Path]
CACHE_VERSION = 1
ACCEPTED_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I", "P")
MIN_SIDE = 64
PENDING, DONE, UNREADABLE = 0, 1, 2


def xrv_data_file(name: str) -> Path:
    """A CSV shipped inside torchxrayvision's ``data`` folder."""
    import torchxrayvision
    return Path(torchxrayvision.__file__).parent / "data" / name


def read_labels(csv_path: Optional[PathLike] = None) -> "pandas.DataFrame":  # noqa: F821
    """``Data_Entry_2017_v2020.csv`` -> columns image, patient, view, width, height and one 0/1
    column per class of CLASS_NAMES."""
    import pandas as pd
    path = Path(csv_path) if csv_path else xrv_data_file("Data_Entry_2017_v2020.csv.gz")
    df = pd.read_csv(path)
    out = pd.DataFrame({"image": df["Image Index"], "patient": df["Patient ID"].astype(str),
                        "view": df["View Position"], "width": df.iloc[:, 7], "height": df.iloc[:, 8]})
    findings = df["Finding Labels"].str.split("|")
    for c in CLASS_NAMES:
        out[c] = findings.apply(lambda f, c=c: int(c in f))
    return out


def read_boxes(csv_path: Optional[PathLike] = None) -> "pandas.DataFrame":  # noqa: F821
    """``BBox_List_2017.csv`` -> columns image, label, class_index, x, y, w, h (original pixels)."""
    import pandas as pd
    path = Path(csv_path) if csv_path else xrv_data_file("BBox_List_2017.csv.gz")
    df = pd.read_csv(path, skiprows=1, header=None, usecols=range(6), names=["image", "label", "x", "y", "w", "h"])
    df["label"] = df["label"].replace({"Infiltrate": "Infiltration"})
    unknown = sorted(set(df["label"]) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown box labels {unknown}")
    df["class_index"] = df["label"].map(CLASS_NAMES.index)
    return df


def read_split(data_dir: PathLike) -> Tuple[List[str], List[str]]:
    """The official split: (train_val ids, test ids) from NIH's ``train_val_list.txt`` / ``test_list.txt``."""
    out = []
    for name in ("train_val_list.txt", "test_list.txt"):
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the official NIH split files train_val_list.txt and "
                                    f"test_list.txt must be in the data folder")
        out.append([line.strip() for line in path.read_text().splitlines() if line.strip()])
    return out[0], out[1]


def carve_validation(ids: List[str], patients: Dict[str, str], fraction: float = 0.1,
                     seed: int = 0) -> Tuple[List[str], List[str]]:
    """Split train_val ids into (train, val) by patient."""
    pts = sorted({patients[i] for i in ids})
    rng = np.random.default_rng(seed)
    val_pts = set(rng.choice(pts, size=max(1, int(round(fraction * len(pts)))), replace=False).tolist()) \
        if len(pts) > 1 else set()
    return [i for i in ids if patients[i] not in val_pts], [i for i in ids if patients[i] in val_pts]


def read_image(path: PathLike) -> np.ndarray:
    """A NIH PNG -> 2-d uint8 array. Raises ValueError with the reason for unreadable files."""
    try:
        with Image.open(path) as im:
            if im.mode not in ACCEPTED_MODES:
                raise ValueError(f"unsupported image mode {im.mode}")
            if min(im.size) < MIN_SIDE:
                raise ValueError(f"image too small ({im.size[0]}x{im.size[1]}, expected at least {MIN_SIDE})")
            im.load()
            if im.mode.startswith("I"):
                a = np.asarray(im, dtype=np.float64)
                a = a / max(a.max(), 1) * 255
                return a.astype(np.uint8)
            return np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode ({e.__class__.__name__}: {e})") from None


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR, reducing_gap=2.0))


def _atomic_json(path: Path, data: Dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_index(cache_dir: PathLike, require_complete: bool = True) -> Dict:
    """The cache index; clear errors for a missing, corrupt or unfinished cache."""
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no NIH cache at {cache_dir} (index.json missing): run 'clarity-fast prepare'")
    try:
        index = json.loads(path.read_text())
        if index.get("version") != CACHE_VERSION or len(index["ids"]) != len(index["split"]):
            raise ValueError("unexpected layout")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cache index {path} is corrupt ({e}); delete {cache_dir} and run 'clarity-fast prepare' "
                         f"again") from None
    if require_complete and not index.get("complete"):
        raise ValueError(f"the cache at {cache_dir} is incomplete: run 'clarity-fast prepare' again to finish it")
    return index


def prepare(data_dir: PathLike, cache_dir: PathLike, size: int = 512, val_fraction: float = 0.1, seed: int = 0,
            workers: int = 4, csv_path: Optional[PathLike] = None, progress: bool = True) -> Dict:
    """Resize every NIH image once into the uint8 memory-mapped cache (resumable).

    Returns a summary: counts of cached, unreadable and missing images. Unreadable images are
    skipped and listed in ``unreadable.txt``; the index is marked complete only at the end.
    """
    from tqdm.auto import tqdm
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    images_dir = data_dir / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir} not found: the NIH data folder must hold images/*.png")
    train_val, test = read_split(data_dir)
    labels = read_labels(csv_path).set_index("image")
    present = {p.name for p in images_dir.glob("*.png")}
    ids = [i for i in sorted(labels.index) if i in present]
    missing = len(labels) - len(ids)
    if not ids:
        raise FileNotFoundError(f"none of the images listed in the NIH CSV is in {images_dir}")
    patients = labels["patient"].to_dict()
    train_ids, val_ids = carve_validation([i for i in train_val if i in present], patients, val_fraction, seed)
    split = {i: "train" for i in train_ids} | {i: "val" for i in val_ids} | {i: "test" for i in test if i in present}
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = dict(version=CACHE_VERSION, size=size, ids=ids, patients=[patients[i] for i in ids],
                 split=[split.get(i, "unlisted") for i in ids],
                 original_size=[[int(labels.at[i, "width"]), int(labels.at[i, "height"])] for i in ids],
                 complete=False)
    old = cache_dir / "index.json"
    resuming = False
    if old.is_file():
        prev = load_index(cache_dir, require_complete=False)
        resuming = prev["ids"] == ids and prev["size"] == size
    if not resuming:
        _atomic_json(old, index)
    np.save(cache_dir / "labels.npy", labels.loc[ids, list(CLASS_NAMES)].to_numpy(np.uint8))
    N = len(ids)
    mode = "r+" if resuming and (cache_dir / f"images_{size}.u8").exists() else "w+"
    images = np.memmap(cache_dir / f"images_{size}.u8", dtype=np.uint8, mode=mode, shape=(N, size, size))
    status = np.memmap(cache_dir / "status.u8", dtype=np.uint8, mode=mode, shape=(N,))
    todo = [k for k in range(N) if status[k] == PENDING]
    reasons: Dict[str, str] = {}
    if (cache_dir / "unreadable.txt").exists() and resuming:
        for line in (cache_dir / "unreadable.txt").read_text().splitlines():
            name, _, why = line.partition("\t")
            reasons[name] = why

    def work(k: int):
        try:
            return k, _resize(read_image(images_dir / ids[k]), size), None
        except ValueError as e:
            return k, None, str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for n, (k, a, err) in enumerate(tqdm(pool.map(work, todo), total=len(todo), desc="prepare",
                                             disable=not progress, unit="img")):
            if err is None:
                images[k] = a
                status[k] = DONE
            else:
                status[k] = UNREADABLE
                reasons[ids[k]] = err
            if n % 2000 == 1999:
                images.flush()
                status.flush()
    images.flush()
    status.flush()
    (cache_dir / "unreadable.txt").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(reasons.items())))
    index["complete"] = True
    _atomic_json(old, index)
    return dict(cached=int((status == DONE).sum()), unreadable=sorted(reasons), missing=missing, cache=str(cache_dir))


# ------------------------------------------------------------------------------------------ priors
PSPNET_FILE = "pspnet_chestxray_best_model_4.pth"


class ChestXDetSegmenter(nn.Module):
    """torchxrayvision's ChestX-Det PSPNet preprocessing around a ``pspnet(14)``: input
    ``(B, 1, 512, 512)`` in xrv's range [-1024, 1024], output ``(B, 14, 512, 512)`` logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1024) / 2048).expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)


def load_chestx_det(weights: Optional[PathLike] = None) -> ChestXDetSegmenter:
    """The ChestX-Det PSPNet from a local weights file (default: torchxrayvision's cache). Never downloads."""
    import torchxrayvision as xrv
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet
    path = Path(weights) if weights else Path(xrv.utils.get_cache_dir()) / PSPNET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"PSPNet weights not found at {path}: place torchxrayvision's {PSPNET_FILE} there "
                                f"or pass its path (nothing is downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    net = pspnet(14)
    net.load_state_dict(state)
    return ChestXDetSegmenter(net).eval()


@torch.no_grad()
def compute_masks(cache_dir: PathLike, segmenter: nn.Module, patch_size: int = 16, batch_size: int = 4,
                  device: Union[str, torch.device] = "cpu", progress: bool = True) -> Dict:
    """Run ``segmenter`` once per cached image; store region masks, class masks (SPEC §5 table,
    dilated by one patch) and distance maps at grid resolution (resumable)."""
    from tqdm.auto import tqdm
    cache_dir = Path(cache_dir)
    index = load_index(cache_dir)
    N, S = len(index["ids"]), index["size"]
    if S % patch_size:
        raise ValueError(f"cache size {S} is not divisible by patch_size {patch_size}")
    h = w = S // patch_size
    tag = f"{h}x{w}"
    images = np.memmap(cache_dir / f"images_{S}.u8", dtype=np.uint8, mode="r", shape=(N, S, S))
    status = np.memmap(cache_dir / "status.u8", dtype=np.uint8, mode="r", shape=(N,))
    mode = "r+" if (cache_dir / f"masks_status_{tag}.u8").exists() else "w+"
    regions = np.memmap(cache_dir / f"regions_{tag}.u8", dtype=np.uint8, mode=mode, shape=(N, 14, h, w))
    masks = np.memmap(cache_dir / f"masks_{tag}.u8", dtype=np.uint8, mode=mode, shape=(N, len(CLASS_NAMES), h, w))
    dists = np.memmap(cache_dir / f"dist_{tag}.f16", dtype=np.float16, mode=mode, shape=(N, len(CLASS_NAMES), h, w))
    done = np.memmap(cache_dir / f"masks_status_{tag}.u8", dtype=np.uint8, mode=mode, shape=(N,))
    todo = [k for k in range(N) if status[k] == DONE and not done[k]]
    segmenter = segmenter.to(device).eval()
    for start in tqdm(range(0, len(todo), batch_size), desc="masks", disable=not progress, unit="batch"):
        ks = todo[start:start + batch_size]
        x = torch.from_numpy(np.stack([images[k] for k in ks])).float().unsqueeze(1).to(device)
        if S != 512:
            x = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=False)
        logits = segmenter(x / 255 * 2048 - 1024)
        reg = grid_regions_batch(logits.sigmoid() > 0.5, (h, w))
        cls = class_masks(reg)
        regions[ks], masks[ks] = reg.cpu().numpy(), cls.cpu().numpy()
        dists[ks] = distance_map(cls).cpu().numpy().astype(np.float16)
        done[ks] = 1
    for m in (regions, masks, dists, done):
        m.flush()
    return dict(images=int(done.sum()), grid=(h, w))


def grid_regions_batch(regions: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``(B, 14, H, W)`` full-resolution region masks -> ``(B, 14, h, w)`` (see :func:`grid_regions`)."""
    return torch.stack([grid_regions(r, grid) for r in regions.cpu()])


class NIHCacheDataset(torch.utils.data.Dataset):
    """A split ("train", "val", "test") of a prepared NIH cache, in the common sample format.

    Masks and distance maps come from the ``masks`` step; without it every mask is empty, which
    means "no constraint". Boxes (test images) are scaled to the cache size.
    """

    def __init__(self, cache_dir: PathLike, split: str, patch_size: int = 16,
                 boxes_csv: Optional[PathLike] = None) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.cache_dir = Path(cache_dir)
        index = load_index(cache_dir)
        S, N = index["size"], len(index["ids"])
        self.size, self.classes = S, CLASS_NAMES
        status = np.fromfile(self.cache_dir / "status.u8", dtype=np.uint8)
        self.rows = [k for k in range(N) if index["split"][k] == split and status[k] == DONE]
        self.ids, self.patients = index["ids"], index["patients"]
        self.images = np.memmap(self.cache_dir / f"images_{S}.u8", dtype=np.uint8, mode="r", shape=(N, S, S))
        self.labels = np.load(self.cache_dir / "labels.npy")
        h = w = S // patch_size
        self.grid = (h, w)
        tag = f"{h}x{w}"
        self.masks = self.dist = None
        if not (self.cache_dir / f"masks_status_{tag}.u8").exists():
            warnings.warn(f"no anatomical priors for grid {tag} in {cache_dir} (run 'clarity-fast masks "
                          f"{cache_dir} --patch-size {patch_size}'): masks are empty, i.e. no constraint")
        else:
            self.masks = np.memmap(self.cache_dir / f"masks_{tag}.u8", dtype=np.uint8, mode="r",
                                   shape=(N, len(CLASS_NAMES), h, w))
            self.dist = np.memmap(self.cache_dir / f"dist_{tag}.f16", dtype=np.float16, mode="r",
                                  shape=(N, len(CLASS_NAMES), h, w))
        boxes: Dict[str, List[List[float]]] = {}
        if split == "test":
            sizes = dict(zip(self.ids, index["original_size"]))
            for r in read_boxes(boxes_csv).itertuples():
                if r.image in sizes:
                    sx, sy = S / sizes[r.image][0], S / sizes[r.image][1]
                    boxes.setdefault(r.image, []).append([r.class_index, r.x * sx, r.y * sy, r.w * sx, r.h * sy])
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict:
        k = self.rows[i]
        C, (h, w) = len(CLASS_NAMES), self.grid
        masks = torch.from_numpy(np.array(self.masks[k])).bool() if self.masks is not None \
            else torch.zeros(C, h, w, dtype=torch.bool)
        dist = torch.from_numpy(np.array(self.dist[k])).float() if self.dist is not None else torch.zeros(C, h, w)
        image_id = self.ids[k]
        return dict(image=torch.from_numpy(np.array(self.images[k])).float().unsqueeze(0) / 255,
                    labels=torch.from_numpy(self.labels[k].astype(np.float32)), masks=masks, dist=dist,
                    boxes=torch.tensor(self.boxes.get(image_id, []), dtype=torch.float32).reshape(-1, 5),
                    id=image_id, patient=self.patients[k])
