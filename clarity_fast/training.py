"""Training (SPEC §7): config, trainer, atomic checkpoints with exact resume, DDP.

``Trainer(cfg, train_set).fit()`` runs AdamW with layer-wise lr decay (no weight decay on tokens,
position embeddings, norms and biases), a cosine schedule with warm-up, bf16 autocast on CUDA,
gradient accumulation, clipping, optional EMA and per-block activation checkpointing, and logs
every loss term to CSV (and TensorBoard when installed). Under ``torchrun`` it trains with DDP.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2

from .clarity import Clarity
from .data import augment, collate, normalize
from .errors import InputError
from .files import fsync_dir, fsync_file, write_text_atomic
from .evaluation import IOU_THRESHOLDS
from .losses import TERMS, ClarityLoss
from .progress import progress
from .weights import create_model, load_pretrained


@dataclass
class TrainConfig:
    """Everything a run needs; YAML-serialisable. ``model_args`` go to the model constructor,
    ``loss`` to :class:`ClarityLoss`. ``lr`` is for batch 64 and scales linearly with the
    effective batch (batch_size x accum_steps x world size)."""
    model: str = "clarity_s16_224"
    model_args: Dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    dataset: str = "phantom"
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    num_train: int = 4000
    num_val: int = 500
    augment: bool = True
    num_workers: int = 0
    teacher_logits: Optional[str] = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 2.0
    grad_clip: float = 1.0
    accum_steps: int = 1
    ema_decay: Optional[float] = None
    amp: bool = True
    loss: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    output_dir: str = "runs/clarity"
    device: str = "auto"
    log_every: int = 10
    save_every_steps: Optional[int] = None
    max_steps: Optional[int] = None
    max_bad_steps: int = 5  # optimizer steps in a row with a non-finite loss or gradient before training stops
    xi_tune_at: Optional[float] = None  # evaluation: tune ξ for the mean IoU accuracy over T (None) or at one T

    def validate(self) -> "TrainConfig":
        """Type- and range-check every key (also those whose default is None); ValueError naming the key."""
        for f in dataclasses.fields(self):
            kind, optional, ok, expected = _RULES[f.name]
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            if not _is_kind(value, kind) or not ok(value):
                raise InputError(f"config key {f.name!r} must be {expected}, got {value!r}")
        _check_keys("model_args", self.model_args, Clarity.__init__)
        _check_keys("loss", self.loss, ClarityLoss.__init__)
        return self


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _any(_: Any) -> bool:
    return True


# key -> (type, None allowed, range check, what is expected, in words)
_RULES: Dict[str, tuple] = {
    "model": (str, False, lambda v: v in timm.list_models("clarity_*"),
              "a CLARiTy model name (" + ", ".join(timm.list_models("clarity_*")) + ")"),
    "model_args": (dict, False, _any, "a mapping of Clarity arguments"),
    "pretrained": (str, True, _any, "a weights file path or null"),
    "drop_path": (float, False, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "grad_checkpointing": (bool, False, _any, "true or false"),
    "dataset": (str, False, lambda v: v in ("phantom", "nih"), "'phantom' or 'nih'"),
    "data_dir": (str, True, _any, "a folder path or null"),
    "cache_dir": (str, True, _any, "a folder path or null"),
    "num_train": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "num_val": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "augment": (bool, False, _any, "true or false"),
    "num_workers": (int, False, lambda v: v >= 0, "an integer >= 0"),
    "teacher_logits": (str, True, _any, "a file path or null"),
    "epochs": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "lr": (float, False, lambda v: v > 0, "a number > 0"),
    "weight_decay": (float, False, lambda v: v >= 0, "a number >= 0"),
    "layer_decay": (float, False, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "warmup_epochs": (float, False, lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (float, False, lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "accum_steps": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "ema_decay": (float, True, lambda v: 0 < v < 1, "a number in (0, 1) or null"),
    "amp": (bool, False, _any, "true or false"),
    "loss": (dict, False, _any, "a mapping of ClarityLoss arguments"),
    "seed": (int, False, lambda v: v >= 0, "an integer >= 0"),
    "output_dir": (str, False, lambda v: bool(v), "a folder path"),
    "device": (str, False, lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
               "'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    "log_every": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "save_every_steps": (int, True, lambda v: v >= 1, "an integer >= 1 or null"),
    "max_steps": (int, True, lambda v: v >= 1, "an integer >= 1 or null"),
    "max_bad_steps": (int, False, lambda v: v >= 1, "an integer >= 1"),
    "xi_tune_at": (float, True, lambda v: any(abs(v - t) < 1e-9 for t in IOU_THRESHOLDS),
                   "one of " + ", ".join(f"{t:g}" for t in IOU_THRESHOLDS) + " or null"),
}
# keys a resumed run may change; any other difference from the saved config is refused
RESUMABLE_CHANGES = ("max_steps", "num_workers", "log_every", "save_every_steps", "device", "output_dir")


def _check_keys(name: str, values: Dict, fn) -> None:
    known = set(inspect.signature(fn).parameters) - {"self"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {name} keys {unknown}; known: {sorted(known)}")


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                base: Optional[TrainConfig] = None) -> TrainConfig:
    """A config from defaults (or ``base``), then a YAML file, then ``key=value`` overrides
    (values parsed as YAML; nested keys as ``loss.lambda_oct=0.2``; numbers in any notation, 1e-3 too)."""
    values = dataclasses.asdict(base or TrainConfig())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} is not a file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise InputError(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError:
            raise InputError(f"config file {path} is not a text file") from None
        if not isinstance(loaded, dict):
            raise InputError(f"config file {path} must hold a mapping of keys to values")
        for k, v in loaded.items():
            _set(values, str(k), v)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        _set(values, key.strip(), parsed)
    return TrainConfig(**values).validate()


def _set(values: Dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head not in values:
        raise InputError(f"unknown config key {head!r}; known keys: {sorted(values)}")
    if rest:
        if not isinstance(values[head], dict):
            raise InputError(f"config key {head!r} has no sub-keys (got {key!r})")
        values[head] = dict(values[head], **{rest: value})
    else:
        values[head] = _coerce(head, value)


def _coerce(key: str, value: Any) -> Any:
    """Numbers written as strings (YAML reads ``1e-3`` as text) become numbers; integral floats become ints
    for integer keys. Anything else is left for :meth:`TrainConfig.validate` to judge."""
    kind = _RULES[key][0]
    if kind in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"config key {key!r} must be {_RULES[key][3]}, got {value!r}") from None
    if kind is int and isinstance(value, float) and not isinstance(value, bool):
        if not value.is_integer():
            raise InputError(f"config key {key!r} must be {_RULES[key][3]}, got {value!r}")
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# ------------------------------------------------------------------------------------------- checkpoints
LATEST = "latest"
CKPT_PATTERN = re.compile(r"^ckpt-(\d{8,})$")
MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "trainer_state.pt"


class TrainingDiverged(InputError):
    """The loss or the gradients stayed non-finite for ``max_bad_steps`` optimizer steps in a row."""


def checkpoint_steps(run_dir: Union[str, Path]) -> Dict[int, Path]:
    """The run's checkpoint folders by step number."""
    found = {}
    for p in Path(run_dir).glob("ckpt-*"):
        m = CKPT_PATTERN.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def save_checkpoint(run_dir: Union[str, Path], model: torch.nn.Module, state: Dict, keep: int = 2,
                    ema: Optional[torch.nn.Module] = None, training_data: Optional[str] = None) -> Path:
    """Write ``ckpt-<step>/`` (model.safetensors, ema.safetensors with EMA, trainer_state.pt) completely and
    fsync it, then point ``latest`` at it with an atomic rename: a write killed midway leaves the previous
    one loadable. Older checkpoints are removed by step number, keeping the ``keep`` newest. The weights files
    carry the model's class names and ``training_data`` (the data set's name) in their metadata."""
    run_dir = Path(run_dir)
    name = f"ckpt-{state['step']:08d}"
    tmp = run_dir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [(MODEL_FILE, model)] + ([(EMA_FILE, ema)] if ema is not None else [])
    for file, module in files:
        weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        metadata = {"step": str(state["step"])}
        if hasattr(module, "class_names"):  # the names travel with the weights
            metadata["label_names"] = json.dumps(list(module.class_names))
        if training_data is not None:
            metadata["training_data"] = training_data
        save_file(weights, str(tmp / file), metadata=metadata)
    torch.save(state, tmp / STATE_FILE)
    for file in [f for f, _ in files] + [STATE_FILE]:
        fsync_file(tmp / file)
    fsync_dir(tmp)
    final = run_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    write_text_atomic(run_dir / LATEST, name)
    steps = checkpoint_steps(run_dir)
    for step, path in list(steps.items())[:-max(1, keep)]:
        if path != final:
            shutil.rmtree(path, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Union[str, Path]) -> Path:
    """The checkpoint folder ``latest`` points at; clear errors if there is none, if it is incomplete, or if
    ``latest`` names anything but a checkpoint folder of this run."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (no '{LATEST}' file)")
    name = pointer.read_text().strip()
    if not CKPT_PATTERN.match(name):
        raise InputError(f"{pointer} names {name[:80]!r}, which is not a checkpoint folder of this run "
                         f"(expected ckpt-<step>); refusing to follow it")
    ckpt = run_dir / name
    if not (ckpt / MODEL_FILE).is_file() or not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} named by {pointer} is incomplete")
    return ckpt


def weights_file(path: Union[str, Path], ema: bool = True) -> Tuple[Path, str]:
    """The weights file of a run folder (its latest checkpoint), a checkpoint folder (its EMA weights where it
    has them, unless ``ema=False``) or a weights file, and which weights those are, in words."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a run folder, a checkpoint folder or a weights file)")
    if not path.is_dir():
        return path, f"weights file {path}"
    folder = latest_checkpoint(path) if (path / LATEST).exists() else path
    use_ema = ema and (folder / EMA_FILE).is_file()
    file = folder / (EMA_FILE if use_ema else MODEL_FILE)
    if not file.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {folder}")
    return file, f"{'EMA' if use_ema else 'raw'} weights of {folder}"


