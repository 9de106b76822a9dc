"""Multi-class-token attention that also emits the head-averaged class-to-patch maps.

Contract (SPEC §4.1)::

    out, maps = class_token_attention(q, k, v, num_classes, *,
                                      scale=None, maps=None, map_weight=None)

q, k, v: ``(B, nh, N, d)``; the first ``C = num_classes`` tokens are class
tokens, the remaining ``P = N - C`` are patches. ``out`` is plain non-causal
attention, shaped and typed like q. With ``map_weight`` set, ``maps`` is
``(maps or 0) + map_weight * mean_h softmax(q k^T * scale)[:, h, :C, C:]`` of
shape ``(B, C, P)`` in fp32 (fp64 for fp64 inputs); no N x N tensor is formed.

Backends (``CLARITY_FAST_BACKEND``, see ``_dispatch``): ``fused`` (all in Triton),
``sdpa+maps`` (PyTorch's SDPA for the output, Triton for the class rows) and
``torch`` (the reference below); ``auto`` measures ``fused`` against
``sdpa+maps`` once per shape on CUDA and keeps the faster. This file holds the
contract, the input checks, the PyTorch reference and the dispatch; the Triton
kernels sit in ``class_token_attention_triton.py``, imported only where Triton is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import _dispatch
from ._dispatch import acc_dtype, backend, check_triton_can_run, triton_available

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_CLASS_TOKENS = 64
SUPPORTED_HEAD_DIMS = (32, 64, 128)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_classes: int,
                 maps: Optional[torch.Tensor], map_weight: Optional[float]) -> None:
    """Raise a ValueError naming the argument for anything outside the contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{name} must be a 4-d tensor (B, num_heads, N, head_dim), "
                             f"got {getattr(t, 'shape', type(t))}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise InputError(f"q, k and v must have the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise InputError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, _, N, _ = q.shape
    if not isinstance(num_classes, int) or not 1 <= num_classes < N:
        raise InputError(f"num_classes must be an int with 1 <= num_classes < N = {N}, "
                         f"got {num_classes!r}")
    if maps is not None:
        if map_weight is None:
            raise InputError("maps was given but map_weight is None; pass map_weight to accumulate maps")
        expected = (B, num_classes, N - num_classes)
        if tuple(maps.shape) != expected:
            raise InputError(f"maps must have shape (B, C, N - C) = {expected}, got {tuple(maps.shape)}")
        if maps.dtype != acc_dtype(q.dtype):
            raise InputError(f"maps must be {acc_dtype(q.dtype)} for {q.dtype} inputs, got {maps.dtype}")
        if maps.device != q.device:
            raise InputError(f"maps must be on {q.device}, got {maps.device}")


def class_token_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_classes: int,
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
    C = num_classes
    acc = acc_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):  # the maps accumulate in fp32 under autocast too
        logits = torch.matmul(q[:, :, :C].to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, nh, C, N)
        new = logits.softmax(dim=-1)[..., C:].mean(dim=1) * map_weight  # (B, C, P)
    return out, new if maps is None else maps + new


def class_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_classes: int, *,
                          scale: Optional[float] = None, maps: Optional[torch.Tensor] = None,
                          map_weight: Optional[float] = None,
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention over ``(B, nh, N, d)`` q/k/v that also accumulates class-to-patch maps.

    Returns ``(out, maps)``: ``out`` like q; ``maps`` ``(B, C, N - C)`` fp32
    (fp64 for fp64 inputs), or None when ``map_weight`` is None. The path is
    chosen by ``attention_backend``.
    """
    check_inputs(q, k, v, num_classes, maps, map_weight)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if map_weight is not None:
        map_weight = float(map_weight)
    name = attention_backend(q, num_classes, map_weight is not None)
    return _IMPLS[name](q, k, v, num_classes, scale, maps, map_weight)


def triton_supports(q: torch.Tensor, num_classes: int) -> bool:
    """Whether the Triton kernels cover these shapes (head_dim 32/64/128, at most 64 class tokens)."""
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and num_classes <= MAX_CLASS_TOKENS


def _why_triton_cannot(q: torch.Tensor, num_classes: int) -> Optional[str]:
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim must be one of {SUPPORTED_HEAD_DIMS} for the Triton kernels, got {q.shape[-1]}"
    if num_classes > MAX_CLASS_TOKENS:
        return f"num_classes must be <= {MAX_CLASS_TOKENS} for the Triton kernels, got {num_classes}"
    return None


def auto_key(q: torch.Tensor, num_classes: int, with_maps: bool, needs_grad: bool) -> tuple:
    """What ``auto`` measures separately: shapes, class count, dtype, device, maps on/off, backward on/off."""
    return ("class_token_attention", tuple(q.shape), num_classes, str(q.dtype), str(q.device),
            with_maps, needs_grad)


def attention_backend(q: torch.Tensor, num_classes: int, with_maps: bool) -> str:
    """``fused``, ``sdpa+maps`` or ``torch`` for this call (see ``_dispatch`` for the rules).

    A forced Triton backend that cannot run these shapes or this device raises a ValueError naming it.
    """
    name = backend()
    if name == "torch":
        return name
    if name != "auto":
        check_triton_can_run(name, q)
        why = _why_triton_cannot(q, num_classes)
        if why:
            raise InputError(f"CLARITY_FAST_BACKEND={name} cannot run this call: {why}")
        return name
    if not (q.is_cuda and _triton is not None) or q.dtype == torch.float64 or not triton_supports(q, num_classes):
        return "torch"
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    key = auto_key(q, num_classes, with_maps, needs_grad)
    cached = _dispatch.cached_choice(key)
    if cached or torch.compiler.is_compiling():  # no timing while tracing: the eager choice, else fused
        return cached or "fused"
    workloads = {n: _workload(n, q, num_classes, with_maps, needs_grad) for n in ("fused", "sdpa+maps")}
    return _dispatch.choose_fastest(key, workloads, deterministic=("fused",))


def _workload(name: str, q: torch.Tensor, num_classes: int, with_maps: bool, needs_grad: bool):
    """A representative call of backend ``name`` on fresh random inputs shaped like ``q`` (for ``auto``)."""
    qkv = torch.randn((3, *q.shape), dtype=q.dtype, device=q.device, requires_grad=needs_grad)
    B, _, N, _ = q.shape
    grads = [torch.randn_like(q)] + ([torch.randn(B, num_classes, N - num_classes, device=q.device,
                                                  dtype=acc_dtype(q.dtype))] if with_maps else [])

    def run() -> None:
        out, maps = _IMPLS[name](*qkv.unbind(0), num_classes, q.shape[-1] ** -0.5, None,
                                 1.0 if with_maps else None)
        if needs_grad:
            torch.autograd.backward([out] + ([maps] if with_maps else []), grads)
            qkv.grad = None
    return run


def _fused(q, k, v, num_classes, scale, maps, map_weight):
    return _triton.fused_attention(q, k, v, num_classes, scale, maps, map_weight)


def _sdpa_maps(q, k, v, num_classes, scale, maps, map_weight):
    return _triton.sdpa_maps_attention(q, k, v, num_classes, scale, maps, map_weight)


_IMPLS = {"fused": _fused, "sdpa+maps": _sdpa_maps, "torch": class_token_attention_torch}


if triton_available():
    from . import class_token_attention_triton as _triton
else:  # pragma: no cover - exercised by hiding triton
    _triton = None
