"""NIH ChestX-ray14 from a local copy (SPEC §5): labels, boxes, official split, a uint8
memory-mapped cache made once by ``prepare``, anatomical priors made once by ``masks``.

Folder expected by ``prepare``: ``images/*.png``, ``train_val_list.txt`` and ``test_list.txt``
(NIH's files). Labels and boxes come from the CSVs that torchxrayvision ships. All views and all
images are kept. Cache layout (``cache_dir``)::

    index.json            size, ids, patients, split, "complete" flag (written last); one size per cache
    labels.npy            (N, 14) uint8 in CLASS_NAMES order
    images_<S>.u8         (N, S, S) uint8 memmap; status.u8 (N,) 0 pending, 1 done, 2 unreadable
    unreadable.txt        images skipped, with the reason (appended as they are found)
    regions_<h>x<w>.u8    (N, 14, h, w) region masks; masks_<h>x<w>.u8 (N, C, h, w) class masks;
    dist_<h>x<w>.f16      (N, C, h, w) distance maps; masks_status_<h>x<w>.u8 (N,)
"""
from __future__ import annotations

import json
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Deque, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError
from .files import write_text_atomic
from .images import decode_xray, resize_square
from .pathologies import CLASS_NAMES
from .priors import class_masks, distance_map, grid_regions

PathLike = Union[str, Path]
CACHE_VERSION = 1
PENDING, DONE, UNREADABLE = 0, 1, 2
NIH_BOX_SPACE = 1024  # BBox_List_2017 gives x, y, w, h in the pixels of NIH's 1024 x 1024 PNGs


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
    """``BBox_List_2017.csv`` -> columns image, label, class_index, x, y, w, h, in the 1024 x 1024
    pixel space of NIH's PNGs (``NIH_BOX_SPACE``), not of the original scans."""
    import pandas as pd
    path = Path(csv_path) if csv_path else xrv_data_file("BBox_List_2017.csv.gz")
    df = pd.read_csv(path, skiprows=1, header=None, usecols=range(6), names=["image", "label", "x", "y", "w", "h"])
    df["label"] = df["label"].replace({"Infiltrate": "Infiltration"})
    unknown = sorted(set(df["label"]) - set(CLASS_NAMES))
    if unknown:
        raise InputError(f"{path}: unknown box labels {unknown}")
    df["class_index"] = df["label"].map(CLASS_NAMES.index)
    return df


def scaled_boxes(size: int, csv_path: Optional[PathLike] = None) -> Dict[str, List[List[float]]]:
    """image id -> ``[[class_index, x, y, w, h], ...]`` scaled from NIH's 1024-pixel space to ``size`` pixels."""
    scale = size / NIH_BOX_SPACE
    boxes: Dict[str, List[List[float]]] = {}
    for r in read_boxes(csv_path).itertuples():
        boxes.setdefault(r.image, []).append([r.class_index, r.x * scale, r.y * scale, r.w * scale, r.h * scale])
    return boxes


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