def saved_metadata(path: Union[str, Path]) -> Dict[str, str]:
    """The metadata a ``.safetensors`` weights file was saved with (``label_names`` as JSON, ``training_data``:
    see :func:`save_checkpoint`); empty for other files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # truncated or not a safetensors file
        raise InputError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None


def saved_class_names(path: Union[str, Path]) -> Optional[List[str]]:
    """The class names a weights file was saved with (:func:`save_checkpoint`), else None."""
    names = saved_metadata(path).get("label_names")
    return json.loads(names) if names is not None else None


def load_model_weights(model: torch.nn.Module, path: Union[str, Path], ema: bool = True) -> str:
    """Load a run folder (its latest checkpoint), a checkpoint folder or a .safetensors/.pth file into
    ``model``, with the class names saved beside the weights. In a checkpoint with EMA weights, those are
    loaded unless ``ema=False``. Returns which weights were loaded, in words."""
    path, what = weights_file(path, ema)
    if path.suffix != ".safetensors":
        load_pretrained(model, path)
        return what
    metadata = saved_metadata(path)
    _load_matching(model, load_file(str(path)), path)
    if "label_names" in metadata:
        model.class_names = json.loads(metadata["label_names"])
    if "training_data" in metadata and isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg["training_data"] = metadata["training_data"]
    return what


def _load_matching(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with one clear line for missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            "shape of " + ", ".join(f"{k} {tuple(state[k].shape)} vs the model's {tuple(own[k].shape)}"
                                     for k in sorted(shapes)[:3]) if shapes else "") if part)
        raise InputError(f"{path} does not fit this model (check num_classes and model_args): {detail}")
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------ trainer
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, the device torchrun gave this process), ``cpu``, ``cuda`` or ``cuda:<i>``."""
    if name == "auto":  # under torchrun, the device this process was given (torch.cuda.set_device)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={name} but no CUDA GPU is available here; use device=auto or device=cpu")
    return torch.device(name)


