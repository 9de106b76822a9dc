"""Triton kernels of ``class_token_attention`` and their autograd (imported lazily).

Two backends share the class-row kernels here:

- ``fused``: one online-softmax attention kernel for every row (saving the row
  log-sum-exp), the maps from the saved class-row LSE, and a FlashAttention-style
  split backward (dK/dV over query blocks, dQ over key blocks) whose bulk loops
  carry no map code: the extra gradient the maps send through the C class rows
  is added in the kernels' epilogues.
- ``sdpa+maps``: PyTorch's own fused attention (flash / cuDNN / efficient) for
  the output and its gradients; Triton only for the class rows (their LSE, the
  maps, and the maps' gradient to the class queries and to every key).

All scores are kept in base 2: ``s2 = q·k * scale * log2(e)`` and ``P = exp2(s2 - lse2)``.
The maps' gradient on the class rows is ``dZ = P ∘ (g - rowsum(P ∘ g))`` with
``g = map_weight / nh * dMaps`` on patch columns and 0 on class columns, where Z
are the scaled logits; then ``dq_c = scale * dZ k`` and ``dk += scale * dZᵀ q_c``.
Every kernel is deterministic (no atomics).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import acc_dtype, interpreter_enabled, tl_dtype

LOG2E = math.log2(math.e)

# Saved statistics: lse2 is (B, nh, N) for the fused backend and (B, nh, C) for sdpa+maps; kernels
# take its (batch, head) strides (l_b, l_h), rows contiguous. Row terms r and DQC are (B, nh, C[, d]).


def dot_precision(dtype: torch.dtype) -> str:
    """fp16/bf16: tensor cores. fp32: ``tf32x3`` on GPUs (tensor cores, close to fp32), exact ``ieee``
    under the interpreter. fp64: ``ieee``."""
    if dtype == torch.float64 or (dtype == torch.float32 and interpreter_enabled()):
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- helpers


@triton.jit
def _batch_head(bh, NH, s_b, s_h):
    """(b, h) of a flat b·h program index and the 64-bit offset of that (b, h) slice."""
    b = bh // NH
    h = bh % NH
    return b, h, b.to(tl.int64) * s_b + h.to(tl.int64) * s_h


@triton.jit
def _load_rows(PTR, base, rows, s_n, offs_d, N, MASK: tl.constexpr):
    """A (len(rows), HEAD_DIM) tile of a (.., N, HEAD_DIM) tensor; rows >= N read as 0 when MASK."""
    ptrs = PTR + base + rows[:, None] * s_n + offs_d[None, :]
    if MASK:
        return tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _class_row_probs(q_c, k, lse2, crow, cols, C, N, qk_scale, ACC: tl.constexpr, PREC: tl.constexpr):
    """P on the class rows: exp2(q_c kᵀ * qk_scale - lse2), exactly 0 off the (C, N) block."""
    s2 = tl.dot(q_c, tl.trans(k), input_precision=PREC).to(ACC) * qk_scale
    valid = (crow[:, None] < C) & (cols[None, :] < N)
    return tl.where(valid, tl.math.exp2(s2 - lse2[:, None]), 0.0)


@triton.jit
def _map_grad(DMAPS, b, crow, cols, C, N, coef):
    """g = coef * dMaps[b, i, j - C] on class rows i < C and patch columns C <= j < N, else 0."""
    P = N - C
    mask = (crow[:, None] < C) & (cols[None, :] >= C) & (cols[None, :] < N)
    g = tl.load(DMAPS + b * C * P + crow[:, None] * P + (cols[None, :] - C), mask=mask, other=0.0)
    return g * coef


@triton.jit
def _class_queries(Q, LSE, b, h, base, s_n, l_b, l_h, C, BLOCK_C: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row and column offsets, the class queries q_c (BLOCK_C, HEAD_DIM) and their lse2 for one (b, h)."""
    crow = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    q_c = _load_rows(Q, base, crow, s_n, offs_d, C, True)
    lse2 = tl.load(LSE + b * l_b + h * l_h + crow, mask=crow < C, other=0.0)
    return crow, offs_d, q_c, lse2


