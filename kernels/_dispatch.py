"""Backend selection shared by every op (SPEC §4, "Dispatch").

``CLARITY_FAST_BACKEND`` = ``auto`` (default) | ``triton`` | ``torch``:

- ``auto``: CUDA tensors run the compiled Triton kernels, CPU tensors the
  PyTorch reference;
- ``triton``: always Triton; on CPU tensors that means the Triton interpreter,
  which must have been enabled with ``TRITON_INTERPRET=1`` before import;
- ``torch``: always the PyTorch reference.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    """The backend named by ``CLARITY_FAST_BACKEND`` (validated)."""
    name = os.environ.get("CLARITY_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"CLARITY_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the Triton path."""
    name = backend()
    if name == "torch":
        return False
    if name == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("CLARITY_FAST_BACKEND=triton but triton is not installed")
    if not t.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "CLARITY_FAST_BACKEND=triton on CPU tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before clarity_fast is imported"
        )
    return True
