"""Offline weights: DINO / timm ViT checkpoints -> CLARiTy, and ``from_timm``.

Accepted checkpoint layouts (``.pth``/``.pt``/``.bin`` or ``.safetensors``):

- original DINO: a plain backbone state dict, or a training checkpoint
  ``{"teacher": {"module.backbone.*": ...}, "student": ...}`` (teacher preferred);
- timm ``vit_*`` (e.g. ``vit_small_patch16_224.dino``), with or without ``head``;
- a CLARiTy state dict (``cls_token`` already ``(1, C, D)``).

Single-token sources become C class tokens ``cls_token + cls_pos_embed`` plus
noise (SPEC §2); patch position embeddings are resampled (bicubic) to the new
grid; RGB patch-embedding kernels are summed for ``in_chans=1``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from .clarity import Clarity, init_class_tokens
from .errors import InputError

BACKBONE_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
DROPPED_PREFIXES = ("head.", "fc_norm.", "reg_token", "attn_pool.")
WRAPPER_KEYS = ("teacher", "state_dict", "model", "student")
MODULE_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def load_checkpoint_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a local ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file into a dict (no download)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects weights_only refuses
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise InputError(f"{path} is not a readable checkpoint file ({first[:160]})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path} holds a {type(checkpoint).__name__}, not a state dict of tensors")
    return checkpoint


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


def load_pretrained(model: Clarity, path: Union[str, Path]) -> Clarity:
    """Load a local DINO / timm / CLARiTy checkpoint file into ``model`` (strict)."""
    state = convert_to_clarity(load_checkpoint_file(path), model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes that do not fit: another width, patch size or class count
        detail = " ".join(str(e).split())[:300]
        raise InputError(f"{path} does not fit this model (check num_classes and model_args): {detail}") from None
    return model


def create_model(model_name: str, pretrained: Union[None, bool, str, Path] = None, **kwargs) -> Clarity:
    """Create a registered CLARiTy model; ``pretrained`` is a local checkpoint path or None.

    ``kwargs`` go to the model constructor (``num_classes``, ``in_chans``, ``img_size``, ...).
    """
    if pretrained is True:
        raise InputError("pretrained=True: no weights can be downloaded; pass the path of a local "
                         "DINO ViT-S/16 checkpoint (.pth or .safetensors) as pretrained")
    known = timm.list_models("clarity_*")
    if model_name not in known:
        raise InputError(f"model_name must name a CLARiTy model ({', '.join(known)}), got {model_name!r}")
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


def from_timm(vit: nn.Module, num_classes: int = 14, **kwargs) -> Clarity:
    """Turn a timm ``VisionTransformer`` (any width, depth, patch size) into a CLARiTy model.

    Hyper-parameters and weights are taken from ``vit``; ``kwargs`` override model
    options (``class_token_noise``, ``num_map_layers``, ``in_chans``, ...).
    Register tokens and classifier heads of ``vit`` are dropped.
    """
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(vit, VisionTransformer):
        raise InputError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
    if getattr(vit, "cls_token", None) is None:
        raise InputError("vit must have a class token (class_token=True) to initialise the class tokens")
    blk = vit.blocks[0]
    if not isinstance(blk.attn.q_norm, nn.Identity) or not isinstance(blk.attn.norm, nn.Identity):
        raise InputError("vit uses qk_norm / scale_norm, which the CLARiTy attention does not support")
    ls = getattr(blk, "ls1", None)
    config = dict(
        img_size=tuple(vit.patch_embed.img_size), patch_size=vit.patch_embed.patch_size[0],
        in_chans=vit.patch_embed.proj.in_channels, num_classes=num_classes, embed_dim=vit.embed_dim,
        depth=len(vit.blocks), num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None, init_values=1.0 if hasattr(ls, "gamma") else None,
        norm_eps=vit.norm.eps if isinstance(vit.norm, nn.LayerNorm) else 1e-6,
        num_map_layers=min(8, len(vit.blocks)), num_oct_layers=min(8, len(vit.blocks)),
    )
    config.update(kwargs)
    model = Clarity(**config).to(vit.cls_token.device)
    model.load_state_dict(convert_to_clarity(vit.state_dict(), model), strict=True)
    return model
