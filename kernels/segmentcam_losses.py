"""SegmentCAM losses and logits (SPEC §3, §4.2): PyTorch reference.

Inputs, all ``(B, C, h, w)`` except labels ``(B, C)``:
heatmap Hm in [0, 1], scores S, anatomical mask M (bool/uint8/float, 1 inside),
distance map Dist (0 inside the mask), labels y in {0, 1}.
An empty mask for (b, c) means "no constraint": M ≡ 1 and Dist ≡ 0 there.
Per-(b, c) terms are averaged over the positive pairs (L_PRX, L_CNF, L_BAS)
or over all pairs (L_AC); a mean over an empty set is 0. Masks and Dist are
constants: no gradient flows to them on either backend.

Input checks that need the data (non-finite Hm/S, labels outside {0, 1}, masks
outside {0, 1}, non-finite Dist) are counted on the device, with no host sync,
into ``SegmentCAMLosses.invalid``; ``raise_if_invalid`` turns the counts into the
clear error. ``validate=True`` does that at once (one small read-back, skipped
while ``torch.compile`` traces); ``ClarityLoss`` defers it to every k-th step.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from ._dispatch import acc_dtype, triton_available, use_triton


class SegmentCAMLosses(NamedTuple):
    """Scalar losses, ``(B, C)`` logits of the SegmentCAM head and ``invalid``: ``(3,)`` counts of
    [non-finite Hm or S values, labels outside {0, 1}, mask values outside {0, 1} or non-finite Dist]."""
    prx: torch.Tensor
    cnf: torch.Tensor
    ac: torch.Tensor
    bas: torch.Tensor
    logits_fg: torch.Tensor
    logits_bg: torch.Tensor
    logits_full: torch.Tensor
    invalid: torch.Tensor


def segmentcam_logits(heatmap: torch.Tensor, scores: torch.Tensor, eps: float = 1e-6,
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground, background and full logits ``(B, C)`` from Hm and S ``(B, C, h, w)`` (SPEC §2)."""
    hm, s = heatmap.flatten(2), scores.flatten(2)
    fg = (hm * s).sum(-1) / (hm.sum(-1) + eps)
    bg = ((1 - hm) * s).sum(-1) / ((1 - hm).sum(-1) + eps)
    return fg, bg, s.mean(-1)


