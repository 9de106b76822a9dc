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

from ._dispatch import use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_CLASS_TOKENS = 64


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
    if use_triton(q):
        return class_token_attention_triton(q, k, v, num_class_tokens, scale, maps, map_weight)
    return class_token_attention_torch(q, k, v, num_class_tokens, scale, maps, map_weight)
