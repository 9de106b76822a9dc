"""Offline weights: read checkpoint files, ``load_pretrained``, ``create_model`` and ``from_timm``.

The conversion itself (``convert_to_clarity``, timm's ``checkpoint_filter_fn``) sits beside the model in
:mod:`clarity_fast.clarity`. Accepted checkpoint layouts (``.pth``/``.pt``/``.bin`` or ``.safetensors``):

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
from pathlib import Path
from typing import Dict, Union

import timm
import torch
import torch.nn as nn

from .clarity import Clarity, convert_to_clarity
from .errors import InputError

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