class _Outputs(torch.nn.Module):
    """Routes ``forward`` to ``forward_outputs`` so that DDP sees the call that produces the loss."""

    def __init__(self, model: Clarity) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_outputs(x, segmentcam_logits=False)  # ClarityLoss computes them, once


def check_setup(cfg: TrainConfig, pretrained: bool = True) -> None:
    """The mistakes that can be found before any data is built: device, output_dir and (with ``pretrained``)
    a pretrained file that cannot be read."""
    resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output_dir {out} is a file, not a folder")
    if pretrained and cfg.pretrained:
        from .weights import load_checkpoint_file
        load_checkpoint_file(cfg.pretrained)


def model_class_args(model_args: Dict[str, Any], classes: Optional[Sequence[str]], source: str) -> Dict[str, Any]:
    """``model_args`` with ``num_classes`` and ``label_names`` set from ``classes`` (the classes of ``source``,
    a data set or a checkpoint), so the model is built for them; unchanged without ``classes``. A conflicting
    ``num_classes`` is refused."""
    if classes is None:
        return dict(model_args)
    if model_args.get("num_classes", len(classes)) != len(classes):
        raise InputError(f"model_args.num_classes={model_args['num_classes']} does not fit {source}, which has "
                         f"{len(classes)} classes ({', '.join(classes)})")
    return dict(model_args, num_classes=len(classes), label_names=tuple(model_args.get("label_names", classes)))


