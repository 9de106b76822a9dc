"""Fused Triton kernels of clarity_fast, installed as ``clarity_fast.kernels`` (SPEC §4)."""
from ._dispatch import BACKENDS, backend_report, clear_backend_cache
from .class_token_attention import attention_backend, class_token_attention, class_token_attention_torch
from .segmentcam_losses import SegmentCAMLosses, segmentcam_logits, segmentcam_losses, segmentcam_losses_torch

__all__ = ["BACKENDS", "attention_backend", "backend_report", "class_token_attention", "class_token_attention_torch",
           "clear_backend_cache", "SegmentCAMLosses", "segmentcam_logits", "segmentcam_losses",
           "segmentcam_losses_torch"]
