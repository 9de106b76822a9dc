"""Multi-class-token attention that also emits the head-averaged class-to-patch maps.

Contract (SPEC §4.1)::

    out, maps = class_token_attention(q, k, v, num_class_tokens, *,
                                      scale=None, maps=None, map_weight=None)

q, k, v: ``(B, nh, N, d)``; the first ``C = num_class_tokens`` tokens are class
tokens, the remaining ``P = N - C`` are patches. ``out`` is plain non-causal
attention, shaped and typed like q. With ``map_weight`` set, ``maps`` is
``(maps or 0) + map_weight * mean_h softmax(q k^T * scale)[:, h, :C, C:]`` of
shape ``(B, C, P)`` in fp32 (fp64 for fp64 inputs); no N x N tensor is formed.

This file holds the PyTorch reference; the Triton kernels sit beside it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import backend, use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_CLASS_TOKENS = 64
SUPPORTED_HEAD_DIMS = (32, 64, 128)


def maps_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the maps: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_class_tokens: int,
                 maps: Optional[torch.Tensor], map_weight: Optional[float]) -> None:
    """Raise a ValueError naming the argument for anything outside the contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (B, num_heads, N, head_dim), "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, _, N, _ = q.shape
    if not isinstance(num_class_tokens, int) or not 1 <= num_class_tokens < N:
        raise ValueError(f"num_class_tokens must be an int with 1 <= num_class_tokens < N = {N}, "
                         f"got {num_class_tokens!r}")
    if maps is not None:
        if map_weight is None:
            raise ValueError("maps was given but map_weight is None; pass map_weight to accumulate maps")
        expected = (B, num_class_tokens, N - num_class_tokens)
        if tuple(maps.shape) != expected:
            raise ValueError(f"maps must have shape (B, C, N - C) = {expected}, got {tuple(maps.shape)}")
        if maps.dtype != maps_dtype(q.dtype):
            raise ValueError(f"maps must be {maps_dtype(q.dtype)} for {q.dtype} inputs, got {maps.dtype}")
        if maps.device != q.device:
            raise ValueError(f"maps must be on {q.device}, got {maps.device}")


def class_token_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_class_tokens: int,
                                scale: float, maps: Optional[torch.Tensor] = None,
                                map_weight: Optional[float] = None,
                                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """PyTorch reference: SDPA for the output plus an explicit softmax of only the C class rows.

    Memory is O(C * N) per head for the maps, never O(N^2); autograd gives the
    gradients, including those through the maps.
    """
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if map_weight is None:
        return out, None
    C = num_class_tokens
    acc = maps_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):  # the maps accumulate in fp32 under autocast too
        logits = torch.matmul(q[:, :, :C].to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, nh, C, N)
        new = logits.softmax(dim=-1)[..., C:].mean(dim=1) * map_weight  # (B, C, P)
    return out, new if maps is None else maps + new


