"""The CLARiTy training loss (SPEC §3): weighted sum of every term, each also returned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clarity import ClarityOutput
from .kernels import SegmentCAMLosses, segmentcam_losses
from .priors import distance_map

OCT_MODES = ("oct", "cct")
TERMS = ("cls", "kd", "oct", "prx", "cnf", "ac", "bas")


def oct_loss(class_states: torch.Tensor, mode: str = "oct") -> torch.Tensor:
    """Class-token loss over ``(q, B, C, D)`` states (SPEC §2, our reading).

    ``"oct"``: mean over blocks, images and pairs i != j of the squared cosine (towards orthogonal);
    ``"cct"``: mean cosine (contrastive, towards negative). 0 when C = 1.
    """
    if mode not in OCT_MODES:
        raise ValueError(f"mode must be one of {OCT_MODES}, got {mode!r}")
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
    ``forward(heatmap, scores, labels, masks=None, dist=None) -> SegmentCAMLosses``."""

    def __init__(self, eps: float = 1e-6, from_logits: bool = False, validate: bool = True) -> None:
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
        raise ValueError(f"{name} must have shape (B, C, h, w) = {tuple(expected)}, got {tuple(t.shape)}")


class ClarityLoss(nn.Module):
    """CLARiTy loss. ``forward(out, targets, masks=None, dist=None, teacher_logits=None) -> LossOutput``.

    out: :class:`ClarityOutput` of ``model.forward_outputs``; targets ``(B, C)`` in {0, 1};
    masks ``(B, C, h, w)`` anatomical priors at grid resolution (bool/uint8/float); dist
    ``(B, C, h, w)`` their distance maps (computed from masks when None); teacher_logits ``(B, C)``.
    Weights default to SPEC §3; ``oct_mode`` is ``"oct"`` or the ``"cct"`` ablation.
    ``validate`` raises a ValueError on labels outside {0, 1} or non-finite heatmaps/scores
    (a few bytes read back per step; turn it off once a pipeline is trusted).
    """

    def __init__(self, lambda_cls: float = 1.0, lambda_kd: float = 1.0, lambda_oct: float = 0.1,
                 lambda_prx: float = 0.5, lambda_cnf: float = 0.5, lambda_ac: float = 0.1,
                 lambda_bas: float = 0.5, oct_mode: str = "oct", kd_temperature: float = 1.0,
                 eps: float = 1e-6, validate: bool = True) -> None:
        super().__init__()
        if oct_mode not in OCT_MODES:
            raise ValueError(f"oct_mode must be one of {OCT_MODES}, got {oct_mode!r}")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
        self.weights = dict(cls=lambda_cls, kd=lambda_kd, oct=lambda_oct, prx=lambda_prx, cnf=lambda_cnf,
                            ac=lambda_ac, bas=lambda_bas)
        self.oct_mode = oct_mode
        self.kd_temperature = kd_temperature
        self.validate = validate
        self.segmentcam = SegmentCAMLoss(eps=eps, validate=validate)

    def forward(self, out: ClarityOutput, targets: torch.Tensor, masks: Optional[torch.Tensor] = None,
                dist: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None) -> LossOutput:
        if tuple(targets.shape) != tuple(out.logits.shape):
            raise ValueError(f"targets must have shape (B, C) = {tuple(out.logits.shape)}, got {tuple(targets.shape)}")
        if teacher_logits is not None and tuple(teacher_logits.shape) != tuple(out.logits.shape):
            raise ValueError(f"teacher_logits must have shape (B, C) = {tuple(out.logits.shape)}, "
                             f"got {tuple(teacher_logits.shape)}")
        if dist is not None and masks is None:
            raise ValueError("dist was given without masks; pass the masks it was computed from")
        y = targets.float()
        if self.validate and out.heatmap is None and not ((y == 0) | (y == 1)).all():
            raise ValueError("targets must contain only 0 and 1")
        zero = out.logits.new_zeros((), dtype=torch.float32)
        terms = dict.fromkeys(TERMS, zero)
        terms["cls"] = F.binary_cross_entropy_with_logits(out.logits_cls.float(), y)
        if out.logits_fg is not None:
            terms["cls"] = terms["cls"] + F.binary_cross_entropy_with_logits(out.logits_fg.float(), y)
        if teacher_logits is not None:
            soft = torch.sigmoid(teacher_logits.float() / self.kd_temperature)
            terms["kd"] = F.binary_cross_entropy_with_logits(out.logits.float(), soft)
        if out.class_states is not None:
            terms["oct"] = oct_loss(out.class_states, self.oct_mode)
        if out.heatmap is not None:
            _check_map("masks", masks, out.heatmap.shape)
            _check_map("dist", dist, out.heatmap.shape)
            if masks is not None and dist is None:
                dist = distance_map(masks)
            seg = self.segmentcam(out.heatmap, out.scores, y, masks, dist)
            terms.update(prx=seg.prx, cnf=seg.cnf, ac=seg.ac, bas=seg.bas)
        total = sum(self.weights[k] * v for k, v in terms.items())
        return LossOutput(total=total, terms=terms)