def positive_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of ``values (B, C)`` over pairs with label 1; 0 when there are none."""
    return (values * labels).sum() / labels.sum().clamp(min=1)


def _validate_shapes(heatmap: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     masks: Optional[torch.Tensor], dist: Optional[torch.Tensor]) -> None:
    if heatmap.dim() != 4:
        raise InputError(f"heatmap must be (B, C, h, w), got shape {tuple(heatmap.shape)}")
    if heatmap.numel() == 0:
        raise InputError(f"heatmap must not be empty (B, C, h, w all >= 1), got shape {tuple(heatmap.shape)}")
    for name, t in (("scores", scores), ("masks", masks), ("dist", dist)):
        if t is not None and t.shape != heatmap.shape:
            raise InputError(f"{name} must have the heatmap's shape (B, C, h, w) = {tuple(heatmap.shape)}, "
                             f"got {tuple(t.shape)}")
    if tuple(labels.shape) != tuple(heatmap.shape[:2]):
        raise InputError(f"labels must have shape (B, C) = {tuple(heatmap.shape[:2])}, got {tuple(labels.shape)}")
    if (masks is None) != (dist is None):
        raise InputError("masks and dist must be given together (dist = clarity_fast.priors.distance_map(masks))")
    for name, t in (("heatmap", heatmap), ("scores", scores)):
        if not t.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}")


def raise_if_invalid(invalid: torch.Tensor, where: str = "") -> None:
    """Raise the clear ValueError for ``invalid`` counts (see :class:`SegmentCAMLosses`); one host read."""
    nonfinite, bad_labels, bad_priors = (int(v) for v in invalid.tolist())
    if nonfinite:
        raise InputError(f"heatmap or scores contain {nonfinite} non-finite value(s) (NaN or inf){where}")
    if bad_labels:
        raise InputError(f"labels must contain only 0 and 1; {bad_labels} entries do not{where}")
    if bad_priors:
        raise InputError(f"masks must contain only 0 and 1 (bool, or 0/1 as uint8 or float) and dist must be finite; "
                         f"{bad_priors} entries are not{where}")


def _check_now(invalid: torch.Tensor, validate: bool) -> None:
    if validate and not torch.compiler.is_compiling():
        raise_if_invalid(invalid)


def segmentcam_losses_torch(heatmap: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                            masks: Optional[torch.Tensor] = None, dist: Optional[torch.Tensor] = None,
                            eps: float = 1e-6, from_logits: bool = False, validate: bool = True) -> SegmentCAMLosses:
    """Reference SegmentCAM losses; ``from_logits``: ``heatmap`` holds logits and Hm = sigmoid(heatmap).
    Without masks L_PRX and L_CNF are 0. ``validate`` raises on non-finite inputs or labels outside {0, 1}."""
    _validate_shapes(heatmap, scores, labels, masks, dist)
    bad_priors = heatmap.new_zeros((), dtype=torch.int64)
    if masks is not None:
        masks, dist = masks.detach(), dist.detach()
        bad_priors = ((masks != 0) & (masks != 1)).sum() + (~torch.isfinite(dist)).sum()
    invalid = torch.stack([(~torch.isfinite(heatmap)).sum() + (~torch.isfinite(scores)).sum(),
                           ((labels != 0) & (labels != 1)).sum(), bad_priors])
    _check_now(invalid, validate)
    acc = acc_dtype(heatmap.dtype)  # fp32 sums for fp16/bf16 inputs, as in the kernel
    heatmap, scores = heatmap.to(acc), scores.to(acc)
    if from_logits:
        heatmap = heatmap.sigmoid()
    fg, bg, full = segmentcam_logits(heatmap, scores, eps)
    y = labels.to(heatmap.dtype)
    hm = heatmap.flatten(2)
    hm_sum = hm.sum(-1) + eps
    if masks is None:
        prx = cnf = heatmap.new_zeros(())
    else:
        m = masks.flatten(2).to(heatmap.dtype)
        d = dist.flatten(2).to(heatmap.dtype)
        empty = (m.sum(-1, keepdim=True) == 0)
        m = torch.where(empty, torch.ones_like(m), m)
        d = torch.where(empty, torch.zeros_like(d), d)
        prx = positive_mean((hm * d).sum(-1) / hm_sum, y)
        cnf = positive_mean((hm * (1 - m)).sum(-1) / hm_sum, y)
    ac = hm.mean()
    bas = positive_mean(F.softplus(bg) / (F.softplus(full.detach()) + eps), y)
    return SegmentCAMLosses(prx, cnf, ac, bas, fg, bg, full, invalid)


def segmentcam_losses(heatmap: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                      masks: Optional[torch.Tensor] = None, dist: Optional[torch.Tensor] = None, *,
                      eps: float = 1e-6, from_logits: bool = False, validate: bool = True) -> SegmentCAMLosses:
    """SegmentCAM losses and logits (SPEC §3, §4.2) over ``(B, C, h, w)`` maps.

    heatmap: Hm in [0, 1], or its logits with ``from_logits=True``; scores: S; labels ``(B, C)`` in
    {0, 1}; masks (bool/uint8/float, 1 inside) and dist (fp16/fp32) together or not at all.
    Returns scalar L_PRX, L_CNF, L_AC, L_BAS and ``(B, C)`` ℓ^f, ℓ^b, ℓ^full (fp32; fp64 for fp64).
    CUDA tensors run the fused Triton kernels, CPU tensors the reference. ``validate`` raises a
    ValueError at once on the counts in ``invalid`` (one small read-back, skipped while compiling);
    without it the caller checks them (:func:`raise_if_invalid`).
    """
    _validate_shapes(heatmap, scores, labels, masks, dist)
    if not use_triton(heatmap):
        return segmentcam_losses_torch(heatmap, scores, labels, masks, dist, eps, from_logits, validate)
    if masks is not None:
        masks, dist = masks.detach(), dist.detach()
    losses, logits, _, stats = _triton._seg_fwd_op(heatmap, scores, labels, masks, dist, from_logits, eps)
    invalid = stats[1:].to(torch.int64)
    _check_now(invalid, validate)
    return SegmentCAMLosses(losses[0], losses[1], losses[2], losses[3], logits[0], logits[1], logits[2], invalid)


if triton_available():
    from . import segmentcam_losses_triton as _triton
else:  # pragma: no cover - exercised by hiding triton
    _triton = None