def class_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_class_tokens: int, *,
                          scale: Optional[float] = None, maps: Optional[torch.Tensor] = None,
                          map_weight: Optional[float] = None,
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention over ``(B, nh, N, d)`` q/k/v that also accumulates class-to-patch maps.

    Returns ``(out, maps)``: ``out`` like q; ``maps`` ``(B, C, N - C)`` fp32
    (fp64 for fp64 inputs), or None when ``map_weight`` is None.
    CUDA tensors run the fused Triton kernel, CPU tensors the PyTorch
    reference (see ``CLARITY_FAST_BACKEND``).
    """
    check_inputs(q, k, v, num_class_tokens, maps, map_weight)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if map_weight is not None:
        map_weight = float(map_weight)
    if use_triton(q) and (backend() == "triton" or triton_supports(q, num_class_tokens)):
        return class_token_attention_triton(q, k, v, num_class_tokens, scale, maps, map_weight)
    return class_token_attention_torch(q, k, v, num_class_tokens, scale, maps, map_weight)


def triton_supports(q: torch.Tensor, num_class_tokens: int) -> bool:
    """Whether the fused kernel covers these shapes; with the ``auto`` backend others run the reference
    (e.g. a ViT-H with head_dim 80, or more than 64 classes); with ``triton`` they raise."""
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and num_class_tokens <= MAX_CLASS_TOKENS


# --------------------------------------------------------------------------- Triton
# Forward: online-softmax attention (one program per query block and (b, h)), saving the
# row log-sum-exp. Maps: one program per (patch block, b) loops over heads, recomputes
# the class-row probabilities from the saved LSE and writes maps_in + w/nh * sum_h P
# (deterministic, no atomics). Backward: dK/dV loop over query blocks and dQ loop over
# key blocks (no atomics); on class rows dP gains w/nh * dMaps and the row term
# Delta_i = rowsum(dO_i * O_i) gains sum_j P_ij * w/nh * dMaps_ij.

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ._dispatch import interpreter_enabled  # noqa: E402

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32/fp64 products (no TF32); fp16/bf16 use the default tensor-core path."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, s_b, s_h, s_n, o_b, o_h, o_n, l_bh, N, NH, scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // NH) * s_b + (bh % NH) * s_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * s_n + offs_d[None, :], mask=rows[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        kv_off = base + cols[:, None] * s_n + offs_d[None, :]
        k = tl.load(K + kv_off, mask=cols[:, None] < N, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=cols[:, None] < N, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_base = (bh // NH) * o_b + (bh % NH) * o_h
    tl.store(O + o_base + rows[:, None] * o_n + offs_d[None, :], acc.to(O.dtype.element_ty), mask=rows[:, None] < N)
    tl.store(LSE + bh * l_bh + rows, m_i + tl.log(l_i), mask=rows < N)


@triton.jit
def _maps_kernel(Q, K, LSE, MAPS_IN, MAPS_OUT, s_b, s_h, s_n, l_bh, N, NH, C, scale, coef,
                 HAS_MAPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    P = N - C
    crow = tl.arange(0, BLOCK_C)
    pcol = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    for h in range(0, NH):
        base = b * s_b + h * s_h
        q = tl.load(Q + base + crow[:, None] * s_n + offs_d[None, :], mask=crow[:, None] < C, other=0.0)
        k = tl.load(K + base + (C + pcol)[:, None] * s_n + offs_d[None, :], mask=pcol[:, None] < P, other=0.0)
        lse = tl.load(LSE + (b * NH + h) * l_bh + crow, mask=crow < C, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale
        total += tl.exp(s - lse[:, None])
    out_mask = (crow[:, None] < C) & (pcol[None, :] < P)
    offs = b * C * P + crow[:, None] * P + pcol[None, :]
    total = total * coef
    if HAS_MAPS:
        total += tl.load(MAPS_IN + offs, mask=out_mask, other=0.0)
    tl.store(MAPS_OUT + offs, total, mask=out_mask)


@triton.jit
def _map_grad(DMAPS, b, rows, cols, C, N, coef):
    """w/nh * dMaps[b, i, j - C] on class rows i < C and patch columns j >= C, else 0."""
    P = N - C
    mask = (rows[:, None] < C) & (cols[None, :] >= C) & (cols[None, :] < N)
    g = tl.load(DMAPS + b * C * P + rows[:, None] * P + (cols[None, :] - C), mask=mask, other=0.0)
    return g * coef


@triton.jit
def _bwd_preprocess(Q, K, O, DO, LSE, DELTA, DMAPS, s_b, s_h, s_n, o_b, o_h, o_n, l_bh, N, NH, C, scale, coef,
                    HAS_DMAPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_off = b * o_b + (bh % NH) * o_h + rows[:, None] * o_n + offs_d[None, :]
    o = tl.load(O + o_off, mask=rows[:, None] < N, other=0.0).to(ACC)
    do = tl.load(DO + o_off, mask=rows[:, None] < N, other=0.0).to(ACC)
    delta = tl.sum(o * do, 1)
    if HAS_DMAPS:
        if pid_m * BLOCK_M < C:
            base = b * s_b + (bh % NH) * s_h
            q = tl.load(Q + base + rows[:, None] * s_n + offs_d[None, :], mask=rows[:, None] < C, other=0.0)
            lse = tl.load(LSE + bh * l_bh + rows, mask=rows < C, other=0.0)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                k = tl.load(K + base + cols[:, None] * s_n + offs_d[None, :], mask=cols[:, None] < N, other=0.0)
                p = tl.exp(tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale - lse[:, None])
                delta += tl.sum(p * _map_grad(DMAPS, b, rows, cols, C, N, coef), 1)
    tl.store(DELTA + bh * l_bh + rows, delta, mask=rows < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DMAPS, DK, DV, s_b, s_h, s_n, o_b, o_h, o_n, l_bh, g_b, g_h, g_n,
                     N, NH, C, scale, coef, HAS_DMAPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    base = b * s_b + (bh % NH) * s_h
    o_base = b * o_b + (bh % NH) * o_h
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_off = base + cols[:, None] * s_n + offs_d[None, :]
    k = tl.load(K + kv_off, mask=cols[:, None] < N, other=0.0)
    v = tl.load(V + kv_off, mask=cols[:, None] < N, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], ACC)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(Q + base + rows[:, None] * s_n + offs_d[None, :], mask=rows[:, None] < N, other=0.0)
        do = tl.load(DO + o_base + rows[:, None] * o_n + offs_d[None, :], mask=rows[:, None] < N, other=0.0)
        lse = tl.load(LSE + bh * l_bh + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + bh * l_bh + rows, mask=rows < N, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale
        valid = (rows[:, None] < N) & (cols[None, :] < N)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        if HAS_DMAPS:
            if start < C:
                dp += _map_grad(DMAPS, b, rows, cols, C, N, coef)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(ACC)
    g_off = b * g_b + (bh % NH) * g_h + cols[:, None] * g_n + offs_d[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=cols[:, None] < N)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=cols[:, None] < N)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DMAPS, DQ, s_b, s_h, s_n, o_b, o_h, o_n, l_bh, g_b, g_h, g_n,
                   N, NH, C, scale, coef, HAS_DMAPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // NH
    base = b * s_b + (bh % NH) * s_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = base + rows[:, None] * s_n + offs_d[None, :]
    q = tl.load(Q + q_off, mask=rows[:, None] < N, other=0.0)
    do = tl.load(DO + b * o_b + (bh % NH) * o_h + rows[:, None] * o_n + offs_d[None, :],
                 mask=rows[:, None] < N, other=0.0)
    lse = tl.load(LSE + bh * l_bh + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + bh * l_bh + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_off = base + cols[:, None] * s_n + offs_d[None, :]
        k = tl.load(K + kv_off, mask=cols[:, None] < N, other=0.0)
        v = tl.load(V + kv_off, mask=cols[:, None] < N, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale
        valid = (rows[:, None] < N) & (cols[None, :] < N)
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(ACC)
        if HAS_DMAPS:
            if pid_m * BLOCK_M < C:
                dp += _map_grad(DMAPS, b, rows, cols, C, N, coef)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(ACC)
    g_off = b * g_b + (bh % NH) * g_h + rows[:, None] * g_n + offs_d[None, :]
    tl.store(DQ + g_off, (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None] < N)


# GPU: autotuned per (N, head_dim, dtype) over configurations that fit ViT-S shapes on Ampere and Hopper.
# Interpreter: no autotune, one fixed small tile so that tests cross several block edges.
_GPU_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3))]
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=16)
_GPU_FIXED_TILE = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)


def _autotuned(kernel):
    return kernel if interpreter_enabled() else triton.autotune(_GPU_CONFIGS, key=["N", "HEAD_DIM"])(kernel)


_fwd = _autotuned(_fwd_kernel)
_bwd_dkdv = _autotuned(_bwd_dkdv_kernel)
_bwd_dq = _autotuned(_bwd_dq_kernel)


def _launch(kernel, block: str, N: int, BH: int, *args, **meta) -> None:
    """Launch over ``(cdiv(N, meta[block]), BH)``; tiles come from autotune on GPU, fixed under the interpreter."""
    if interpreter_enabled():
        meta.update(_INTERPRETER_TILE)
    kernel[lambda m: (triton.cdiv(N, m[block]), BH)](*args, **meta)


def _fixed_tile() -> dict:
    return dict(_INTERPRETER_TILE) if interpreter_enabled() else dict(_GPU_FIXED_TILE)


def _bhn_strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_triton_inputs(q: torch.Tensor, num_class_tokens: int) -> None:
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} for the Triton kernel, got {q.shape[-1]}")
    if num_class_tokens > MAX_CLASS_TOKENS:
        raise ValueError(f"num_class_tokens must be <= {MAX_CLASS_TOKENS} for the Triton kernel, "
                         f"got {num_class_tokens}")


def _same_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v with a shared (b, h, n) stride layout and unit last-dim stride."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


@torch.library.custom_op("clarity_fast::class_token_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_class_tokens: int, scale: float,
            maps: Optional[torch.Tensor], map_weight: float, with_maps: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _same_layout(q, k, v)
    B, NH, N, D = q.shape
    C = num_class_tokens
    acc = maps_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, NH, N), dtype=acc, device=q.device)
    _launch(_fwd, "BLOCK_M", N, B * NH, q, k, v, out, lse, *_bhn_strides(q), *_bhn_strides(out), N, N, NH, scale,
            HEAD_DIM=D, ACC=_TL_DTYPES[acc], PREC=_dot_precision(q.dtype))
    maps_out = torch.empty((0,), dtype=acc, device=q.device)
    if with_maps:
        maps_out = torch.empty((B, C, N - C), dtype=acc, device=q.device)
        tile = _fixed_tile()
        del tile["BLOCK_M"]
        _maps_kernel[(triton.cdiv(N - C, tile["BLOCK_N"]), B)](
            q, k, lse, maps if maps is not None else maps_out, maps_out, *_bhn_strides(q), N, N, NH, C, scale,
            map_weight / NH, HAS_MAPS=maps is not None, HEAD_DIM=D, BLOCK_C=max(16, triton.next_power_of_2(C)),
            ACC=_TL_DTYPES[acc], PREC=_dot_precision(q.dtype), **tile)
    return out, lse, maps_out


@_fwd_op.register_fake
def _(q, k, v, num_class_tokens, scale, maps, map_weight, with_maps):
    B, NH, N, _ = q.shape
    acc = maps_dtype(q.dtype)
    shape = (B, num_class_tokens, N - num_class_tokens) if with_maps else (0,)
    return q.new_empty(q.shape), q.new_empty((B, NH, N), dtype=acc), q.new_empty(shape, dtype=acc)


@torch.library.custom_op("clarity_fast::class_token_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, dmaps: Optional[torch.Tensor], num_class_tokens: int, scale: float,
            map_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _same_layout(q, k, v)
    dout = _last_dim_contiguous(dout)
    if out.stride() != dout.stride():
        out, dout = out.contiguous(), dout.contiguous()
    B, NH, N, D = q.shape
    C = num_class_tokens
    acc = maps_dtype(q.dtype)
    has_dmaps = dmaps is not None
    dmaps = dmaps.contiguous() if has_dmaps else lse  # any pointer; unused without dmaps
    coef = map_weight / NH
    delta = torch.empty_like(lse)
    common = dict(HAS_DMAPS=has_dmaps, HEAD_DIM=D, ACC=_TL_DTYPES[acc], PREC=_dot_precision(q.dtype))
    strides = (*_bhn_strides(q), *_bhn_strides(dout), N)
    tile = _fixed_tile()
    _bwd_preprocess[(triton.cdiv(N, tile["BLOCK_M"]), B * NH)](
        q, k, out, dout, lse, delta, dmaps, *strides, N, NH, C, scale, coef, **common, **tile)
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    strides = (*strides, *_bhn_strides(dq))
    _launch(_bwd_dkdv, "BLOCK_N", N, B * NH, q, k, v, dout, lse, delta, dmaps, dk, dv, *strides, N, NH, C, scale,
            coef, **common)
    _launch(_bwd_dq, "BLOCK_M", N, B * NH, q, k, v, dout, lse, delta, dmaps, dq, *strides, N, NH, C, scale, coef,
            **common)
    return dq, dk, dv


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dmaps, num_class_tokens, scale, map_weight):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, num_class_tokens, scale, maps, map_weight, with_maps = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.num_class_tokens, ctx.scale, ctx.map_weight, ctx.with_maps = num_class_tokens, scale, map_weight, with_maps
    ctx.has_maps_input = maps is not None


def _backward(ctx, dout, dlse, dmaps):
    q, k, v, out, lse = ctx.saved_tensors
    dmaps = dmaps if ctx.with_maps else None
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dmaps, ctx.num_class_tokens, ctx.scale, ctx.map_weight)
    dmaps_in = dmaps if ctx.has_maps_input else None
    return dq, dk, dv, None, None, dmaps_in, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def class_token_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_class_tokens: int,
                                 scale: float, maps: Optional[torch.Tensor] = None,
                                 map_weight: Optional[float] = None,
                                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused Triton path (compiled on CUDA, interpreted on CPU with ``TRITON_INTERPRET=1``)."""
    _check_triton_inputs(q, num_class_tokens)
    with_maps = map_weight is not None
    out, _, maps_out = _fwd_op(q, k, v, num_class_tokens, scale, maps, map_weight if with_maps else 0.0, with_maps)
    return out, maps_out if with_maps else None
