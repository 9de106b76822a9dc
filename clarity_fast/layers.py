"""Building blocks of the CLARiTy model (thin nn.Module wrappers; the math lives in ops)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_

from .errors import InputError
from .kernels import class_token_attention

POOLS = ("attn", "gap")


class ClassTokenAttention(nn.Module):
    """timm-compatible self-attention (``qkv``, ``proj``) that can emit class-to-patch maps.

    ``forward(x (B, N, D), num_classes, maps, map_weight) -> (x (B, N, D), maps (B, C, P) fp32 or None)``;
    the first ``C = num_classes`` tokens are the class tokens (the model owns that number).
    With ``map_weight`` None no maps are computed and ``maps`` passes through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 proj_bias: bool = True, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise InputError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, num_classes: int, maps: Optional[torch.Tensor] = None,
                map_weight: Optional[float] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if map_weight is None:
            out, _ = class_token_attention(q, k, v, num_classes, scale=self.scale)
        else:
            out, maps = class_token_attention(q, k, v, num_classes, scale=self.scale,
                                              maps=maps, map_weight=map_weight)
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(out)), maps


class Block(nn.Module):
    """Pre-norm ViT block in timm's layout (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, init_values: Optional[float] = None, drop_path: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=nn.LayerNorm, act_layer=nn.GELU) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassTokenAttention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_classes: int, maps: Optional[torch.Tensor] = None,
                map_weight: Optional[float] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, maps = self.attn(self.norm1(x), num_classes, maps, map_weight)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, maps


class ClassTokenHead(nn.Module):
    """Class-token logits ℓ^C from the final normed class tokens ``z (B, C, D) -> (B, C)``.

    ``pool="attn"`` (SPEC §2, Eqs. 8-9, our reading): ``α_c = softmax_d(W_a z_c + b_a)``,
    ``ℓ_c = γ_c Σ_d α_{c,d} z_{c,d} + β_c``. ``pool="gap"``: ``ℓ_c = mean_d z_{c,d}``.
    """

    def __init__(self, embed_dim: int, num_classes: int, pool: str = "attn") -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.reset(num_classes, pool)

    def reset(self, num_classes: int, pool: Optional[str] = None) -> None:
        """Fresh parameters for ``num_classes`` classes (and ``pool``, default: the current one)."""
        pool = pool or self.pool
        if pool not in POOLS:
            raise InputError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        for name in ("attn", "gamma", "beta"):
            if hasattr(self, name):
                delattr(self, name)
        if pool == "attn":
            self.attn = nn.Linear(self.embed_dim, self.embed_dim)
            self.gamma = nn.Parameter(torch.ones(num_classes))
            self.beta = nn.Parameter(torch.zeros(num_classes))
            trunc_normal_(self.attn.weight, std=0.02)
            nn.init.zeros_(self.attn.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.pool == "gap":
            return z.mean(dim=-1)
        alpha = self.attn(z).softmax(dim=-1)
        return self.gamma * (alpha * z).sum(dim=-1) + self.beta


def _conv_bn_relu(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))


class SegmentCAM(nn.Module):
    """SegmentCAM heads on the patch-token grid ``F0 (B, D, h, w)`` (SPEC §2, our reading).

    Returns ``(heatmap_logits, scores)``, both ``(B, C, h, w)``; ``Hm = sigmoid(heatmap_logits)``.
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.heatmap_head = nn.Sequential(_conv_bn_relu(embed_dim), _conv_bn_relu(embed_dim))
        self.feature_head = nn.Sequential(_conv_bn_relu(embed_dim), _conv_bn_relu(embed_dim))
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """Fresh class-specific 1 x 1 convolutions for ``num_classes`` classes (the shared heads stay)."""
        dim = self.heatmap_head[0][0].in_channels
        self.heatmap_out = nn.Conv2d(dim, num_classes, 1)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, f0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.heatmap_out(self.heatmap_head(f0)), self.classifier(self.feature_head(f0))


def patch_grid(num_patches: int, grid_size: Tuple[int, int]) -> Tuple[int, int]:
    """The ``(h, w)`` patch grid of ``num_patches`` tokens: the model's ``grid_size`` when the count matches,
    else the square grid; raises InputError when neither fits (non-square inputs need their own grid)."""
    if num_patches == grid_size[0] * grid_size[1]:
        return tuple(grid_size)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise InputError(f"cannot infer the patch grid of {num_patches} patches (model grid {tuple(grid_size)}); "
                         f"use forward_outputs for non-square inputs")
    return side, side