@triton.jit
def _class_rows_dk(Q, LSE, R, DMAPS, b, h, base, k, cols, s_n, l_b, l_h, N, NH, C, qk_scale, coef,
                   HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dZᵀ q_c for one key block: the maps' gradient to these keys (before the scale)."""
    crow, offs_d, q_c, lse2 = _class_queries(Q, LSE, b, h, base, s_n, l_b, l_h, C, BLOCK_C, HEAD_DIM)
    r = tl.load(R + (b * NH + h) * C + crow, mask=crow < C, other=0.0)
    p = _class_row_probs(q_c, k, lse2, crow, cols, C, N, qk_scale, ACC, PREC)
    dz = p * (_map_grad(DMAPS, b, crow, cols, C, N, coef) - r[:, None])
    return tl.dot(tl.trans(dz.to(q_c.dtype)), q_c, input_precision=PREC).to(ACC)


# --------------------------------------------------------------------------- class-row kernels


@triton.jit
def _class_lse_kernel(Q, K, LSE, s_b, s_h, s_n, l_b, l_h, N, NH, C, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                      ACC: tl.constexpr, PREC: tl.constexpr):
    """lse2 of the C class rows over all N keys; one program per (b, h)."""
    bh = tl.program_id(0)
    b, h, base = _batch_head(bh, NH, s_b, s_h)
    crow = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, HEAD_DIM)
    q_c = _load_rows(Q, base, crow, s_n, offs_d, C, True)
    m = tl.full([BLOCK_C], float("-inf"), ACC)
    l = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, base, cols, s_n, offs_d, N, True)
        s2 = tl.dot(q_c, tl.trans(k), input_precision=PREC).to(ACC) * qk_scale
        s2 = tl.where(cols[None, :] < N, s2, float("-inf"))
        # online log-sum-exp: rescale the running sum to the new row maximum
        m_new = tl.maximum(m, tl.max(s2, 1))
        l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(s2 - m_new[:, None]), 1)
        m = m_new
    tl.store(LSE + b * l_b + h * l_h + crow, m + tl.math.log2(l), mask=crow < C)


