"""CLARiTy: a ViT with one class token per pathology (SPEC §2), in timm's conventions.

``model(x)`` returns the final logits ``(B, num_classes)``; ``model.forward_outputs(x)``
returns a :class:`ClarityOutput` with every head, the class-to-patch maps A, the
SegmentCAM heatmaps and the localization map Ξ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from .errors import InputError
from .kernels import segmentcam_logits
from .layers import Block, ClassTokenHead, SegmentCAM

__all__ = ["Clarity", "ClarityOutput"]


@dataclass
class ClarityOutput:
    """Everything one forward pass produces. B batch, C classes, (h, w) patch grid, D width.

    logits: ``(B, C)`` final ``(ℓ^C + ℓ^f) / 2`` (``ℓ^C`` when SegmentCAM is off); None, like
    logits_fg / logits_bg / logits_full, from ``forward_outputs(x, segmentcam_logits=False)`` until
    :class:`ClarityLoss` fills them in from its fused pass.
    logits_cls: ``(B, C)`` class-token logits ℓ^C.
    logits_fg / logits_bg / logits_full: ``(B, C)`` SegmentCAM logits, or None.
    maps: ``(B, C, h, w)`` fp32 class-to-patch attention A (Eq. 1), or None when no map layers.
    heatmap_logits / heatmap: ``(B, C, h, w)`` SegmentCAM heatmap before / after sigmoid, or None.
    scores: ``(B, C, h, w)`` per-position class scores S, or None.
    fg_mask: ``(B, C, h, w)`` bool foreground mask ``Hm >= threshold``, or None.
    loc_map: ``(B, C, h, w)`` localization map Ξ = A ⊙ S_f (A alone without SegmentCAM), or None.
    class_states: ``(q, B, C, D)`` class-token outputs of the last q blocks (OCT loss), or None.
    """
    logits: Optional[torch.Tensor]
    logits_cls: torch.Tensor
    logits_fg: Optional[torch.Tensor] = None
    logits_bg: Optional[torch.Tensor] = None
    logits_full: Optional[torch.Tensor] = None
    maps: Optional[torch.Tensor] = None
    heatmap_logits: Optional[torch.Tensor] = None
    heatmap: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    fg_mask: Optional[torch.Tensor] = None
    loc_map: Optional[torch.Tensor] = None
    class_states: Optional[torch.Tensor] = None


class Clarity(nn.Module):
    """CLARiTy Vision Transformer.

    Args:
        img_size: input size (int or (H, W)), each side divisible by ``patch_size``.
        patch_size: patch size s.
        in_chans: image channels (1 for grayscale X-rays, 3 for RGB-replicated).
        num_classes: number of pathologies C = number of class tokens (>= 1).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, init_values: timm ViT hyper-parameters.
        num_map_layers: p, the last blocks whose class-to-patch maps are averaged (0: no maps).
        num_oct_layers: q, the last blocks whose class-token states feed the OCT loss (0: none).
        pool: ``"attn"`` attention pooling or ``"gap"`` (ablation) for ℓ^C.
        segmentcam: build the SegmentCAM heads (False: ℓ = ℓ^C and Ξ = A).
        fg_threshold: t, the foreground threshold on Hm.
        class_token_noise: relative std of the noise that breaks the symmetry of class tokens
            initialised from one source token (SPEC §2); 0 disables it.
        dynamic_img_size: accept other input sizes by resampling the position embeddings.
        drop_rate, proj_drop_rate, drop_path_rate: dropout rates.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 14,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            init_values: Optional[float] = None,
            num_map_layers: int = 8,
            num_oct_layers: int = 8,
            pool: str = "attn",
            segmentcam: bool = True,
            fg_threshold: float = 0.5,
            class_token_noise: float = 0.02,
            dynamic_img_size: bool = False,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise InputError(f"patch_size must be an integer >= 1, got {patch_size!r}")
        if any(s % patch_size for s in img_size):
            raise InputError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be an int >= 1, got {num_classes!r}")
        for name, value in (("num_map_layers", num_map_layers), ("num_oct_layers", num_oct_layers)):
            if not 0 <= value <= depth:
                raise InputError(f"{name} must be in [0, depth={depth}], got {value}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = num_classes
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_map_layers = num_map_layers
        self.num_oct_layers = num_oct_layers
        self.fg_threshold = fg_threshold
        self.class_token_noise = class_token_noise
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC",
                                      strict_img_size=False)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, num_classes, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  init_values=init_values, drop_path=dpr[i], proj_drop=proj_drop_rate, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = ClassTokenHead(embed_dim, num_classes, pool)
        self.segmentcam = SegmentCAM(embed_dim, num_classes) if segmentcam else None
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("head"):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Re-create the class tokens and every class-specific head for ``num_classes`` classes.

        New class tokens start from the mean of the current ones plus symmetry-breaking noise.
        ``global_pool`` may be ``"attn"`` or ``"gap"`` to switch the class-token pooling.
        """
        if not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be an int >= 1, got {num_classes!r}")
        pool = global_pool or self.head.pool
        ref = self.cls_token.detach().mean(dim=1, keepdim=True)
        self.num_classes = self.num_prefix_tokens = num_classes
        self.cls_token = nn.Parameter(init_class_tokens(ref, num_classes, self.class_token_noise))
        self.head = ClassTokenHead(self.embed_dim, num_classes, pool).to(ref.device)
        if self.segmentcam is not None:
            self.segmentcam.heatmap_out = nn.Conv2d(self.embed_dim, num_classes, 1).to(ref.device)
            self.segmentcam.classifier = nn.Conv2d(self.embed_dim, num_classes, 1).to(ref.device)
        for blk in self.blocks:
            blk.attn.num_class_tokens = num_classes

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> Tuple[int, int]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise InputError(f"x must be a 4-d image batch (B, {self.in_chans}, H, W), got "
                             f"{getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.in_chans:
            raise InputError(f"x must have in_chans={self.in_chans} channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise InputError(f"x height and width must be divisible by patch_size={self.patch_size}, "
                             f"got {H}x{W}")
        grid = (H // self.patch_size, W // self.patch_size)
        if grid != tuple(self.grid_size) and not self.dynamic_img_size:
            raise InputError(f"x must be {self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} "
                             f"for this model, got {H}x{W}; build it with that img_size or "
                             f"dynamic_img_size=True")
        return grid

    def _pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        if grid == tuple(self.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=0)

    def _forward_tokens(self, x: torch.Tensor, with_maps: bool = True
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Tuple[int, int]]:
        """Run the backbone. Returns normed tokens (B, N, D), maps (B, C, P) or None,
        class states (q, B, C, D) or None, and the patch grid (h, w)."""
        grid = self._check_input(x)
        x = self.patch_embed(x).flatten(1, 2) + self._pos_embed(grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x)
        depth, C = len(self.blocks), self.num_classes
        first_map_block = depth - self.num_map_layers if with_maps else depth
        maps, states = None, []
        for i, blk in enumerate(self.blocks):
            map_weight = 1.0 / self.num_map_layers if i >= first_map_block else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, maps = checkpoint(blk, x, maps, map_weight, use_reentrant=False)
            else:
                x, maps = blk(x, maps, map_weight)
            if i >= depth - self.num_oct_layers:
                states.append(x[:, :C])
        class_states = torch.stack(states) if states else None
        return self.norm(x), maps, class_states, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` -> normed tokens ``(B, C + P, D)`` (class tokens first)."""
        return self._forward_tokens(x)[0]

    def _heads(self, tokens: torch.Tensor, grid: Tuple[int, int], segmentcam_logits_now: bool = True
               ) -> ClarityOutput:
        C = self.num_classes
        logits_cls = self.head(tokens[:, :C])
        if self.segmentcam is None:
            return ClarityOutput(logits=logits_cls, logits_cls=logits_cls)
        f0 = tokens[:, C:].transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, *grid)
        heatmap_logits, scores = self.segmentcam(f0)
        heatmap = heatmap_logits.sigmoid()
        if not segmentcam_logits_now:  # ClarityLoss computes them in its one fused pass
            return ClarityOutput(logits=None, logits_cls=logits_cls, heatmap_logits=heatmap_logits, heatmap=heatmap,
                                 scores=scores)
        fg, bg, full = segmentcam_logits(heatmap, scores)
        return ClarityOutput(logits=(logits_cls + fg) / 2, logits_cls=logits_cls, logits_fg=fg, logits_bg=bg,
                             logits_full=full, heatmap_logits=heatmap_logits, heatmap=heatmap, scores=scores)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normed tokens ``(B, C + P, D)`` -> final logits ``(B, C)``, or with ``pre_logits``
        the normed class tokens ``(B, C, D)``. The patch grid is the model's own, or square."""
        if pre_logits:
            return x[:, :self.num_classes]
        return self._heads(x, self._grid_of(x.shape[1] - self.num_classes)).logits

    def _grid_of(self, num_patches: int) -> Tuple[int, int]:
        if num_patches == self.grid_size[0] * self.grid_size[1]:
            return tuple(self.grid_size)
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise InputError(f"cannot infer the patch grid of {num_patches} patches; "
                             f"use forward_outputs for non-square inputs")
        return side, side

    def forward_outputs(self, x: torch.Tensor, segmentcam_logits: bool = True) -> ClarityOutput:
        """Images ``(B, in_chans, H, W)`` -> :class:`ClarityOutput` with every head and map.

        ``segmentcam_logits=False`` (training) leaves ℓ^f, ℓ^b, ℓ^full and ℓ to :class:`ClarityLoss`,
        which computes them once, in the same fused pass as the SegmentCAM losses."""
        tokens, maps, class_states, grid = self._forward_tokens(x)
        out = self._heads(tokens, grid, segmentcam_logits)
        out.class_states = class_states
        if maps is not None:
            out.maps = maps.reshape(maps.shape[0], self.num_classes, *grid)
        if out.heatmap is not None:
            out.fg_mask = out.heatmap.detach() >= self.fg_threshold
            if out.maps is not None:
                out.loc_map = out.maps.detach() * out.fg_mask
        elif out.maps is not None:
            out.loc_map = out.maps.detach()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` -> final logits ``(B, num_classes)`` (no maps computed)."""
        tokens, _, _, grid = self._forward_tokens(x, with_maps=False)
        return self._heads(tokens, grid).logits


def init_class_tokens(source: torch.Tensor, num_classes: int, noise: float) -> torch.Tensor:
    """``(1, 1, D)`` source token -> ``(1, C, D)`` copies plus noise of std ``noise·‖t‖/√D`` (SPEC §2)."""
    tokens = source.expand(1, num_classes, -1).clone()
    if noise > 0:
        std = noise * source.norm() / math.sqrt(source.shape[-1])
        tokens = tokens + torch.randn_like(tokens) * std
    return tokens


def _cfg(img_size: int, **kwargs) -> Dict:
    return {
        "url": "", "num_classes": 14, "input_size": (3, img_size, img_size), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "notes": ("No hosted weights: pass a local DINO ViT-S/16 checkpoint "
                  "(pretrained_cfg_overlay=dict(file=...)) or use clarity_fast.create_model(name, pretrained=path).",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "clarity_s16_224.untrained": _cfg(224),
    "clarity_s16_512.untrained": _cfg(512),
})


def _create_clarity(variant: str, pretrained: bool = False, **kwargs) -> Clarity:
    from .weights import checkpoint_filter_fn
    return build_model_with_cfg(Clarity, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def clarity_s16_224(pretrained: bool = False, **kwargs) -> Clarity:
    """CLARiTy-S-16-224: ViT-S/16, 14 class tokens, 224 x 224 (P = 196, N = 210)."""
    args = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_clarity("clarity_s16_224", pretrained, **dict(args, **kwargs))


@register_model
def clarity_s16_512(pretrained: bool = False, **kwargs) -> Clarity:
    """CLARiTy-S-16-512: ViT-S/16, 14 class tokens, 512 x 512 (P = 1024, N = 1038)."""
    args = dict(img_size=512, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_clarity("clarity_s16_512", pretrained, **dict(args, **kwargs))
