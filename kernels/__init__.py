"""Fused Triton kernels of clarity_fast, installed as ``clarity_fast.kernels`` (SPEC §4)."""
from .class_token_attention import class_token_attention, class_token_attention_torch
from .segmentcam_losses import SegmentCAMLosses, segmentcam_logits, segmentcam_losses, segmentcam_losses_torch

__all__ = ["class_token_attention", "class_token_attention_torch", "SegmentCAMLosses", "segmentcam_logits",
           "segmentcam_losses", "segmentcam_losses_torch"]