@triton.jit
def _maps_kernel(Q, K, LSE, MAPS_IN, MAPS_OUT, s_b, s_h, s_n, l_b, l_h, N, NH, C, qk_scale, coef,
                 HAS_MAPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    """maps[b, :, block] = maps_in + coef * sum_h P[b, h, :C, C + block]; one program per (patch block, b)."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    P = N - C
    crow = tl.arange(0, BLOCK_C)
    pcol = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    for h in range(0, NH):  # heads in a fixed order: deterministic sum
        base = b.to(tl.int64) * s_b + tl.cast(h, tl.int64) * s_h  # 64-bit: h is a plain int in the interpreter
        crow, offs_d, q_c, lse2 = _class_queries(Q, LSE, b, h, base, s_n, l_b, l_h, C, BLOCK_C, HEAD_DIM)
        k = _load_rows(K, base, C + pcol, s_n, offs_d, N, True)
        total += _class_row_probs(q_c, k, lse2, crow, C + pcol, C, N, qk_scale, ACC, PREC)
    out_mask = (crow[:, None] < C) & (pcol[None, :] < P)
    offs = b * C * P + crow[:, None] * P + pcol[None, :]
    total = total * coef
    if HAS_MAPS:
        total += tl.load(MAPS_IN + offs, mask=out_mask, other=0.0)
    tl.store(MAPS_OUT + offs, total, mask=out_mask)


@triton.jit
def _class_rows_dq_kernel(Q, K, LSE, DMAPS, R, DQC, s_b, s_h, s_n, l_b, l_h, N, NH, C, qk_scale, coef,
                          HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr, PREC: tl.constexpr):
    """Per (b, h): r = rowsum(P ∘ g) on the class rows, then dZ k (before the scale) into DQC (B, nh, C, d)."""
    bh = tl.program_id(0)
    b, h, base = _batch_head(bh, NH, s_b, s_h)
    crow, offs_d, q_c, lse2 = _class_queries(Q, LSE, b, h, base, s_n, l_b, l_h, C, BLOCK_C, HEAD_DIM)
    # pass 1: the row term r_i = sum_j P_ij g_ij
    r = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, base, cols, s_n, offs_d, N, True)
        p = _class_row_probs(q_c, k, lse2, crow, cols, C, N, qk_scale, ACC, PREC)
        r += tl.sum(p * _map_grad(DMAPS, b, crow, cols, C, N, coef), 1)
    # pass 2: dZ = P ∘ (g - r), accumulated against the keys
    dq = tl.zeros([BLOCK_C, HEAD_DIM], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_rows(K, base, cols, s_n, offs_d, N, True)
        p = _class_row_probs(q_c, k, lse2, crow, cols, C, N, qk_scale, ACC, PREC)
        dz = p * (_map_grad(DMAPS, b, crow, cols, C, N, coef) - r[:, None])
        dq += tl.dot(dz.to(k.dtype), k, input_precision=PREC).to(ACC)
    tl.store(R + bh * C + crow, r, mask=crow < C)
    tl.store(DQC + bh * C * HEAD_DIM + crow[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=crow[:, None] < C)


@triton.jit
def _class_rows_dk_kernel(Q, K, LSE, DMAPS, R, DK, s_b, s_h, s_n, g_b, g_h, g_n, l_b, l_h, N, NH, C, scale,
                          qk_scale, coef, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr, PREC: tl.constexpr):
    """dK = scale * dZᵀ q_c for one key block and (b, h); every key row is written."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, base = _batch_head(bh, NH, s_b, s_h)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, base, cols, s_n, offs_d, N, True)
    dk = _class_rows_dk(Q, LSE, R, DMAPS, b, h, base, k, cols, s_n, l_b, l_h, N, NH, C, qk_scale, coef,
                        HEAD_DIM, BLOCK_C, ACC, PREC)
    g_base = b.to(tl.int64) * g_b + h.to(tl.int64) * g_h
    tl.store(DK + g_base + cols[:, None] * g_n + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=cols[:, None] < N)


# --------------------------------------------------------------------------- fused attention kernels


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, base, s_n, start, end, N, qk_scale, offs_d,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key blocks [start, end); only the last, partial block is masked."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        # scores in base 2 with the scale folded in
        k = _load_rows(K, base, cols, s_n, offs_d, N, MASK)
        s2 = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * qk_scale
        if MASK:
            s2 = tl.where(cols[None, :] < N, s2, float("-inf"))
        # new row maximum; rescale the running sum and output to it
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        p = tl.math.exp2(s2 - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, base, cols, s_n, offs_d, N, MASK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(ACC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, s_b, s_h, s_n, o_b, o_h, o_n, N, NH, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per (query block, b·h): out rows and their lse2 (B, nh, N)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, base = _batch_head(bh, NH, s_b, s_h)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, base, rows, s_n, offs_d, N, True)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], ACC)
    n_full = (N // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, base, s_n, 0, n_full, N, qk_scale, offs_d,
                               BLOCK_N, False, ACC, PREC)
    if n_full < N:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, base, s_n, n_full, N, N, qk_scale, offs_d,
                                   BLOCK_N, True, ACC, PREC)
    acc = acc / l_i[:, None]
    o_base = b.to(tl.int64) * o_b + h.to(tl.int64) * o_h
    tl.store(O + o_base + rows[:, None] * o_n + offs_d[None, :], acc.to(O.dtype.element_ty), mask=rows[:, None] < N)
    tl.store(LSE + bh.to(tl.int64) * N + rows, m_i + tl.math.log2(l_i), mask=rows < N)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, o_b, o_h, o_n, d_b, d_h, d_n, N, NH,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """Delta_i = rowsum(dO_i ∘ O_i), (B, nh, N)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O, b.to(tl.int64) * o_b + h.to(tl.int64) * o_h, rows, o_n, offs_d, N, True).to(ACC)
    do = _load_rows(DO, b.to(tl.int64) * d_b + h.to(tl.int64) * d_h, rows, d_n, offs_d, N, True).to(ACC)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DMAPS, R, DK, DV, s_b, s_h, s_n, d_b, d_h, d_n, g_b, g_h, g_n,
                     N, NH, C, scale, qk_scale, coef, HAS_DMAPS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per (key block, b·h): loop over query blocks for dK, dV; maps' term in the epilogue."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, base = _batch_head(bh, NH, s_b, s_h)
    do_base = b.to(tl.int64) * d_b + h.to(tl.int64) * d_h
    stat = bh.to(tl.int64) * N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(K, base, cols, s_n, offs_d, N, True)
    v = _load_rows(V, base, cols, s_n, offs_d, N, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], ACC)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        # rows past N read q = dO = 0 and lse = Delta = 0: their P is finite and their dZ is 0
        q = _load_rows(Q, base, rows, s_n, offs_d, N, True)
        do = _load_rows(DO, do_base, rows, d_n, offs_d, N, True)
        lse2 = tl.load(LSE + stat + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + stat + rows, mask=rows < N, other=0.0)
        # Pᵀ for this key block (columns past N only reach rows of dK, dV that are never stored)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * qk_scale - lse2[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(ACC)
        # dZ = P ∘ (dO vᵀ - Delta)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        dz = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PREC).to(ACC)
    if HAS_DMAPS:
        dk += _class_rows_dk(Q, LSE, R, DMAPS, b, h, base, k, cols, s_n, NH * N, N, N, NH, C, qk_scale, coef,
                             HEAD_DIM, BLOCK_C, ACC, PREC)
    g_off = b.to(tl.int64) * g_b + h.to(tl.int64) * g_h + cols[:, None] * g_n + offs_d[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=cols[:, None] < N)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=cols[:, None] < N)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K, V, base, s_n, start, end, N, qk_scale, offs_d,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """dQ accumulation over key blocks [start, end); only the last, partial block is masked."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, base, cols, s_n, offs_d, N, MASK)
        v = _load_rows(V, base, cols, s_n, offs_d, N, MASK)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(cols[None, :] < N, p, 0.0)
        dz = p * (tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC) - delta[:, None])
        dq += tl.dot(dz.to(k.dtype), k, input_precision=PREC).to(ACC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQC, DQ, s_b, s_h, s_n, d_b, d_h, d_n, g_b, g_h, g_n,
                   N, NH, C, scale, qk_scale, HAS_DMAPS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """One program per (query block, b·h): loop over key blocks for dQ; class rows add DQC in the epilogue."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, base = _batch_head(bh, NH, s_b, s_h)
    stat = bh.to(tl.int64) * N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q, base, rows, s_n, offs_d, N, True)
    do = _load_rows(DO, b.to(tl.int64) * d_b + h.to(tl.int64) * d_h, rows, d_n, offs_d, N, True)
    lse2 = tl.load(LSE + stat + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + stat + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], ACC)
    n_full = (N // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, base, s_n, 0, n_full, N, qk_scale, offs_d,
                   BLOCK_N, False, ACC, PREC)
    if n_full < N:
        dq = _dq_inner(dq, q, do, lse2, delta, K, V, base, s_n, n_full, N, N, qk_scale, offs_d,
                       BLOCK_N, True, ACC, PREC)
    if HAS_DMAPS:
        if pid_m * BLOCK_M < C:  # the maps' gradient to the class queries, from _class_rows_dq_kernel
            dq += tl.load(DQC + bh * C * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
                          mask=rows[:, None] < C, other=0.0)
    g_off = b.to(tl.int64) * g_b + h.to(tl.int64) * g_h + rows[:, None] * g_n + offs_d[None, :]
    tl.store(DQ + g_off, (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None] < N)


# --------------------------------------------------------------------------- launch configuration
# GPU: each attention kernel has its own autotuned list (pruned so that compiling fp32 stays short),
# keyed by N, head_dim and, for the backward, whether the maps are in the loss. Every bf16 config
# below compiles for sm_90 (Triton 3.8, ptxas -v) at head_dim 64 without spills, maps on or off.
# Interpreter: no autotune, one fixed small tile so that tests cross several block edges.

def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


_FWD_CONFIGS = _configs(((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)))
_DKDV_CONFIGS = _configs(((32, 128, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3)))
_DQ_CONFIGS = _configs(((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)))
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=16)
_CLASS_ROW_BLOCK_N = 64  # key block of the class-row kernels on GPU


def _autotuned(kernel, configs, key):
    return kernel if interpreter_enabled() else triton.autotune(configs, key=key)(kernel)


_fwd = _autotuned(_fwd_kernel, _FWD_CONFIGS, ["N", "HEAD_DIM"])
_bwd_dkdv = _autotuned(_bwd_dkdv_kernel, _DKDV_CONFIGS, ["N", "HEAD_DIM", "HAS_DMAPS"])
_bwd_dq = _autotuned(_bwd_dq_kernel, _DQ_CONFIGS, ["N", "HEAD_DIM", "HAS_DMAPS"])


def _launch(kernel, block: str, N: int, BH: int, *args, **meta) -> None:
    """Launch over ``(cdiv(N, meta[block]), BH)``; tiles come from autotune on GPU, fixed under the interpreter."""
    if interpreter_enabled():
        meta.update(_INTERPRETER_TILE)
    kernel[lambda m: (triton.cdiv(N, m[block]), BH)](*args, **meta)


def _class_block_n() -> int:
    return _INTERPRETER_TILE["BLOCK_N"] if interpreter_enabled() else _CLASS_ROW_BLOCK_N


def _block_c(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def _bhn(t: torch.Tensor):
    """(batch, head, token) strides of a (B, nh, N, d) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v with a shared (b, h, n) stride layout and unit last-dim stride (the model's qkv views have it)."""
    q, k, v = (_unit_last_dim(t) for t in (q, k, v))
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def _empty_bnhd(q: torch.Tensor) -> torch.Tensor:
    """A (B, nh, N, d) tensor laid out as (B, N, nh, d), so ``out.transpose(1, 2).reshape(B, N, D)`` is free."""
    B, NH, N, D = q.shape
    return torch.empty_strided(q.shape, (N * NH * D, D, NH * D, 1), dtype=q.dtype, device=q.device)


def _common(q: torch.Tensor) -> dict:
    acc = acc_dtype(q.dtype)
    return dict(HEAD_DIM=q.shape[-1], ACC=tl_dtype(acc), PREC=dot_precision(q.dtype))


# --------------------------------------------------------------------------- class-row launches (both backends)


def _launch_maps(q, k, lse, lse_strides, C, scale, maps, map_weight) -> torch.Tensor:
    """(maps or 0) + map_weight * mean_h P[:, :, :C, C:] as (B, C, N - C) in the accumulation dtype."""
    B, NH, N, _ = k.shape
    maps_out = torch.empty((B, C, N - C), dtype=acc_dtype(q.dtype), device=q.device)
    block_n = _class_block_n()
    _maps_kernel[(triton.cdiv(N - C, block_n), B)](
        q, k, lse, maps.contiguous() if maps is not None else maps_out, maps_out, *_bhn(k), *lse_strides,
        N, NH, C, scale * LOG2E, map_weight / NH, HAS_MAPS=maps is not None, BLOCK_C=_block_c(C),
        BLOCK_N=block_n, **_common(q))
    return maps_out


def _launch_class_rows_dq(q, k, lse, lse_strides, dmaps, C, scale, map_weight):
    """Row terms r (B, nh, C) and dZ k before the scale (B, nh, C, d), both in the accumulation dtype."""
    B, NH, N, D = k.shape
    acc = acc_dtype(q.dtype)
    r = torch.empty((B, NH, C), dtype=acc, device=q.device)
    dqc = torch.empty((B, NH, C, D), dtype=acc, device=q.device)
    _class_rows_dq_kernel[(B * NH,)](
        q, k, lse, dmaps, r, dqc, *_bhn(k), *lse_strides, N, NH, C, scale * LOG2E, map_weight / NH,
        BLOCK_C=_block_c(C), BLOCK_N=_class_block_n(), **_common(q))
    return r, dqc


# --------------------------------------------------------------------------- fused backend: custom ops + autograd


@torch.library.custom_op("clarity_fast::class_token_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_classes: int, scale: float,
            maps: Optional[torch.Tensor], map_weight: float, with_maps: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _same_layout(q, k, v)
    B, NH, N, _ = q.shape
    out = _empty_bnhd(q)
    lse = torch.empty((B, NH, N), dtype=acc_dtype(q.dtype), device=q.device)
    _launch(_fwd, "BLOCK_M", N, B * NH, q, k, v, out, lse, *_bhn(q), *_bhn(out), N, NH, scale * LOG2E,
            **_common(q))
    if not with_maps:
        return out, lse, torch.empty((0,), dtype=lse.dtype, device=q.device)
    maps_out = _launch_maps(q, k, lse, (NH * N, N), num_classes, scale, maps, map_weight)
    return out, lse, maps_out


@_fwd_op.register_fake
def _(q, k, v, num_classes, scale, maps, map_weight, with_maps):
    B, NH, N, _ = q.shape
    acc = acc_dtype(q.dtype)
    shape = (B, num_classes, N - num_classes) if with_maps else (0,)
    return _empty_bnhd(q), q.new_empty((B, NH, N), dtype=acc), q.new_empty(shape, dtype=acc)


@torch.library.custom_op("clarity_fast::class_token_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, dmaps: Optional[torch.Tensor], num_classes: int, scale: float,
            map_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _same_layout(q, k, v)
    out, dout = _unit_last_dim(out), _unit_last_dim(dout)
    B, NH, N, D = q.shape
    C = num_classes
    common = _common(q)
    has_dmaps = dmaps is not None
    delta = torch.empty_like(lse)
    block_m = _INTERPRETER_TILE["BLOCK_M"] if interpreter_enabled() else 64
    _bwd_preprocess[(triton.cdiv(N, block_m), B * NH)](out, dout, delta, *_bhn(out), *_bhn(dout), N, NH,
                                                         HEAD_DIM=D, BLOCK_M=block_m, ACC=common["ACC"])
    if has_dmaps:
        dmaps = dmaps.contiguous()
        r, dqc = _launch_class_rows_dq(q, k, lse, (NH * N, N), dmaps, C, scale, map_weight)
    else:
        dmaps = r = dqc = lse  # any pointer: not read without the maps in the loss
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    strides = (*_bhn(q), *_bhn(dout), *_bhn(dq))
    _launch(_bwd_dkdv, "BLOCK_N", N, B * NH, q, k, v, dout, lse, delta, dmaps, r, dk, dv, *strides, N, NH, C, scale,
            scale * LOG2E, map_weight / NH, HAS_DMAPS=has_dmaps, BLOCK_C=_block_c(C), **common)
    _launch(_bwd_dq, "BLOCK_M", N, B * NH, q, k, v, dout, lse, delta, dqc, dq, *strides, N, NH, C, scale,
            scale * LOG2E, HAS_DMAPS=has_dmaps, **common)
    return dq, dk, dv


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dmaps, num_classes, scale, map_weight):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, num_classes, scale, maps, map_weight, with_maps = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.num_classes, ctx.scale, ctx.map_weight, ctx.with_maps = num_classes, scale, map_weight, with_maps
    ctx.has_maps_input = maps is not None
    ctx.set_materialize_grads(False)  # maps outside the loss: no maps backward at all


def _fwd_backward(ctx, dout, dlse, dmaps):
    q, k, v, out, lse = ctx.saved_tensors
    dmaps = dmaps if ctx.with_maps else None
    if dout is None and dmaps is None:
        return (None,) * 8
    if dout is None:  # only the maps are in the loss
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dmaps, ctx.num_classes, ctx.scale, ctx.map_weight)
    dmaps_in = dmaps if ctx.has_maps_input else None
    return dq, dk, dv, None, None, dmaps_in, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_classes: int, scale: float,
                    maps: Optional[torch.Tensor], map_weight: Optional[float],
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``fused`` backend: the whole attention and the maps in Triton."""
    with_maps = map_weight is not None
    out, _, maps_out = _fwd_op(q, k, v, num_classes, scale, maps, map_weight if with_maps else 0.0, with_maps)
    return out, maps_out if with_maps else None


# --------------------------------------------------------------------------- sdpa+maps backend


@torch.library.custom_op("clarity_fast::class_row_maps", mutates_args=())
def _class_row_maps_op(q_cls: torch.Tensor, k: torch.Tensor, scale: float, maps: Optional[torch.Tensor],
                       map_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Maps of the class rows ``q_cls = q[:, :, :C]`` against all keys ``k``; also returns their lse2 (B, nh, C)."""
    if q_cls.stride() != k.stride() or k.stride(-1) != 1:
        q_cls, k = q_cls.contiguous(), k.contiguous()
    B, NH, C, _ = q_cls.shape
    N = k.shape[2]
    lse = torch.empty((B, NH, C), dtype=acc_dtype(q_cls.dtype), device=q_cls.device)
    _class_lse_kernel[(B * NH,)](q_cls, k, lse, *_bhn(k), NH * C, C, N, NH, C, scale * LOG2E,
                                 BLOCK_C=_block_c(C), BLOCK_N=_class_block_n(), **_common(q_cls))
    return _launch_maps(q_cls, k, lse, (NH * C, C), C, scale, maps, map_weight), lse


@_class_row_maps_op.register_fake
def _(q_cls, k, scale, maps, map_weight):
    B, NH, C, _ = q_cls.shape
    acc = acc_dtype(q_cls.dtype)
    return q_cls.new_empty((B, C, k.shape[2] - C), dtype=acc), q_cls.new_empty((B, NH, C), dtype=acc)


@torch.library.custom_op("clarity_fast::class_row_maps_bwd", mutates_args=())
def _class_row_maps_bwd_op(dmaps: torch.Tensor, q_cls: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                           scale: float, map_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    if q_cls.stride() != k.stride() or k.stride(-1) != 1:
        q_cls, k = q_cls.contiguous(), k.contiguous()
    B, NH, C, D = q_cls.shape
    N = k.shape[2]
    dmaps = dmaps.contiguous()
    r, dqc = _launch_class_rows_dq(q_cls, k, lse, (NH * C, C), dmaps, C, scale, map_weight)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block_n = _class_block_n()
    _class_rows_dk_kernel[(triton.cdiv(N, block_n), B * NH)](
        q_cls, k, lse, dmaps, r, dk, *_bhn(k), *_bhn(dk), NH * C, C, N, NH, C, scale, scale * LOG2E,
        map_weight / NH, BLOCK_C=_block_c(C), BLOCK_N=block_n, **_common(q_cls))
    return (dqc * scale).to(q_cls.dtype), dk


@_class_row_maps_bwd_op.register_fake
def _(dmaps, q_cls, k, lse, scale, map_weight):
    return q_cls.new_empty(q_cls.shape), k.new_empty(k.shape)


def _maps_setup_context(ctx, inputs, output):
    q_cls, k, scale, maps, map_weight = inputs
    ctx.save_for_backward(q_cls, k, output[1])
    ctx.scale, ctx.map_weight, ctx.has_maps_input = scale, map_weight, maps is not None
    ctx.set_materialize_grads(False)


def _maps_backward(ctx, dmaps, dlse):
    if dmaps is None:
        return None, None, None, None, None
    q_cls, k, lse = ctx.saved_tensors
    dq_cls, dk = _class_row_maps_bwd_op(dmaps, q_cls, k, lse, ctx.scale, ctx.map_weight)
    return dq_cls, dk, None, dmaps if ctx.has_maps_input else None, None


_class_row_maps_op.register_autograd(_maps_backward, setup_context=_maps_setup_context)


def sdpa_maps_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_classes: int, scale: float,
                        maps: Optional[torch.Tensor], map_weight: Optional[float],
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``sdpa+maps`` backend: ``F.scaled_dot_product_attention`` for the output, Triton for the class rows."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if map_weight is None:
        return out, None
    maps_out, _ = _class_row_maps_op(q[:, :, :num_classes], k, scale, maps, map_weight)
    return out, maps_out
