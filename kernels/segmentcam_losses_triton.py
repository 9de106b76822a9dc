"""Triton kernels of ``segmentcam_losses`` and their autograd (imported only where Triton is installed)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import acc_dtype, interpreter_enabled, tl_dtype

# Forward: one program per (b, c) reads Hm (or its logits), S, M, Dist once and accumulates
# the 8 per-(b, c) sums below; it writes ℓ^f, ℓ^b, ℓ^full and the per-(b, c) terms, and a
# one-program reduce forms the four scalar losses (positive means, 0 on an empty set).
# Backward: one program per (b, c) turns the upstream gradients and the saved sums into
# per-(b, c) coefficients, then writes dHm (or d logits) and dS in one elementwise pass.
# Non-finite inputs and labels outside {0, 1} are counted on the way (no extra pass).

# Rows of the (rows, B*C) buffers the kernels share, named so no offset is a bare number.
# SUMS, saved for backward: the per-(b, c) sums over the h*w positions.
SUM_HM = tl.constexpr(0)      # Σ Hm
SUM_HM_S = tl.constexpr(1)    # Σ Hm·S
SUM_BG = tl.constexpr(2)      # Σ (1-Hm)
SUM_BG_S = tl.constexpr(3)    # Σ (1-Hm)·S
SUM_S = tl.constexpr(4)       # Σ S
SUM_HM_D = tl.constexpr(5)    # Σ Hm·Dist
SUM_HM_OUT = tl.constexpr(6)  # Σ Hm·(1-M)
SUM_M = tl.constexpr(7)       # Σ M
NUM_SUMS = 8
# LOGITS (3, B, C): ℓ^f, ℓ^b, ℓ^full.
LOGIT_FG, LOGIT_BG, LOGIT_FULL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# TERMS (5, B*C): per-(b, c) loss terms before the reduction, and the label.
TERM_PRX, TERM_CNF, TERM_AC, TERM_BAS, TERM_Y = (tl.constexpr(i) for i in range(5))
NUM_TERMS = 5
# FLAGS (3, B*C): non-finite Hm/S values, a label outside {0, 1}, bad prior values (M not 0/1, Dist non-finite).
FLAG_NONFINITE, FLAG_LABEL, FLAG_PRIOR = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
NUM_FLAGS = 3


@triton.jit
def _log1p(z):
    """log(1 + z) for z >= 0, accurate for tiny z: log(u) * z / (u - 1) with u = 1 + z (Goldberg), z when u == 1."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow and without losing exp(x) next to 1 for very negative x."""
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))


@triton.jit
def _to_hm(raw, valid, FROM_LOGITS: tl.constexpr):
    """Hm from what was loaded: the values themselves, or the sigmoid of logits (0 off the valid lanes)."""
    if FROM_LOGITS:
        return tl.where(valid, 1.0 / (1.0 + tl.exp(-raw)), 0.0)
    return raw


@triton.jit
def _load_hm(HM, offs, valid, FROM_LOGITS: tl.constexpr, ACC: tl.constexpr):
    return _to_hm(tl.load(HM + offs, mask=valid, other=0.0).to(ACC), valid, FROM_LOGITS)


@triton.jit
def _ratios(s_hm, s_hms, s_bg, s_bgs, s_s, s_hmd, s_hmo, s_m, HW, eps):
    """Per-(b, c) quantities of SPEC §3 from the sums: ℓ^f, ℓ^b, ℓ^full, the PRX and CNF ratios (0 for an empty
    prior) and the ℓ^f denominator."""
    denom = s_hm + eps
    fg = s_hms / denom
    bg = s_bgs / (s_bg + eps)
    full = s_s / HW
    nonempty = s_m > 0
    prx = tl.where(nonempty, s_hmd / denom, 0.0)
    cnf = tl.where(nonempty, s_hmo / denom, 0.0)
    return fg, bg, full, prx, cnf, denom