class Trainer:
    """Trains a CLARiTy model on ``train_set`` (samples as in :mod:`clarity_fast.data`): the one ``cfg``
    describes, or ``model`` (any module with CLARiTy's ``forward_outputs``, e.g. the Grad-CAM baseline of
    :mod:`clarity_fast.gradcam_baseline`) under the same budget."""

    def __init__(self, cfg: TrainConfig, train_set, teacher: Optional[Dict[str, torch.Tensor]] = None,
                 progress: bool = True, overwrite: bool = False, model: Optional[torch.nn.Module] = None) -> None:
        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.output_dir)
        check_setup(cfg, pretrained=False)  # create_model below reads the pretrained file
        self.overwrite, self.resumed, self.bad_steps = overwrite, False, 0
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = resolve_device(cfg.device)
        self.progress = progress and self.rank == 0
        torch.manual_seed(cfg.seed)
        if model is None:
            model = create_model(cfg.model, pretrained=cfg.pretrained, drop_path_rate=cfg.drop_path,
                                 **model_class_args(cfg.model_args, getattr(train_set, "classes", None),
                                                    "the training set"))
        self.model = model.to(self.device)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.train_set, self.teacher = train_set, teacher
        self.loss_fn = ClarityLoss(**cfg.loss)
        self.batches_per_epoch = len(train_set) // (cfg.batch_size * self.world)
        if self.batches_per_epoch < cfg.accum_steps:
            raise InputError(f"the training set ({len(train_set)} images) is too small for batch_size="
                             f"{cfg.batch_size} x accum_steps={cfg.accum_steps} x {self.world} process(es)")
        self.steps_per_epoch = self.batches_per_epoch // cfg.accum_steps
        lr = cfg.lr * cfg.batch_size * cfg.accum_steps * self.world / 64
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=lr, weight_decay=cfg.weight_decay,
                                             layer_decay=cfg.layer_decay)
        total = max(1, cfg.epochs * self.steps_per_epoch)
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        self.net = _Outputs(self.model)
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.batch_index = 0  # micro-batches done in total
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)  # since the last optimizer step

    # ------------------------------------------------------------------ state
    def state(self) -> Dict:
        """Everything but the weights, in types ``torch.load(weights_only=True)`` accepts (no pickled objects)."""
        name, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return dict(step=self.batch_index, bad_steps=self.bad_steps, optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(),
                    rng=dict(torch=torch.get_rng_state(),
                             numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                                        has_gauss=int(has_gauss), cached=float(cached)),
                             python=dict(version=version, internal=list(internal), gauss_next=gauss_next),
                             cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
                    config=dataclasses.asdict(self.cfg))

    def save(self) -> Optional[Path]:
        """Checkpoint (rank 0). BatchNorm buffers are first made identical on every rank (rank 0's), and a
        model with non-finite weights is never written."""
        self._sync_buffers()
        if self.rank != 0:
            return None
        tensors = list(self.model.state_dict().values())
        if self.ema is not None:
            tensors += list(self.ema.module.state_dict().values())
        if not bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all()):
            raise TrainingDiverged(f"the weights or BatchNorm statistics are not finite at micro-batch "
                                   f"{self.batch_index}; no checkpoint written (the last good one stays in "
                                   f"{self.run_dir}). Lower lr (now {self.cfg.lr:g}) or set grad_clip")
        return save_checkpoint(self.run_dir, self.model, self.state(),
                               ema=self.ema.module if self.ema is not None else None, training_data=self.cfg.dataset)

    def _sync_buffers(self) -> None:
        if self.world > 1:
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)

    def resume(self, path: Optional[Union[str, Path]] = None) -> None:
        """Continue exactly from the latest checkpoint of ``path`` (default: this run's folder). The trainer
        state is read with ``weights_only=True`` (no code runs); a config that differs from the saved one
        in anything but ``RESUMABLE_CHANGES`` is refused, the differences listed."""
        ckpt = latest_checkpoint(path or self.run_dir)
        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng", "config"} <= set(state):
                raise InputError("unexpected layout")
        except Exception as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise InputError(f"{ckpt / STATE_FILE} is not a clarity_fast trainer state; refusing to load it "
                             f"({first[:160]})") from None
        changed = {k: (v, getattr(self.cfg, k)) for k, v in state["config"].items()
                   if k not in RESUMABLE_CHANGES and hasattr(self.cfg, k) and getattr(self.cfg, k) != v}
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise InputError(f"--resume with a config that differs from the run's ({listed}); only "
                             f"{', '.join(RESUMABLE_CHANGES)} may change")
        self.model.load_state_dict(load_file(str(ckpt / MODEL_FILE), device=str(self.device)))
        if self.ema is not None:
            if not (ckpt / EMA_FILE).is_file():
                raise InputError(f"{ckpt} has no {EMA_FILE} although ema_decay is set")
            self.ema.module.load_state_dict(load_file(str(ckpt / EMA_FILE), device=str(self.device)))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batch_index, self.bad_steps = state["step"], state.get("bad_steps", 0)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        p = rng["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed = True

    def _claim_run_dir(self) -> None:
        """A new run never writes into a folder that holds another run's checkpoints."""
        old = list(checkpoint_steps(self.run_dir).values()) + [p for p in (self.run_dir / LATEST,) if p.exists()]
        if not old or self.resumed:
            return
        if not self.overwrite:
            raise InputError(f"{self.run_dir} already holds a run's checkpoints: pass --resume to continue it, "
                             f"--overwrite to start over (its checkpoints are deleted), or set another output_dir")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in (self.run_dir / "log.csv", self.run_dir / "tensorboard"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # --------------------------------------------------------------- batches
    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """This rank's index lists for ``epoch``: a seeded permutation, split evenly across ranks."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g).tolist()
        per = self.cfg.batch_size
        n = self.batches_per_epoch * per
        mine = perm[self.rank * n:(self.rank + 1) * n]
        return [mine[i * per:(i + 1) * per] for i in range(self.batches_per_epoch)]

    def _teacher_for(self, ids: Sequence[str]) -> Optional[torch.Tensor]:
        if self.teacher is None:
            return None
        missing = [i for i in ids if i not in self.teacher]
        if missing:
            raise InputError(f"teacher logits are missing for images {missing[:3]}")
        return torch.stack([self.teacher[i] for i in ids]).to(self.device)

    # ------------------------------------------------------------------ train
    def fit(self) -> Dict[str, float]:
        """Train until ``epochs`` (or ``max_steps`` micro-batches); returns the last logged terms."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            self._claim_run_dir()
            save_config(cfg, self.run_dir / "config.yaml")
        log = _Logger(self.run_dir, enabled=self.rank == 0)
        total = cfg.epochs * self.batches_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        bar = progress(total=total, initial=self.batch_index, desc="training", enabled=self.progress, unit="batch")
        amp = cfg.amp and self.device.type == "cuda"
        last: Dict[str, float] = {}
        t0, seen = time.perf_counter(), 0
        self.model.train()
        try:
            while self.batch_index < total:
                epoch, first = divmod(self.batch_index, self.batches_per_epoch)
                batches = self.epoch_batches(epoch)[first:]
                # the loader's own generator: making an iterator must not consume the global RNG (drop-path),
                # or a resumed run would diverge from an uninterrupted one
                loader = torch.utils.data.DataLoader(self.train_set, batch_sampler=batches, collate_fn=collate,
                                                     num_workers=cfg.num_workers,
                                                     generator=torch.Generator().manual_seed(cfg.seed + epoch))
                for batch in loader:
                    terms = self._train_batch(batch, amp)
                    self.batch_index += 1
                    seen += len(batch["labels"]) * self.world
                    bar.update(1)
                    if self.batch_index % cfg.log_every == 0 or self.batch_index == total:
                        last = {k: v.item() for k, v in terms.items()}
                        rate = seen / (time.perf_counter() - t0)
                        log.write(dict(step=self.batch_index, epoch=epoch, lr=self.optimizer.param_groups[0]["lr"],
                                       images_per_s=rate, **last))
                        bar.set_postfix(loss=f"{last['total']:.3f}", img_s=f"{rate:.1f}")
                    at_boundary = self.batch_index % cfg.accum_steps == 0
                    end_of_epoch = self.batch_index % self.batches_per_epoch == 0
                    periodic = cfg.save_every_steps and self.batch_index % cfg.save_every_steps == 0
                    if at_boundary and (end_of_epoch or periodic or self.batch_index == total):
                        self.save()
                    if self.batch_index >= total:
                        break
        finally:  # an error then starts on its own line, not glued to the bar
            bar.close()
            log.close()
        if self.rank == 0:
            plot_log(self.run_dir)
        self._sync_buffers()
        self.loss_fn.check()  # inputs seen since the loss's last periodic check
        return last

    def _train_batch(self, batch: Dict, amp: bool) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.augment:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + self.batch_index * 101 + self.rank)
            batch = augment(batch, g)
        x = normalize(batch["image"].to(self.device, non_blocking=True), self.model.in_chans)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = self.net(x)
            loss = self.loss_fn(out, batch["labels"].to(self.device), masks=batch["masks"].to(self.device),
                                dist=batch["dist"].to(self.device), teacher_logits=self._teacher_for(batch["id"]))
        (loss.total / cfg.accum_steps).backward()
        self._nonfinite |= ~torch.isfinite(loss.total.detach())
        if (self.batch_index + 1) % cfg.accum_steps == 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
            if bool(self._nonfinite | ~torch.isfinite(norm)):  # one read-back per optimizer step
                self._skip_step()
            else:
                self.bad_steps = 0
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite.zero_()
        return dict(total=loss.total.detach(), **{k: v.detach() for k, v in loss.terms.items()})

    def _skip_step(self) -> None:
        """A non-finite loss or gradient: no update; after ``max_bad_steps`` in a row, stop with one line."""
        self.bad_steps += 1
        if self.bad_steps >= self.cfg.max_bad_steps:
            ckpts = checkpoint_steps(self.run_dir)
            last = f"the last good checkpoint is {list(ckpts.values())[-1]}" if ckpts else "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged: the loss or its gradients were not finite for {self.bad_steps} optimizer steps "
                f"in a row (up to micro-batch {self.batch_index + 1}); {last}. Lower lr (now {self.cfg.lr:g}) "
                f"or set grad_clip")

    def eval_model(self) -> torch.nn.Module:
        """The model to evaluate: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


def plot_log(run_dir: Union[str, Path]) -> Optional[Path]:
    """``<run_dir>/training.png`` from ``log.csv``: the total loss and each weighted-in term against the step."""
    from .viz import line_plot
    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        return None
    steps = [float(r["step"]) for r in rows]
    terms = [k for k in ("total",) + TERMS if k in rows[0] and any(float(r[k]) != 0 for r in rows)]
    series = [dict(name=k, x=steps, y=[float(r[k]) for r in rows]) for k in terms]
    return line_plot(series, Path(run_dir) / "training.png", "training losses (log.csv)", "micro-batch", "loss")


class _Logger:
    """CSV log (``log.csv``) and, when the tensorboard package is installed, TensorBoard events."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled, self.path, self.writer, self.tb = enabled, run_dir / "log.csv", None, None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, row: Dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
