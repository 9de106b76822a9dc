"""CLARiTy: a ViT with one class token per pathology (SPEC §2), in timm's conventions.

``model(x)`` returns the final logits ``(B, num_classes)``; ``model.forward_outputs(x)``
returns a :class:`ClarityOutput` with every head, the class-to-patch maps A, the
SegmentCAM heatmaps and the localization map Ξ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .errors import InputError
from .kernels import segmentcam_logits
from .layers import Block, ClassTokenHead, SegmentCAM, patch_grid
from .pathologies import CLASS_NAMES, default_class_names

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
        label_names: the C class names, in logit order; default: the 14 NIH names (torchxrayvision's order)
            when ``num_classes == 14``, else ``class_0 ... class_{C-1}``. Exposed as ``model.class_names``
            and as timm's ``pretrained_cfg["label_names"]``; saved with checkpoints.
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
            label_names: Optional[Sequence[str]] = None,
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
        self.class_names = label_names
        self.num_features = self.embed_dim = embed_dim
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
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  init_values=init_values, drop_path=dpr[i], proj_drop=proj_drop_rate, norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = ClassTokenHead(embed_dim, num_classes, pool)
        self.segmentcam = SegmentCAM(embed_dim, num_classes) if segmentcam else None
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("head"):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_prefix_tokens(self) -> int:
        """timm's name for the tokens before the patches: here the C class tokens (= ``num_classes``)."""
        return self.num_classes

    @property
    def class_names(self) -> Tuple[str, ...]:
        """The C class names in logit order (see ``label_names``)."""
        return self._class_names

    @class_names.setter
    def class_names(self, names: Optional[Sequence[str]]) -> None:
        if names is None:
            names = default_class_names(self.num_classes)
        if isinstance(names, str) or len(names) != self.num_classes or not all(isinstance(n, str) for n in names):
            raise InputError(f"label_names must be {self.num_classes} strings (one per class, num_classes="
                             f"{self.num_classes}), got {names!r}")
        if len(set(names)) != len(names):
            raise InputError(f"label_names must be distinct, got {list(names)}")
        self._class_names = tuple(names)
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg["label_names"] = self._class_names

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

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None,
                         label_names: Optional[Sequence[str]] = None) -> None:
        """Re-create the class tokens and every class-specific head for ``num_classes`` classes.

        New class tokens start from the mean of the current ones plus symmetry-breaking noise; each head
        resets itself. ``global_pool`` may be ``"attn"`` or ``"gap"`` to switch the class-token pooling;
        ``label_names`` names the new classes (default as in the constructor).
        """
        if not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes must be an int >= 1 (the class tokens stay), got {num_classes!r}")
        ref = self.cls_token.detach().mean(dim=1, keepdim=True)
        self.num_classes = num_classes
        self.class_names = label_names
        self.cls_token = nn.Parameter(init_class_tokens(ref, num_classes, self.class_token_noise))
        self.head.reset(num_classes, global_pool)
        self.head.to(ref.device)
        if self.segmentcam is not None:
            self.segmentcam.reset(num_classes)
            self.segmentcam.to(ref.device)

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

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images -> tokens ``(B, C + P, D)`` (class tokens first, position embeddings added) and the grid."""
        grid = self._check_input(x)
        x = self.patch_embed(x).flatten(1, 2) + self._pos_embed(grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x), grid

    def _run_block(self, blk: nn.Module, x: torch.Tensor, maps: Optional[torch.Tensor] = None,
                   map_weight: Optional[float] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One block, under activation checkpointing when it is on and gradients are recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, self.num_classes, maps, map_weight, use_reentrant=False)
        return blk(x, self.num_classes, maps, map_weight)

    def _forward_tokens(self, x: torch.Tensor, with_maps: bool = True
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Tuple[int, int]]:
        """Run the backbone. Returns normed tokens (B, N, D), maps (B, C, P) or None,
        class states (q, B, C, D) or None, and the patch grid (h, w)."""
        x, grid = self._embed(x)
        depth, C = len(self.blocks), self.num_classes
        first_map_block = depth - self.num_map_layers if with_maps else depth
        maps, states = None, []
        for i, blk in enumerate(self.blocks):
            map_weight = 1.0 / self.num_map_layers if i >= first_map_block else None
            x, maps = self._run_block(blk, x, maps, map_weight)
            if i >= depth - self.num_oct_layers:
                states.append(x[:, :C])
        class_states = torch.stack(states) if states else None
        return self.norm(x), maps, class_states, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` -> normed tokens ``(B, C + P, D)`` (class tokens first)."""
        return self._forward_tokens(x, with_maps=False)[0]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: block outputs, with the C class tokens as the prefix tokens.

        indices: the last n blocks if an int, all if None, else these block indices.
        Returns the intermediates as ``(B, D, h, w)`` (``output_fmt="NCHW"``) or ``(B, P, D)`` (``"NLC"``),
        each paired with its class tokens ``(B, C, D)`` when ``return_prefix_tokens``; preceded by the
        normed final tokens ``(B, C + P, D)`` unless ``intermediates_only``. No maps are computed.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        C, intermediates = self.num_classes, []
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            x, _ = self._run_block(blk, x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :C] for y in intermediates]
        intermediates = [y[:, C:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's feature API: drop the blocks after the last wanted one (and the norm / heads)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.num_map_layers = min(self.num_map_layers, len(self.blocks))
        self.num_oct_layers = min(self.num_oct_layers, len(self.blocks))
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.head, self.segmentcam = nn.Identity(), None
        return take_indices

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
        return self._heads(x, patch_grid(x.shape[1] - self.num_classes, self.grid_size)).logits

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


# --------------------------------------------------------------- checkpoint conversion (timm's filter fn)
BACKBONE_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
DROPPED_PREFIXES = ("head.", "fc_norm.", "reg_token", "attn_pool.")
WRAPPER_KEYS = ("teacher", "state_dict", "model", "student")
MODULE_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """Strip training wrappers (``teacher``/``model``/...) and prefixes (``module.``, ``backbone.``)."""
    for key in WRAPPER_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in MODULE_PREFIXES:
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    return out


def _is_backbone_key(key: str) -> bool:
    return key.startswith(BACKBONE_PREFIXES)


def _split_pos_embed(pos_embed: torch.Tensor, num_prefix: Optional[int]):
    """``(1, prefix + P, D)`` -> (prefix pos ``(1, prefix, D)``, patch pos ``(1, P, D)``, square side)."""
    n = pos_embed.shape[1]
    if num_prefix is None:
        side = math.isqrt(n)
        num_prefix = n - side * side
    side = math.isqrt(n - num_prefix)
    if side * side != n - num_prefix:
        raise InputError(f"pos_embed with {n} positions ({num_prefix} prefix) is not a square patch grid")
    return pos_embed[:, :num_prefix], pos_embed[:, num_prefix:], side


def convert_to_clarity(state_dict: Dict[str, torch.Tensor], model: Clarity) -> Dict[str, torch.Tensor]:
    """Map a (possibly wrapped) ViT or CLARiTy checkpoint onto ``model``'s full state dict.

    Backbone tensors come from the checkpoint; heads the checkpoint lacks keep the
    model's own initialisation. Raises ValueError naming missing or unexpected keys.
    """
    sd = unwrap_state_dict(state_dict)
    target = model.state_dict()
    is_clarity = any(k.startswith("segmentcam.") for k in sd) or (
        "cls_token" in sd and sd["cls_token"].shape[1] == model.num_classes and model.num_classes > 1)
    num_reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    if not is_clarity:
        sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}
    unexpected = [k for k in sd if k not in target]
    missing = [k for k in target if _is_backbone_key(k) and k not in sd]
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the model: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    out = dict(target)
    for k, v in sd.items():
        if k in target and k not in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
            out[k] = v
    grid = list(model.grid_size)
    if is_clarity:
        _, patch_pos, side = _split_pos_embed(sd["pos_embed"], 0)
        out["cls_token"] = sd["cls_token"]
        if out["cls_token"].shape != target["cls_token"].shape:
            raise InputError(f"checkpoint has {sd['cls_token'].shape[1]} class tokens, the model "
                             f"num_classes={model.num_classes}; build the model with that many classes "
                             f"and call reset_classifier")
    else:
        num_prefix = sd["cls_token"].shape[1] + num_reg
        n = sd["pos_embed"].shape[1]
        if math.isqrt(n) ** 2 == n:  # no_embed_class: no position embedding for prefix tokens
            num_prefix = 0
        prefix_pos, patch_pos, side = _split_pos_embed(sd["pos_embed"], num_prefix)
        source = sd["cls_token"][:, :1] + (prefix_pos[:, :1] if num_prefix else 0)
        out["cls_token"] = init_class_tokens(source.float(), model.num_classes, model.class_token_noise
                                             ).to(sd["cls_token"].dtype)
    if [side, side] != grid:
        patch_pos = resample_abs_pos_embed(patch_pos.float(), grid, [side, side], num_prefix_tokens=0
                                           ).to(patch_pos.dtype)
    out["pos_embed"] = patch_pos
    out["patch_embed.proj.weight"] = _adapt_in_chans(sd["patch_embed.proj.weight"], model.in_chans)
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if out[k].shape != target[k].shape:
            raise InputError(f"checkpoint {k} has shape {tuple(out[k].shape)} after conversion, "
                             f"the model expects {tuple(target[k].shape)}")
    return out


def _adapt_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1 and weight.shape[1] == 3:
        return weight.sum(dim=1, keepdim=True)
    raise InputError(f"checkpoint patch_embed.proj has {weight.shape[1]} input channels; "
                     f"only 3 -> 1 (in_chans=1) conversion is supported, model in_chans={in_chans}")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Clarity) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: used by ``timm.create_model(..., pretrained=True,
    pretrained_cfg_overlay=dict(file=...))``."""
    return convert_to_clarity(state_dict, model)



def _cfg(img_size: int, **kwargs) -> Dict:
    return {
        "url": "", "num_classes": 14, "label_names": CLASS_NAMES, "input_size": (3, img_size, img_size),
        "pool_size": None,
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
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(Clarity, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
    if not isinstance(model, Clarity):  # features_only: timm's FeatureGetterNet around the model
        return model
    names = model.pretrained_cfg.get("label_names")
    # names given to the model win; else the config's (pretrained_cfg_overlay=dict(label_names=...)) if they fit
    model.class_names = (model.class_names if "label_names" in kwargs or not names
                         or len(names) != model.num_classes else names)
    return model


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
