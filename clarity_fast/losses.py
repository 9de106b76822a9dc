"""The CLARiTy training loss (SPEC §3): weighted sum of every term, each also returned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clarity import ClarityOutput
from .errors import InputError
from .kernels import SegmentCAMLosses, segmentcam_losses
from .kernels.segmentcam_losses import raise_if_invalid
from .priors import distance_map

OCT_MODES = ("oct", "cct")
TERMS = ("cls", "kd", "oct", "prx", "cnf", "ac", "bas")


def oct_loss(class_states: torch.Tensor, mode: str = "oct") -> torch.Tensor:
    """Class-token loss over ``(q, B, C, D)`` states (SPEC §2, our reading).

    ``"oct"``: mean over blocks, images and pairs i != j of the squared cosine (towards orthogonal);
    ``"cct"``: mean cosine (contrastive, towards negative). 0 when C = 1.
    """
    if mode not in OCT_MODES:
        raise InputError(f"mode must be one of {OCT_MODES}, got {mode!r}")
    C = class_states.shape[-2]
    if C < 2:
        return class_states.new_zeros(())
    t = F.normalize(class_states.float(), dim=-1)
    gram = t @ t.transpose(-2, -1)
    off = ~torch.eye(C, dtype=torch.bool, device=gram.device)
    g = gram[..., off]
    return (g * g).mean() if mode == "oct" else g.mean()


class SegmentCAMLoss(nn.Module):
    """Thin module over :func:`clarity_fast.kernels.segmentcam_losses` (fused on CUDA):
    ``forward(heatmap, scores, labels, masks=None, dist=None) -> SegmentCAMLosses``. With
    ``from_logits`` (the default) ``heatmap`` holds the heatmap logits, so the sigmoid's backward is
    fused and exact (no 1/ε gradients through a separate sigmoid in fp16)."""

    def __init__(self, eps: float = 1e-6, from_logits: bool = True, validate: bool = True) -> None:
        super().__init__()
        self.eps, self.from_logits, self.validate = eps, from_logits, validate

    def forward(self, heatmap: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                masks: Optional[torch.Tensor] = None, dist: Optional[torch.Tensor] = None) -> SegmentCAMLosses:
        return segmentcam_losses(heatmap, scores, labels, masks, dist, eps=self.eps, from_logits=self.from_logits,
                                 validate=self.validate)


@dataclass
class LossOutput:
    """``total``: the weighted sum (scalar); ``terms``: every unweighted term by name (scalars)."""
    total: torch.Tensor
    terms: Dict[str, torch.Tensor]


def _check_map(name: str, t: Optional[torch.Tensor], expected: torch.Size) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise InputError(f"{name} must have shape (B, C, h, w) = {tuple(expected)}, got {tuple(t.shape)}")


class ClarityLoss(nn.Module):
    """CLARiTy loss. ``forward(out, targets, masks=None, dist=None, teacher_logits=None) -> LossOutput``.

    out: :class:`ClarityOutput` of ``model.forward_outputs``; targets ``(B, C)`` in {0, 1};
    masks ``(B, C, h, w)`` anatomical priors at grid resolution (bool/uint8/float); dist
    ``(B, C, h, w)`` their distance maps (computed from masks when None); teacher_logits ``(B, C)``.
    Weights default to SPEC §3; ``cls_pos_weight`` (default 1: SPEC's BCE) weights the positive labels in
    L_cls; ``oct_mode`` is ``"oct"`` or the ``"cct"`` ablation. The
    SegmentCAM terms are computed from ``out.heatmap_logits`` (exact gradients in fp16 too).
    ``validate`` raises a ValueError on labels outside {0, 1}, non-finite heatmaps/scores, masks
    outside {0, 1} or non-finite dist. The checks are counted on the device and read back on the
    first call and every ``validate_every`` calls after (no host sync on the other steps; never
    while ``torch.compile`` traces); :meth:`check` reads them back at any time.
    """

    def __init__(self, lambda_cls: float = 1.0, lambda_kd: float = 1.0, lambda_oct: float = 0.1,
                 lambda_prx: float = 0.5, lambda_cnf: float = 0.5, lambda_ac: float = 0.1,
                 lambda_bas: float = 0.5, oct_mode: str = "oct", kd_temperature: float = 1.0,
                 cls_pos_weight: float = 1.0, eps: float = 1e-6, validate: bool = True,
                 validate_every: int = 25) -> None:
        super().__init__()
        if not cls_pos_weight > 0:
            raise InputError(f"cls_pos_weight must be > 0, got {cls_pos_weight}")
        if validate_every < 1:
            raise InputError(f"validate_every must be >= 1, got {validate_every}")
        if oct_mode not in OCT_MODES:
            raise InputError(f"oct_mode must be one of {OCT_MODES}, got {oct_mode!r}")
        if kd_temperature <= 0:
            raise InputError(f"kd_temperature must be > 0, got {kd_temperature}")
        self.weights = dict(cls=lambda_cls, kd=lambda_kd, oct=lambda_oct, prx=lambda_prx, cnf=lambda_cnf,
                            ac=lambda_ac, bas=lambda_bas)
        self.oct_mode = oct_mode
        self.kd_temperature = kd_temperature
        self.cls_pos_weight = cls_pos_weight
        self.validate, self.validate_every = validate, validate_every
        self.segmentcam = SegmentCAMLoss(eps=eps, from_logits=True, validate=False)
        self._invalid: Optional[torch.Tensor] = None  # counts since the last check, on the device
        self._unchecked = 0  # calls since the last check
        self._calls = 0

    def check(self) -> None:
        """Raise the clear ValueError if any call since the last check saw invalid inputs (one host read)."""
        invalid, calls = self._invalid, self._unchecked
        self._invalid, self._unchecked = None, 0
        if invalid is not None:
            raise_if_invalid(invalid, f" (in one of the last {calls} loss calls)" if calls > 1 else "")

    def forward(self, out: ClarityOutput, targets: torch.Tensor, masks: Optional[torch.Tensor] = None,
                dist: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None) -> LossOutput:
        expected = tuple(out.logits_cls.shape)
        if tuple(targets.shape) != expected:
            raise InputError(f"targets must have shape (B, C) = {expected}, got {tuple(targets.shape)}")
        if teacher_logits is not None and tuple(teacher_logits.shape) != expected:
            raise InputError(f"teacher_logits must have shape (B, C) = {expected}, "
                             f"got {tuple(teacher_logits.shape)}")
        if dist is not None and masks is None:
            raise InputError("dist was given without masks; pass the masks it was computed from")
        y = targets.float()
        seg = None
        if out.scores is not None:
            if out.heatmap_logits is None:
                raise InputError("out.heatmap_logits is needed for the SegmentCAM losses (ClarityOutput from "
                                 "Clarity.forward_outputs has it)")
            _check_map("masks", masks, out.heatmap_logits.shape)
            _check_map("dist", dist, out.heatmap_logits.shape)
            if masks is not None and dist is None:
                dist = distance_map(masks)
            seg = self.segmentcam(out.heatmap_logits, out.scores, y, masks, dist)
            if out.logits_fg is None:  # left by forward_outputs(segmentcam_logits=False): fill in, computed once
                out.logits_fg, out.logits_bg, out.logits_full = seg.logits_fg, seg.logits_bg, seg.logits_full
                out.logits = (out.logits_cls.float() + seg.logits_fg) / 2
        zero = out.logits_cls.new_zeros((), dtype=torch.float32)
        terms = dict.fromkeys(TERMS, zero)
        pos_weight = None if self.cls_pos_weight == 1.0 else y.new_tensor(self.cls_pos_weight)
        terms["cls"] = F.binary_cross_entropy_with_logits(out.logits_cls.float(), y, pos_weight=pos_weight)
        if out.logits_fg is not None:
            terms["cls"] = terms["cls"] + F.binary_cross_entropy_with_logits(out.logits_fg.float(), y,
                                                                             pos_weight=pos_weight)
        if teacher_logits is not None:
            soft = torch.sigmoid(teacher_logits.float() / self.kd_temperature)
            terms["kd"] = F.binary_cross_entropy_with_logits(out.logits.float(), soft)
        if out.class_states is not None:
            terms["oct"] = oct_loss(out.class_states, self.oct_mode)
        if seg is not None:
            terms.update(prx=seg.prx, cnf=seg.cnf, ac=seg.ac, bas=seg.bas)
        if self.validate:
            if seg is not None:
                self._record(seg.invalid)
            else:  # no SegmentCAM: only the labels to count
                none = torch.zeros((), dtype=torch.int64, device=y.device)
                self._record(torch.stack([none, ((y != 0) & (y != 1)).sum(), none]))
        total = sum(self.weights[k] * v for k, v in terms.items())
        return LossOutput(total=total, terms=terms)

    def _record(self, invalid: torch.Tensor) -> None:
        self._invalid = invalid if self._invalid is None else self._invalid + invalid
        if torch.compiler.is_compiling():
            return
        self._calls += 1
        self._unchecked += 1
        if self._calls == 1 or self._calls % self.validate_every == 0:
            self.check()
