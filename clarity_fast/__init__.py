"""clarity_fast: CLARiTy (multi-class-token ViT for chest X-rays) with fused Triton kernels.

``import clarity_fast`` registers ``clarity_s16_224`` and ``clarity_s16_512`` with timm.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

if _ilu.find_spec(__name__ + ".kernels") is None:
    # A source checkout on sys.path (e.g. `python -m pytest` from the repo root): the kernels live
    # in ../kernels; installs (regular or editable) provide clarity_fast.kernels themselves.
    _dir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    _spec = _ilu.spec_from_file_location(__name__ + ".kernels", _os.path.join(_dir, "__init__.py"),
                                         submodule_search_locations=[_dir])
    _sys.modules[_spec.name] = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules[_spec.name])

from . import kernels  # noqa: E402
from .clarity import Clarity, ClarityOutput, clarity_s16_224, clarity_s16_512  # noqa: E402
from .losses import ClarityLoss, LossOutput  # noqa: E402
from .timm_patch import attention_maps, patch_timm  # noqa: E402
from .weights import create_model, from_timm, load_pretrained  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Clarity", "ClarityOutput", "ClarityLoss", "LossOutput", "attention_maps", "clarity_s16_224",
           "clarity_s16_512", "create_model", "from_timm", "load_pretrained", "kernels", "patch_timm"]
