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
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2

from .clarity import Clarity
from .data import augment, collate, normalize
from .losses import ClarityLoss
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
    xi_tune_at: Optional[float] = None  # evaluation: tune ξ for the mean IoU accuracy over T (None) or at one T

    def validate(self) -> "TrainConfig":
        for name in ("batch_size", "accum_steps", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dataset not in ("phantom", "nih"):
            raise ValueError(f"dataset must be 'phantom' or 'nih', got {self.dataset!r}")
        _check_keys("model_args", self.model_args, Clarity.__init__)
        _check_keys("loss", self.loss, ClarityLoss.__init__)
        return self


def _check_keys(name: str, values: Dict, fn) -> None:
    known = set(inspect.signature(fn).parameters) - {"self"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {name} keys {unknown}; known: {sorted(known)}")


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                base: Optional[TrainConfig] = None) -> TrainConfig:
    """A config from defaults (or ``base``), then a YAML file, then ``key=value`` overrides
    (values parsed as YAML; nested keys as ``loss.lambda_oct=0.2``)."""
    values = dataclasses.asdict(base or TrainConfig())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
        for k, v in loaded.items():
            _set(values, k, v)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set(values, key.strip(), yaml.safe_load(raw))
    return TrainConfig(**values).validate()


def _set(values: Dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if head not in values:
        raise ValueError(f"unknown config key {head!r}; known keys: {sorted(values)}")
    if rest:
        if not isinstance(values[head], dict):
            raise ValueError(f"config key {head!r} has no sub-keys (got {key!r})")
        values[head] = dict(values[head], **{rest: value})
    else:
        default = getattr(TrainConfig, head, None) if not isinstance(values[head], dict) else None
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"config key {head!r} must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"config key {head!r} must be a number, got {value!r}")
            value = type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
        values[head] = value


def save_config(cfg: TrainConfig, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# ------------------------------------------------------------------------------------------- checkpoints
LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Union[str, Path], model: torch.nn.Module, state: Dict, keep: int = 2) -> Path:
    """Write ``ckpt-<step>/`` (model.safetensors + trainer_state.pt) completely, then point
    ``latest`` at it with an atomic rename: a write killed midway leaves the previous one loadable."""
    run_dir = Path(run_dir)
    name = f"ckpt-{state['step']:08d}"
    tmp = run_dir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(state["step"])})
    torch.save(state, tmp / "trainer_state.pt")
    final = run_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / LATEST, name)
    for old in sorted(run_dir.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Union[str, Path]) -> Path:
    """The checkpoint folder ``latest`` points at (FileNotFoundError with a clear message if none)."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (no '{LATEST}' file)")
    ckpt = run_dir / pointer.read_text().strip()
    if not (ckpt / "model.safetensors").is_file() or not (ckpt / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} named by {pointer} is incomplete")
    return ckpt


def load_model_weights(model: torch.nn.Module, path: Union[str, Path]) -> torch.nn.Module:
    """Load a run folder (its latest checkpoint), a checkpoint folder or a .safetensors/.pth file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a run folder, a checkpoint folder or a weights file)")
    if path.is_dir():
        path = (latest_checkpoint(path) if (path / LATEST).exists() else path) / "model.safetensors"
    if path.suffix == ".safetensors":
        model.load_state_dict(load_file(str(path)), strict=True)
        return model
    return load_pretrained(model, path)


# ------------------------------------------------------------------------------------------------ trainer
def _device(name: str) -> torch.device:
    if name == "auto":  # under torchrun, the device this process was given (torch.cuda.set_device)
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


class _Outputs(torch.nn.Module):
    """Routes ``forward`` to ``forward_outputs`` so that DDP sees the call that produces the loss."""

    def __init__(self, model: Clarity) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_outputs(x)


class Trainer:
    """Trains a CLARiTy model on ``train_set`` (samples as in :mod:`clarity_fast.data`)."""

    def __init__(self, cfg: TrainConfig, train_set, teacher: Optional[Dict[str, torch.Tensor]] = None,
                 progress: bool = True) -> None:
        self.cfg = cfg.validate()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = _device(cfg.device)
        self.progress = progress and self.rank == 0
        torch.manual_seed(cfg.seed)
        self.model = create_model(cfg.model, pretrained=cfg.pretrained, drop_path_rate=cfg.drop_path,
                                  **cfg.model_args).to(self.device)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.train_set, self.teacher = train_set, teacher
        self.loss_fn = ClarityLoss(**cfg.loss)
        self.batches_per_epoch = len(train_set) // (cfg.batch_size * self.world)
        if self.batches_per_epoch < cfg.accum_steps:
            raise ValueError(f"the training set ({len(train_set)} images) is too small for batch_size="
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
        self.run_dir = Path(cfg.output_dir)

    # ------------------------------------------------------------------ state
    def state(self) -> Dict:
        return dict(step=self.batch_index, optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), ema=self.ema.state_dict() if self.ema else None,
                    rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                             cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None),
                    config=dataclasses.asdict(self.cfg))

    def save(self) -> Optional[Path]:
        if self.rank != 0:
            return None
        return save_checkpoint(self.run_dir, self.model, self.state())

    def resume(self, path: Optional[Union[str, Path]] = None) -> None:
        """Continue exactly from the latest checkpoint of ``path`` (default: this run's folder)."""
        ckpt = latest_checkpoint(path or self.run_dir)
        self.model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(self.device)))
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.batch_index = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

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
            raise ValueError(f"teacher logits are missing for images {missing[:3]}")
        return torch.stack([self.teacher[i] for i in ids]).to(self.device)

    # ------------------------------------------------------------------ train
    def fit(self) -> Dict[str, float]:
        """Train until ``epochs`` (or ``max_steps`` micro-batches); returns the last logged terms."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        log = _Logger(self.run_dir, enabled=self.rank == 0)
        total = cfg.epochs * self.batches_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        bar = tqdm(total=total, initial=self.batch_index, desc="training", disable=not self.progress, unit="batch")
        amp = cfg.amp and self.device.type == "cuda"
        last: Dict[str, float] = {}
        t0, seen = time.perf_counter(), 0
        self.model.train()
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
        bar.close()
        log.close()
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
        if (self.batch_index + 1) % cfg.accum_steps == 0:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model)
        return dict(total=loss.total.detach(), **{k: v.detach() for k, v in loss.terms.items()})

    def eval_model(self) -> torch.nn.Module:
        """The model to evaluate: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


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
