"""Multiply-accumulate counting in the convention of the paper's FLOP figures (SPEC §9).

Counts every nn.Linear and nn.Conv2d through forward hooks, plus the attention
matmuls ``q·kᵀ`` and ``p·v`` (``2·nh·N²·d`` per attention layer) explicitly,
so the count does not depend on which attention backend runs.
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch
import torch.nn as nn

from .layers import ClassTokenAttention


def count_macs(model: nn.Module, input_size: Union[int, Tuple[int, int]] = 224) -> Dict[str, int]:
    """MACs of one forward pass on one ``(in_chans, H, W)`` image, by kind and in total."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    counts = {"linear": 0, "conv": 0, "attention": 0}

    def linear_hook(m: nn.Linear, inp, out):
        counts["linear"] += out.numel() * m.in_features

    def conv_hook(m: nn.Conv2d, inp, out):
        kh, kw = m.kernel_size
        counts["conv"] += out.numel() * (m.in_channels // m.groups) * kh * kw

    def attn_hook(m: ClassTokenAttention, inp, out):
        B, N, D = inp[0].shape
        counts["attention"] += 2 * B * N * N * D  # q·kᵀ and p·v over all heads

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, ClassTokenAttention):
            hooks.append(m.register_forward_hook(attn_hook))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, model.in_chans, h, w, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for hk in hooks:
            hk.remove()
    counts["total"] = sum(counts.values())
    return counts
