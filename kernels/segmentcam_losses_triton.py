"""Triton kernels of ``segmentcam_losses`` and their autograd (imported only where Triton is installed)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import interpreter_enabled
from .segmentcam_losses import _acc_dtype

# Forward: one program per (b, c) reads Hm (or its logits), S, M, Dist once and accumulates
# the 8 per-(b, c) sums below; it writes ℓ^f, ℓ^b, ℓ^full and the per-(b, c) terms, and a
# one-program reduce forms the four scalar losses (positive means, 0 on an empty set).
# Backward: one program per (b, c) turns the upstream gradients and the saved sums into
# per-(b, c) coefficients, then writes dHm (or d logits) and dS in one elementwise pass.
# Non-finite inputs and labels outside {0, 1} are counted on the way (no extra pass).

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}
# saved per-(b, c) sums, one row each: Σ Hm, Σ Hm·S, Σ (1-Hm), Σ (1-Hm)·S, Σ S, Σ Hm·Dist, Σ Hm·(1-M), Σ M
NUM_SUMS = 8


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
def _seg_fwd_kernel(HM, S, M, D, Y, SUMS, LOGITS, TERMS, FLAGS, HW, BC, eps,
                    FROM_LOGITS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    a_hm = tl.zeros([BLOCK], ACC)
    a_hms = tl.zeros([BLOCK], ACC)
    a_1m = tl.zeros([BLOCK], ACC)
    a_1ms = tl.zeros([BLOCK], ACC)
    a_s = tl.zeros([BLOCK], ACC)
    a_hmd = tl.zeros([BLOCK], ACC)
    a_hmo = tl.zeros([BLOCK], ACC)
    a_m = tl.zeros([BLOCK], ACC)
    n_bad = tl.zeros([BLOCK], tl.int32)
    n_bad_prior = tl.zeros([BLOCK], tl.int32)
    for start in range(0, HW, BLOCK):
        idx = start + lanes
        valid = idx < HW
        offs = row * HW + idx
        raw = tl.load(HM + offs, mask=valid, other=0.0).to(ACC)
        hm = _to_hm(raw, valid, FROM_LOGITS)  # one load: raw is also checked for finiteness below
        s = tl.load(S + offs, mask=valid, other=0.0).to(ACC)
        finite = (raw == raw) & (tl.abs(raw) < float("inf")) & (s == s) & (tl.abs(s) < float("inf"))
        n_bad += tl.where(valid & ~finite, 1, 0)
        one_m_hm = tl.where(valid, 1.0 - hm, 0.0)
        a_hm += hm
        a_hms += hm * s
        a_1m += one_m_hm
        a_1ms += one_m_hm * s
        a_s += s
        if HAS_MASK:
            m = tl.load(M + offs, mask=valid, other=0).to(ACC)
            d = tl.load(D + offs, mask=valid, other=0.0).to(ACC)
            a_hmd += hm * d
            a_hmo += hm * tl.where(valid, 1.0 - m, 0.0)
            a_m += m
            d_ok = (d == d) & (tl.abs(d) < float("inf"))
            n_bad_prior += tl.where(valid & (((m != 0.0) & (m != 1.0)) | ~d_ok), 1, 0)
    s_hm = tl.sum(a_hm, 0)
    s_hms = tl.sum(a_hms, 0)
    s_1m = tl.sum(a_1m, 0)
    s_1ms = tl.sum(a_1ms, 0)
    s_s = tl.sum(a_s, 0)
    s_hmd = tl.sum(a_hmd, 0)
    s_hmo = tl.sum(a_hmo, 0)
    s_m = tl.sum(a_m, 0)
    y = tl.load(Y + row).to(ACC)
    denom = s_hm + eps
    fg = s_hms / denom
    bg = s_1ms / (s_1m + eps)
    full = s_s / HW
    nonempty = s_m > 0
    prx = tl.where(nonempty, s_hmd / denom, 0.0)
    cnf = tl.where(nonempty, s_hmo / denom, 0.0)
    bas = _softplus(bg) / (_softplus(full) + eps)
    tl.store(SUMS + row, s_hm)
    tl.store(SUMS + 1 * BC + row, s_hms)
    tl.store(SUMS + 2 * BC + row, s_1m)
    tl.store(SUMS + 3 * BC + row, s_1ms)
    tl.store(SUMS + 4 * BC + row, s_s)
    tl.store(SUMS + 5 * BC + row, s_hmd)
    tl.store(SUMS + 6 * BC + row, s_hmo)
    tl.store(SUMS + 7 * BC + row, s_m)
    tl.store(LOGITS + row, fg)
    tl.store(LOGITS + BC + row, bg)
    tl.store(LOGITS + 2 * BC + row, full)
    tl.store(TERMS + row, prx * y)
    tl.store(TERMS + BC + row, cnf * y)
    tl.store(TERMS + 2 * BC + row, s_hm / HW)
    tl.store(TERMS + 3 * BC + row, bas * y)
    tl.store(TERMS + 4 * BC + row, y)
    tl.store(FLAGS + row, tl.sum(n_bad, 0))
    tl.store(FLAGS + BC + row, tl.where((y != 0) & (y != 1), 1, 0))
    tl.store(FLAGS + 2 * BC + row, tl.sum(n_bad_prior, 0))


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
        a_prx += tl.load(TERMS + idx, mask=valid, other=0.0)
        a_cnf += tl.load(TERMS + BC + idx, mask=valid, other=0.0)
        a_ac += tl.load(TERMS + 2 * BC + idx, mask=valid, other=0.0)
        a_bas += tl.load(TERMS + 3 * BC + idx, mask=valid, other=0.0)
        a_y += tl.load(TERMS + 4 * BC + idx, mask=valid, other=0.0)
        a_nf += tl.load(FLAGS + idx, mask=valid, other=0)
        a_lab += tl.load(FLAGS + BC + idx, mask=valid, other=0)
        a_pri += tl.load(FLAGS + 2 * BC + idx, mask=valid, other=0)
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
    row = tl.program_id(0)
    s_hm = tl.load(SUMS + row)
    s_hms = tl.load(SUMS + BC + row)
    s_1m = tl.load(SUMS + 2 * BC + row)
    s_1ms = tl.load(SUMS + 3 * BC + row)
    s_s = tl.load(SUMS + 4 * BC + row)
    s_hmd = tl.load(SUMS + 5 * BC + row)
    s_hmo = tl.load(SUMS + 6 * BC + row)
    s_m = tl.load(SUMS + 7 * BC + row)
    y = tl.load(Y + row).to(ACC)
    inv_pos = 1.0 / tl.maximum(tl.load(STATS), 1.0)
    denom = s_hm + eps
    denom_bg = s_1m + eps
    fg = s_hms / denom
    bg = s_1ms / denom_bg
    full = s_s / HW
    nonempty = s_m > 0
    prx = tl.where(nonempty, s_hmd / denom, 0.0)
    cnf = tl.where(nonempty, s_hmo / denom, 0.0)
    c_prx = tl.load(G_LOSSES).to(ACC) * y * inv_pos
    c_cnf = tl.load(G_LOSSES + 1).to(ACC) * y * inv_pos
    c_ac = tl.load(G_LOSSES + 2).to(ACC) / BC
    c_bas = tl.load(G_LOSSES + 3).to(ACC) * y * inv_pos
    g_fg = 0.0
    g_bg = 0.0
    g_full = 0.0
    if HAS_G_LOGITS:
        g_fg = tl.load(G_LOGITS + row).to(ACC)
        g_bg = tl.load(G_LOGITS + BC + row).to(ACC)
        g_full = tl.load(G_LOGITS + 2 * BC + row).to(ACC)
    dsp_bg = tl.where(bg > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-bg)))
    d_bg = g_bg + c_bas * dsp_bg / (_softplus(full) + eps)
    # gradients of the loss with respect to each per-(b, c) sum
    k_hm = (-g_fg * fg - c_prx * prx - c_cnf * cnf) / denom + c_ac / HW
    k_hms = g_fg / denom
    k_1m = -d_bg * bg / denom_bg
    k_1ms = d_bg / denom_bg
    k_s = g_full / HW
    k_hmd = tl.where(nonempty, c_prx / denom, 0.0)
    k_hmo = tl.where(nonempty, c_cnf / denom, 0.0)
    lanes = tl.arange(0, BLOCK)
    for start in range(0, HW, BLOCK):
        idx = start + lanes
        valid = idx < HW
        offs = row * HW + idx
        hm = _load_hm(HM, offs, valid, FROM_LOGITS, ACC)
        s = tl.load(S + offs, mask=valid, other=0.0).to(ACC)
        dhm = k_hm + (k_hms - k_1ms) * s - k_1m
        if HAS_MASK:
            m = tl.load(M + offs, mask=valid, other=0).to(ACC)
            d = tl.load(D + offs, mask=valid, other=0.0).to(ACC)
            dhm += k_hmd * d + k_hmo * (1.0 - m)
        ds = k_hms * hm + k_1ms * (1.0 - hm) + k_s
        if FROM_LOGITS:
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
    acc = _acc_dtype(heatmap.dtype)
    hm, s, y = heatmap.contiguous(), scores.contiguous(), labels.contiguous()
    m = _mask_pointer(masks, hm)
    d = dist.contiguous() if dist is not None else hm
    sums = torch.empty((NUM_SUMS, BC), dtype=acc, device=hm.device)
    logits = torch.empty((3, B, C), dtype=acc, device=hm.device)
    terms = torch.empty((5, BC), dtype=acc, device=hm.device)
    flags = torch.empty((3, BC), dtype=torch.int32, device=hm.device)
    _seg_fwd_kernel[(BC,)](hm, s, m, d, y, sums, logits, terms, flags, HW, BC, eps, FROM_LOGITS=from_logits,
                           HAS_MASK=masks is not None, BLOCK=_block(HW), ACC=_TL[acc])
    losses = torch.empty((4,), dtype=acc, device=hm.device)
    stats = torch.empty((4,), dtype=acc, device=hm.device)
    _seg_reduce_kernel[(1,)](terms, flags, losses, stats, BC, BLOCK=_block(BC), ACC=_TL[acc])
    return losses, logits, sums, stats


@_seg_fwd_op.register_fake
def _(heatmap, scores, labels, masks, dist, from_logits, eps):
    B, C = heatmap.shape[:2]
    acc = _acc_dtype(heatmap.dtype)
    return (heatmap.new_empty((4,), dtype=acc), heatmap.new_empty((3, B, C), dtype=acc),
            heatmap.new_empty((NUM_SUMS, B * C), dtype=acc), heatmap.new_empty((4,), dtype=acc))


@torch.library.custom_op("clarity_fast::segmentcam_losses_bwd", mutates_args=())
def _seg_bwd_op(g_losses: torch.Tensor, g_logits: Optional[torch.Tensor], heatmap: torch.Tensor,
                scores: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor],
                dist: Optional[torch.Tensor], sums: torch.Tensor, stats: torch.Tensor, from_logits: bool,
                eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    B, C, h, w = heatmap.shape
    HW, BC = h * w, B * C
    acc = _acc_dtype(heatmap.dtype)
    hm, s, y = heatmap.contiguous(), scores.contiguous(), labels.contiguous()
    dhm, ds = torch.empty_like(hm), torch.empty_like(s)
    g_logits_ptr = g_logits.contiguous() if g_logits is not None else sums
    _seg_bwd_kernel[(BC,)](hm, s, _mask_pointer(masks, hm), dist.contiguous() if dist is not None else hm, y, sums,
                           stats, g_losses.contiguous(), g_logits_ptr, dhm, ds, HW, BC, eps, FROM_LOGITS=from_logits,
                           HAS_MASK=masks is not None, HAS_G_LOGITS=g_logits is not None, BLOCK=_block(HW),
                           ACC=_TL[acc])
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