@triton.jit
def _is_finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _seg_fwd_kernel(HM, S, M, D, Y, SUMS, LOGITS, TERMS, FLAGS, HW, BC, eps,
                    FROM_LOGITS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One program per (b, c) row: one pass over its h*w positions, then its logits, terms and flags."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * HW
    lanes = tl.arange(0, BLOCK)
    # per-lane partial sums, reduced across lanes after the loop
    a_hm = tl.zeros([BLOCK], ACC)
    a_hms = tl.zeros([BLOCK], ACC)
    a_bg = tl.zeros([BLOCK], ACC)
    a_bgs = tl.zeros([BLOCK], ACC)
    a_s = tl.zeros([BLOCK], ACC)
    a_hmd = tl.zeros([BLOCK], ACC)
    a_hmo = tl.zeros([BLOCK], ACC)
    a_m = tl.zeros([BLOCK], ACC)
    n_bad = tl.zeros([BLOCK], tl.int32)
    n_bad_prior = tl.zeros([BLOCK], tl.int32)
    for start in range(0, HW, BLOCK):
        idx = start + lanes
        valid = idx < HW
        offs = base + idx
        # one load of Hm (or its logits) serves both the sums and the finiteness check
        raw = tl.load(HM + offs, mask=valid, other=0.0).to(ACC)
        hm = _to_hm(raw, valid, FROM_LOGITS)
        s = tl.load(S + offs, mask=valid, other=0.0).to(ACC)
        n_bad += tl.where(valid & ~(_is_finite(raw) & _is_finite(s)), 1, 0)
        bg_w = tl.where(valid, 1.0 - hm, 0.0)  # background weight 1 - Hm (0 off the valid lanes)
        a_hm += hm
        a_hms += hm * s
        a_bg += bg_w
        a_bgs += bg_w * s
        a_s += s
        if HAS_MASK:
            # the anatomical prior: mask M and distance map Dist, for L_PRX and L_CNF
            m = tl.load(M + offs, mask=valid, other=0).to(ACC)
            d = tl.load(D + offs, mask=valid, other=0.0).to(ACC)
            a_hmd += hm * d
            a_hmo += hm * tl.where(valid, 1.0 - m, 0.0)
            a_m += m
            n_bad_prior += tl.where(valid & (((m != 0.0) & (m != 1.0)) | ~_is_finite(d)), 1, 0)
    s_hm = tl.sum(a_hm, 0)
    s_hms = tl.sum(a_hms, 0)
    s_bg = tl.sum(a_bg, 0)
    s_bgs = tl.sum(a_bgs, 0)
    s_s = tl.sum(a_s, 0)
    s_hmd = tl.sum(a_hmd, 0)
    s_hmo = tl.sum(a_hmo, 0)
    s_m = tl.sum(a_m, 0)
    fg, bg, full, prx, cnf, denom = _ratios(s_hm, s_hms, s_bg, s_bgs, s_s, s_hmd, s_hmo, s_m, HW, eps)
    y = tl.load(Y + row).to(ACC)
    bas = _softplus(bg) / (_softplus(full) + eps)
    # save the sums: the backward needs nothing else from the forward
    tl.store(SUMS + SUM_HM * BC + row, s_hm)
    tl.store(SUMS + SUM_HM_S * BC + row, s_hms)
    tl.store(SUMS + SUM_BG * BC + row, s_bg)
    tl.store(SUMS + SUM_BG_S * BC + row, s_bgs)
    tl.store(SUMS + SUM_S * BC + row, s_s)
    tl.store(SUMS + SUM_HM_D * BC + row, s_hmd)
    tl.store(SUMS + SUM_HM_OUT * BC + row, s_hmo)
    tl.store(SUMS + SUM_M * BC + row, s_m)
    tl.store(LOGITS + LOGIT_FG * BC + row, fg)
    tl.store(LOGITS + LOGIT_BG * BC + row, bg)
    tl.store(LOGITS + LOGIT_FULL * BC + row, full)
    # loss terms: PRX, CNF and BAS count on positive labels only; AC on every (b, c)
    tl.store(TERMS + TERM_PRX * BC + row, prx * y)
    tl.store(TERMS + TERM_CNF * BC + row, cnf * y)
    tl.store(TERMS + TERM_AC * BC + row, s_hm / HW)
    tl.store(TERMS + TERM_BAS * BC + row, bas * y)
    tl.store(TERMS + TERM_Y * BC + row, y)
    tl.store(FLAGS + FLAG_NONFINITE * BC + row, tl.sum(n_bad, 0))
    tl.store(FLAGS + FLAG_LABEL * BC + row, tl.where((y != 0) & (y != 1), 1, 0))
    tl.store(FLAGS + FLAG_PRIOR * BC + row, tl.sum(n_bad_prior, 0))


@triton.jit
def _seg_reduce_kernel(TERMS, FLAGS, LOSSES, STATS, BC, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One program: LOSSES = [L_PRX, L_CNF, L_AC, L_BAS]; STATS = [n_pos, n_nonfinite, n_bad_labels,
    n_bad_priors]."""
    lanes = tl.arange(0, BLOCK)
    a_prx = tl.zeros([BLOCK], ACC)
    a_cnf = tl.zeros([BLOCK], ACC)
    a_ac = tl.zeros([BLOCK], ACC)
    a_bas = tl.zeros([BLOCK], ACC)
    a_y = tl.zeros([BLOCK], ACC)
    a_nf = tl.zeros([BLOCK], tl.int32)
    a_lab = tl.zeros([BLOCK], tl.int32)
    a_pri = tl.zeros([BLOCK], tl.int32)
    for start in range(0, BC, BLOCK):
        idx = start + lanes
        valid = idx < BC
        a_prx += tl.load(TERMS + TERM_PRX * BC + idx, mask=valid, other=0.0)
        a_cnf += tl.load(TERMS + TERM_CNF * BC + idx, mask=valid, other=0.0)
        a_ac += tl.load(TERMS + TERM_AC * BC + idx, mask=valid, other=0.0)
        a_bas += tl.load(TERMS + TERM_BAS * BC + idx, mask=valid, other=0.0)
        a_y += tl.load(TERMS + TERM_Y * BC + idx, mask=valid, other=0.0)
        a_nf += tl.load(FLAGS + FLAG_NONFINITE * BC + idx, mask=valid, other=0)
        a_lab += tl.load(FLAGS + FLAG_LABEL * BC + idx, mask=valid, other=0)
        a_pri += tl.load(FLAGS + FLAG_PRIOR * BC + idx, mask=valid, other=0)
    # positive means (0 on an empty set), AC over every (b, c)
    n_pos = tl.sum(a_y, 0)
    inv = 1.0 / tl.maximum(n_pos, 1.0)
    tl.store(LOSSES, tl.sum(a_prx, 0) * inv)
    tl.store(LOSSES + 1, tl.sum(a_cnf, 0) * inv)
    tl.store(LOSSES + 2, tl.sum(a_ac, 0) / BC)
    tl.store(LOSSES + 3, tl.sum(a_bas, 0) * inv)
    tl.store(STATS, n_pos)
    tl.store(STATS + 1, tl.sum(a_nf, 0).to(ACC))
    tl.store(STATS + 2, tl.sum(a_lab, 0).to(ACC))
    tl.store(STATS + 3, tl.sum(a_pri, 0).to(ACC))


@triton.jit
def _seg_bwd_kernel(HM, S, M, D, Y, SUMS, STATS, G_LOSSES, G_LOGITS, DHM, DS, HW, BC, eps,
                    FROM_LOGITS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G_LOGITS: tl.constexpr,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One program per (b, c) row: per-row coefficients from the saved sums, then one elementwise pass."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * HW
    # the forward's per-(b, c) quantities, recomputed from its saved sums
    s_hm = tl.load(SUMS + SUM_HM * BC + row)
    s_hms = tl.load(SUMS + SUM_HM_S * BC + row)
    s_bg = tl.load(SUMS + SUM_BG * BC + row)
    s_bgs = tl.load(SUMS + SUM_BG_S * BC + row)
    s_s = tl.load(SUMS + SUM_S * BC + row)
    s_hmd = tl.load(SUMS + SUM_HM_D * BC + row)
    s_hmo = tl.load(SUMS + SUM_HM_OUT * BC + row)
    s_m = tl.load(SUMS + SUM_M * BC + row)
    fg, bg, full, prx, cnf, denom = _ratios(s_hm, s_hms, s_bg, s_bgs, s_s, s_hmd, s_hmo, s_m, HW, eps)
    denom_bg = s_bg + eps
    nonempty = s_m > 0
    y = tl.load(Y + row).to(ACC)
    # upstream gradients of the four losses, scaled as the reduction scaled each term (STATS[0] = n_pos)
    inv_pos = 1.0 / tl.maximum(tl.load(STATS), 1.0)
    c_prx = tl.load(G_LOSSES).to(ACC) * y * inv_pos
    c_cnf = tl.load(G_LOSSES + 1).to(ACC) * y * inv_pos
    c_ac = tl.load(G_LOSSES + 2).to(ACC) / BC
    c_bas = tl.load(G_LOSSES + 3).to(ACC) * y * inv_pos
    g_fg = 0.0
    g_bg = 0.0
    g_full = 0.0
    if HAS_G_LOGITS:
        g_fg = tl.load(G_LOGITS + LOGIT_FG * BC + row).to(ACC)
        g_bg = tl.load(G_LOGITS + LOGIT_BG * BC + row).to(ACC)
        g_full = tl.load(G_LOGITS + LOGIT_FULL * BC + row).to(ACC)
    # d L_BAS / d ℓ^b through softplus(ℓ^b) / (softplus(ℓ^full) + eps)
    dsp_bg = tl.where(bg > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-bg)))
    d_bg = g_bg + c_bas * dsp_bg / (_softplus(full) + eps)
    # gradients of the loss with respect to each per-(b, c) sum
    k_hm = (-g_fg * fg - c_prx * prx - c_cnf * cnf) / denom + c_ac / HW
    k_hms = g_fg / denom
    k_bg = -d_bg * bg / denom_bg
    k_bgs = d_bg / denom_bg
    k_s = g_full / HW
    k_hmd = tl.where(nonempty, c_prx / denom, 0.0)
    k_hmo = tl.where(nonempty, c_cnf / denom, 0.0)
    # chain rule through every sum, position by position: dHm and dS
    lanes = tl.arange(0, BLOCK)
    for start in range(0, HW, BLOCK):
        idx = start + lanes
        valid = idx < HW
        offs = base + idx
        hm = _load_hm(HM, offs, valid, FROM_LOGITS, ACC)
        s = tl.load(S + offs, mask=valid, other=0.0).to(ACC)
        dhm = k_hm + (k_hms - k_bgs) * s - k_bg
        if HAS_MASK:
            m = tl.load(M + offs, mask=valid, other=0).to(ACC)
            d = tl.load(D + offs, mask=valid, other=0.0).to(ACC)
            dhm += k_hmd * d + k_hmo * (1.0 - m)
        ds = k_hms * hm + k_bgs * (1.0 - hm) + k_s
        if FROM_LOGITS:  # through the sigmoid: dHm/dlogit = Hm (1 - Hm)
            dhm = dhm * hm * (1.0 - hm)
        tl.store(DHM + offs, dhm.to(DHM.dtype.element_ty), mask=valid)
        tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=valid)


def _block(hw: int) -> int:
    return 128 if interpreter_enabled() else min(1024, max(128, triton.next_power_of_2(hw)))


def _mask_pointer(masks: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    if masks is None:
        return fallback
    masks = masks.contiguous()
    return masks.view(torch.uint8) if masks.dtype == torch.bool else masks


@torch.library.custom_op("clarity_fast::segmentcam_losses_fwd", mutates_args=())
def _seg_fwd_op(heatmap: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor],
                dist: Optional[torch.Tensor], from_logits: bool, eps: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, h, w = heatmap.shape
    HW, BC = h * w, B * C
    acc = acc_dtype(heatmap.dtype)
    hm, s, y = heatmap.contiguous(), scores.contiguous(), labels.contiguous()
    m = _mask_pointer(masks, hm)
    d = dist.contiguous() if dist is not None else hm
    sums = torch.empty((NUM_SUMS, BC), dtype=acc, device=hm.device)
    logits = torch.empty((3, B, C), dtype=acc, device=hm.device)
    terms = torch.empty((NUM_TERMS, BC), dtype=acc, device=hm.device)
    flags = torch.empty((NUM_FLAGS, BC), dtype=torch.int32, device=hm.device)
    _seg_fwd_kernel[(BC,)](hm, s, m, d, y, sums, logits, terms, flags, HW, BC, eps, FROM_LOGITS=from_logits,
                           HAS_MASK=masks is not None, BLOCK=_block(HW), ACC=tl_dtype(acc))
    losses = torch.empty((4,), dtype=acc, device=hm.device)
    stats = torch.empty((4,), dtype=acc, device=hm.device)
    _seg_reduce_kernel[(1,)](terms, flags, losses, stats, BC, BLOCK=_block(BC), ACC=tl_dtype(acc))
    return losses, logits, sums, stats


@_seg_fwd_op.register_fake
def _(heatmap, scores, labels, masks, dist, from_logits, eps):
    B, C = heatmap.shape[:2]
    acc = acc_dtype(heatmap.dtype)
    return (heatmap.new_empty((4,), dtype=acc), heatmap.new_empty((3, B, C), dtype=acc),
            heatmap.new_empty((NUM_SUMS, B * C), dtype=acc), heatmap.new_empty((4,), dtype=acc))


@torch.library.custom_op("clarity_fast::segmentcam_losses_bwd", mutates_args=())
def _seg_bwd_op(g_losses: torch.Tensor, g_logits: Optional[torch.Tensor], heatmap: torch.Tensor,
                scores: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor],
                dist: Optional[torch.Tensor], sums: torch.Tensor, stats: torch.Tensor, from_logits: bool,
                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    B, C, h, w = heatmap.shape
    HW, BC = h * w, B * C
    acc = acc_dtype(heatmap.dtype)
    hm, s, y = heatmap.contiguous(), scores.contiguous(), labels.contiguous()
    dhm, ds = torch.empty_like(hm), torch.empty_like(s)
    g_logits_ptr = g_logits.contiguous() if g_logits is not None else sums
    _seg_bwd_kernel[(BC,)](hm, s, _mask_pointer(masks, hm), dist.contiguous() if dist is not None else hm, y, sums,
                           stats, g_losses.contiguous(), g_logits_ptr, dhm, ds, HW, BC, eps, FROM_LOGITS=from_logits,
                           HAS_MASK=masks is not None, HAS_G_LOGITS=g_logits is not None, BLOCK=_block(HW),
                           ACC=tl_dtype(acc))
    return dhm, ds


@_seg_bwd_op.register_fake
def _(g_losses, g_logits, heatmap, scores, labels, masks, dist, sums, stats, from_logits, eps):
    return torch.empty_like(heatmap), torch.empty_like(scores)


def _seg_setup_context(ctx, inputs, output):
    heatmap, scores, labels, masks, dist, from_logits, eps = inputs
    _, _, sums, stats = output
    ctx.save_for_backward(heatmap, scores, labels, masks, dist, sums, stats)
    ctx.from_logits, ctx.eps = from_logits, eps


def _seg_backward(ctx, g_losses, g_logits, g_sums, g_stats):
    heatmap, scores, labels, masks, dist, sums, stats = ctx.saved_tensors
    if g_losses is None:
        g_losses = torch.zeros((4,), dtype=sums.dtype, device=sums.device)
    dhm, ds = _seg_bwd_op(g_losses, g_logits, heatmap, scores, labels, masks, dist, sums, stats,
                          ctx.from_logits, ctx.eps)
    return dhm, ds, None, None, None, None, None


_seg_fwd_op.register_autograd(_seg_backward, setup_context=_seg_setup_context)
