"""clarity_fast: CLARiTy (multi-class-token ViT for chest X-rays) with fused Triton kernels.

``import clarity_fast`` registers ``clarity_s16_224`` and ``clarity_s16_512`` with timm. The kernels
(the repository's top-level ``kernels/`` folder) install as the subpackage ``clarity_fast.kernels``;
from a checkout, install it editable (``pip install -e .``).
"""
from . import kernels
from .clarity import Clarity, ClarityOutput, clarity_s16_224, clarity_s16_512
from .losses import ClarityLoss, LossOutput
from .timm_patch import attention_maps, patch_timm
from .weights import create_model, from_timm, load_pretrained

__version__ = "0.1.0"
__all__ = ["Clarity", "ClarityOutput", "ClarityLoss", "LossOutput", "attention_maps", "clarity_s16_224",
           "clarity_s16_512", "create_model", "from_timm", "load_pretrained", "kernels", "patch_timm"]