def load_index(cache_dir: PathLike, require_complete: bool = True) -> Dict:
    """The cache index; clear errors for a missing, corrupt or unfinished cache."""
    path = Path(cache_dir) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no NIH cache at {cache_dir} (index.json missing): run 'clarity-fast prepare'")
    try:
        index = json.loads(path.read_text())
        if index.get("version") != CACHE_VERSION or len(index["ids"]) != len(index["split"]):
            raise InputError("unexpected layout")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"cache index {path} is corrupt ({e}); delete {cache_dir} and run 'clarity-fast prepare' "
                         f"again") from None
    if require_complete and not index.get("complete"):
        raise InputError(f"the cache at {cache_dir} is incomplete: run 'clarity-fast prepare' again to finish it")
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
                 split=[split.get(i, "unlisted") for i in ids], complete=False)
    index_path = cache_dir / "index.json"
    resuming = index_path.is_file()
    if resuming:
        prev = load_index(cache_dir, require_complete=False)
        if prev["size"] != size:
            raise InputError(f"the cache at {cache_dir} holds images of size {prev['size']}, not {size}: prepare size "
                             f"{size} into another folder (a cache keeps one size)")
        if prev["ids"] != ids:
            raise InputError(f"the cache at {cache_dir} was prepared from another set of images: use another folder "
                             f"or delete this one")
        index["complete"] = prev.get("complete", False)
    else:
        write_text_atomic(index_path, json.dumps(index))
    np.save(cache_dir / "labels.npy", labels.loc[ids, list(CLASS_NAMES)].to_numpy(np.uint8))
    N = len(ids)
    mode = "r+" if resuming and (cache_dir / f"images_{size}.u8").exists() else "w+"
    images = np.memmap(cache_dir / f"images_{size}.u8", dtype=np.uint8, mode=mode, shape=(N, size, size))
    status = np.memmap(cache_dir / "status.u8", dtype=np.uint8, mode=mode, shape=(N,))
    todo = [k for k in range(N) if status[k] == PENDING]
    unreadable_path = cache_dir / "unreadable.txt"
    reasons = _read_reasons(unreadable_path) if resuming else {}
    if not resuming:
        unreadable_path.write_text("")

    def work(k: int):
        try:
            return k, resize_square(decode_xray(images_dir / ids[k]), size), None
        except ValueError as e:
            return k, None, str(e)

    done = 0
    with open(unreadable_path, "a") as log, tqdm(total=len(todo), desc="prepare", disable=not progress,
                                                 unit="img") as bar:
        try:
            for k, a, err in _bounded_map(work, todo, workers):
                if err is None:
                    images[k] = a
                    status[k] = DONE
                else:  # recorded as found: an interrupted run keeps every reason
                    log.write(f"{ids[k]}\t{err}\n")
                    log.flush()
                    reasons[ids[k]] = err
                    status[k] = UNREADABLE
                done += 1
                bar.update()
                if done % 2000 == 0:
                    images.flush()
                    status.flush()
        finally:
            images.flush()
            status.flush()
    unreadable_path.write_text("".join(f"{k}\t{v}\n" for k, v in sorted(reasons.items())))
    index["complete"] = True
    write_text_atomic(index_path, json.dumps(index))
    return dict(cached=int((status == DONE).sum()), unreadable=sorted(reasons), missing=missing, cache=str(cache_dir))


def _read_reasons(path: Path) -> Dict[str, str]:
    reasons: Dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, why = line.partition("\t")
            if name:
                reasons[name] = why
    return reasons


def _bounded_map(fn, items: List[int], workers: int):
    """``fn`` over ``items`` on a thread pool, in order, with at most ``4 * workers`` in flight, so that
    Ctrl-C (KeyboardInterrupt) returns within one image's time instead of draining the whole list."""
    pool = ThreadPoolExecutor(max(1, workers))
    pending: Deque = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * max(1, workers):
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
        net = pspnet(14)
        net.load_state_dict(state)
    except Exception as e:  # any unpickling, format or key mismatch: not the file we need
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(f"{path} is not ChestX-Det PSPNet weights ({PSPNET_FILE}): {first[:200]}") from None
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
        raise InputError(f"cache size {S} is not divisible by patch_size {patch_size}")
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
        reg = grid_regions(logits.sigmoid() > 0.5, (h, w))
        cls = class_masks(reg)
        regions[ks], masks[ks] = reg.cpu().numpy(), cls.cpu().numpy()
        dists[ks] = distance_map(cls).cpu().numpy().astype(np.float16)
        done[ks] = 1
    for m in (regions, masks, dists, done):
        m.flush()
    return dict(images=int(done.sum()), grid=(h, w))


class NIHCacheDataset(torch.utils.data.Dataset):
    """A split ("train", "val", "test") of a prepared NIH cache, in the common sample format.

    Masks and distance maps come from the ``masks`` step; without it every mask is empty, which
    means "no constraint". Boxes (test images) are scaled to the cache size.
    """

    def __init__(self, cache_dir: PathLike, split: str, patch_size: int = 16,
                 boxes_csv: Optional[PathLike] = None) -> None:
        if split not in ("train", "val", "test"):
            raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")
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
        self.boxes = scaled_boxes(S, boxes_csv) if split == "test" else {}

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
