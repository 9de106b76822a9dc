"""Attention maps for free in any timm ViT: swap its attention for ``class_token_attention``.

>>> vit = clarity_fast.patch_timm(timm.create_model("vit_small_patch16_224.dino"), layers=[-1])
>>> logits = vit(x)                                   # unchanged
>>> maps = clarity_fast.attention_maps(vit)           # {11: (B, h, w)} CLS->patch, head-averaged

No N x N tensor is formed; on CUDA the fused Triton kernel runs.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from .errors import InputError
from .kernels import class_token_attention
from .layers import patch_grid


class AttentionWithMaps(Attention):
    """timm ``Attention`` whose softmax runs through ``class_token_attention``; when
    ``record_maps`` is set, ``cls_maps`` holds the head-averaged CLS->patch row ``(B, P)``."""
    num_prefix_tokens: int = 1
    record_maps: bool = False
    cls_maps: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise InputError("patched attention supports neither attn_mask nor is_causal")
        if self.training and self.attn_drop.p > 0:
            raise InputError("patched attention does not support attention dropout in training")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out, maps = class_token_attention(q, k, v, self.num_prefix_tokens, scale=self.scale,
                                          map_weight=1.0 if self.record_maps else None)
        self.cls_maps = maps[:, 0] if maps is not None else None
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def patch_timm(model: nn.Module, layers: Iterable[int] = (-1,)) -> nn.Module:
    """Swap the attention of every block of a timm ``VisionTransformer`` (one class token,
    optionally register tokens) in place; record CLS->patch maps in ``layers`` (negative = from the end).
    Parameters and outputs are unchanged. Returns ``model``."""
    if not isinstance(model, VisionTransformer):
        raise InputError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "cls_token", None) is None:
        raise InputError("model must have a class token (class_token=True) to give CLS->patch maps")
    depth = len(model.blocks)
    wanted = set()
    for i in layers:
        if not -depth <= i < depth:
            raise InputError(f"layers must index the {depth} blocks, got {i}")
        wanted.add(i % depth)
    for i, blk in enumerate(model.blocks):
        if type(blk.attn) not in (Attention, AttentionWithMaps):
            raise InputError(f"blocks.{i}.attn is {type(blk.attn).__name__}; only timm's Attention can be patched")
        blk.attn.__class__ = AttentionWithMaps
        blk.attn.num_prefix_tokens = model.num_prefix_tokens
        blk.attn.record_maps = i in wanted
    return model


def attention_maps(model: nn.Module) -> Dict[int, torch.Tensor]:
    """CLS->patch maps ``{layer: (B, h, w)}`` (fp32, head-averaged) from the last forward of a patched model."""
    grid = tuple(model.patch_embed.grid_size)
    out = {}
    for i, blk in enumerate(model.blocks):
        maps = getattr(blk.attn, "cls_maps", None)
        if maps is None:
            continue
        out[i] = maps.reshape(maps.shape[0], *patch_grid(maps.shape[-1], grid))
    if not out:
        raise InputError("no maps recorded: call patch_timm(model, layers=...) and run a forward first")
    return out
