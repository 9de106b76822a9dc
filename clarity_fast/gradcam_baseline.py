"""The baseline users would otherwise reach for: a plain ViT (one class token) of the same size, trained on the
same data with the same budget, localizing with Grad-CAM from the ``grad-cam`` package (pytorch-grad-cam).

``pip install "clarity_fast[gradcam]"``; only :meth:`GradCAMViT.forward_outputs` in eval mode needs it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Set

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .clarity import ClarityOutput
from .errors import InputError
from .pathologies import default_class_names


class GradCAMViT(nn.Module):
    """timm ``VisionTransformer`` (class token, ``global_pool="token"``) with CLARiTy's ``forward_outputs``.

    Training: ``forward_outputs(x).logits`` only (``ClarityLoss`` then reduces to the classification loss).
    Eval mode: also ``loc_map`` ``(B, C, H, W)``, Grad-CAM of every class on the last block's ``norm1``, the
    patch tokens reshaped to the grid (the class token dropped), at input resolution.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 1, num_classes: int = 14,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 label_names: Optional[Sequence[str]] = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.vit = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                     num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                     global_pool="token", drop_path_rate=drop_path_rate)
        self.in_chans, self.num_classes = in_chans, num_classes
        names = tuple(label_names or default_class_names(num_classes))
        if len(names) != num_classes:
            raise InputError(f"label_names must be {num_classes} names, got {len(names)}")
        self.class_names = names
        self.pretrained_cfg: Dict = {"label_names": names}

    @classmethod
    def like(cls, model_args: Dict, classes: Sequence[str], drop_path_rate: float = 0.0) -> "GradCAMViT":
        """The baseline sized as a CLARiTy ``model_args`` (image and patch size, width, depth, heads, channels)."""
        keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
        return cls(num_classes=len(classes), label_names=classes, drop_path_rate=drop_path_rate,
                   **{k: model_args[k] for k in keys if k in model_args})

    @property
    def patch_embed(self) -> nn.Module:
        """The ViT's patch embedding (image size, grid), as on :class:`Clarity`."""
        return self.vit.patch_embed

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"vit." + k for k in self.vit.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def forward_outputs(self, x: torch.Tensor, segmentcam_logits: bool = True) -> ClarityOutput:
        if self.training:
            logits = self.vit(x)
            return ClarityOutput(logits=logits, logits_cls=logits)
        with torch.no_grad():
            logits = self.vit(x)
        return ClarityOutput(logits=logits, logits_cls=logits, loc_map=self.grad_cam(x))

    def grad_cam(self, x: torch.Tensor) -> torch.Tensor:
        """Grad-CAM maps of every class, ``(B, C, H, W)`` float32 in [0, 1] (pytorch-grad-cam's scaling)."""
        try:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        except ImportError:
            raise InputError("the Grad-CAM baseline needs the grad-cam package: pip install "
                             "\"clarity_fast[gradcam]\" (or pip install grad-cam)") from None
        vit, (h, w) = self.vit, self.vit.patch_embed.dynamic_feat_size(x.shape[-2:])

        def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:  # (B, prefix + h*w, D) -> (B, D, h, w)
            return t[:, vit.num_prefix_tokens:].reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2)

        maps = []
        with torch.enable_grad(), GradCAM(model=vit, target_layers=[vit.blocks[-1].norm1],
                                           reshape_transform=tokens_to_grid) as cam:
            for c in range(self.num_classes):
                maps.append(torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x))))
        return torch.stack(maps, dim=1).float().to(x.device)
