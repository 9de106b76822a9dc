"""A CLARiTy model in torchxrayvision's conventions, so it drops into an ``xrv`` pipeline.

>>> import torchxrayvision as xrv
>>> model = clarity_fast.xrv_adapter.XRVModel(clarity_model)
>>> img = xrv.datasets.normalize(skimage.io.imread(path), 255)[None]      # (1, H, W) in [-1024, 1024]
>>> img = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(512)])(img)
>>> out = model(torch.from_numpy(img)[None])                               # (1, C), in model.pathologies order

torchxrayvision is not needed to build or run the adapter; it defines only the conventions.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clarity import Clarity
from .data import normalize
from .errors import InputError

XRV_RANGE = 1024.0  # torchxrayvision's images lie in [-1024, 1024]


class XRVModel(nn.Module):
    """torchxrayvision's model interface around a :class:`Clarity` model.

    ``targets`` / ``pathologies``: the model's class names (torchxrayvision's NIH naming by default);
    ``forward(x)``: ``(B, 1, H, W)`` float in [-1024, 1024] (``xrv.datasets.normalize(img, maxval)``), square,
    resized to ``input_resolution`` like torchxrayvision's models do -> ``(B, C)`` logits, or probabilities
    with ``apply_sigmoid``; ``features(x)``: the final patch features ``(B, D, h, w)``, like the convolutional
    trunk of ``xrv.models.DenseNet``.
    """

    def __init__(self, model: Clarity, apply_sigmoid: bool = False) -> None:
        super().__init__()
        if not isinstance(model, Clarity):
            raise InputError(f"model must be a clarity_fast Clarity model, got {type(model).__name__}")
        self.model = model
        self.apply_sigmoid = apply_sigmoid
        self.input_resolution = int(model.patch_embed.img_size[0])

    @property
    def targets(self) -> List[str]:
        return list(self.model.class_names)

    @property
    def pathologies(self) -> List[str]:
        return self.targets

    def _to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """torchxrayvision's ``(B, 1, H, W)`` in [-1024, 1024] -> the CLARiTy input at its resolution."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != 1:
            raise InputError(f"x must be torchxrayvision's (B, 1, H, W) (or (1, H, W)) single-channel image, got "
                             f"{getattr(x, 'shape', type(x))}")
        x = x[None] if x.dim() == 3 else x
        if x.shape[-1] != x.shape[-2]:
            raise InputError(f"x must be square (use xrv.datasets.XRayCenterCrop first), got {tuple(x.shape[-2:])}")
        x = x.float()
        if x.shape[-1] != self.input_resolution:
            x = F.interpolate(x, size=(self.input_resolution,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)
        images = ((x + XRV_RANGE) / (2 * XRV_RANGE)).clamp(0, 1)  # back to [0, 1], the library's image range
        return normalize(images, self.model.in_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(self._to_model_input(x))
        return torch.sigmoid(out) if self.apply_sigmoid else out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(self._to_model_input(x))
        C, (h, w) = self.model.num_classes, self.model.grid_size
        return tokens[:, C:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
