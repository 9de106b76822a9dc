"""What every op shares: backend selection (SPEC §4, "Dispatch"), the Triton probe, accumulation dtypes.

``CLARITY_FAST_BACKEND`` = ``auto`` (default) | ``fused`` | ``sdpa+maps`` | ``torch``:

- ``auto``: on CUDA, each op picks its fastest Triton path, measured once per
  (shapes, dtype, device) on first use and cached, like ``cudnn.benchmark``
  (``backend_report()`` lists the choices); under
  ``torch.use_deterministic_algorithms(True)`` only deterministic paths are
  candidates. CPU tensors run the PyTorch reference.
- ``fused``: the fused Triton kernels of every op.
- ``sdpa+maps``: attention from ``F.scaled_dot_product_attention`` with Triton
  only for the class rows; the other ops run their Triton kernels.
- ``torch``: always the PyTorch reference.

A forced Triton backend on CPU tensors runs the Triton interpreter, which must
have been enabled with ``TRITON_INTERPRET=1`` before import.
"""
from __future__ import annotations

import logging
import os
import statistics
from typing import Callable, Dict, Hashable, List, Sequence

import torch

from ..errors import InputError

BACKENDS = ("auto", "fused", "sdpa+maps", "torch")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and maps / saved-statistics) dtype for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype of a torch floating dtype (Triton imported here, on first use)."""
    import triton.language as tl
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]
_LOG = logging.getLogger("clarity_fast.kernels")


def backend() -> str:
    """The backend named by ``CLARITY_FAST_BACKEND`` (validated)."""
    name = os.environ.get("CLARITY_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise InputError(f"CLARITY_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON = _probe_triton()


def triton_available() -> bool:
    """Whether Triton could be imported (checked once, at import): without it every op runs its reference."""
    return _TRITON


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_can_run(name: str, t: torch.Tensor) -> None:
    """Raise a ValueError naming the forced backend ``name`` when Triton cannot run on ``t``'s device."""
    if not triton_available():
        raise InputError(f"CLARITY_FAST_BACKEND={name} needs Triton, which is not installed")
    if not t.is_cuda and not interpreter_enabled():
        raise InputError(f"CLARITY_FAST_BACKEND={name} on {t.device.type} tensors needs the Triton interpreter: "
                         "set TRITON_INTERPRET=1 before clarity_fast is imported")


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op with a single Triton path runs it on tensor ``t``."""
    name = backend()
    if name == "torch":
        return False
    if name == "auto":
        return t.is_cuda and triton_available()
    check_triton_can_run(name, t)
    return True


# --------------------------------------------------------------------------- auto: measured once, cached

Timer = Callable[[str, Callable[[], None]], float]


def cuda_median_seconds(name: str, fn: Callable[[], None], warmup: int = 2, reps: int = 10) -> float:
    """Median of ``reps`` runs of ``fn`` timed with CUDA events, after ``warmup`` runs (compilation, autotune)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


timer: Timer = cuda_median_seconds  # replaced by a fake in CPU tests
_CHOICES: Dict[Hashable, dict] = {}


def choose_fastest(key: Hashable, candidates: Dict[str, Callable[[], None]],
                   deterministic: Sequence[str]) -> str:
    """The fastest of ``candidates`` (name -> a representative workload) for ``key``, timed once and cached.

    Under ``torch.use_deterministic_algorithms(True)`` only the names in ``deterministic`` compete.
    """
    det = torch.are_deterministic_algorithms_enabled()
    cache_key = (key, det)
    if cache_key not in _CHOICES:
        names = [n for n in candidates if not det or n in deterministic]
        if not names:
            raise InputError(f"no deterministic backend among {list(candidates)} for {key}")
        times = {n: timer(n, candidates[n]) for n in names} if len(names) > 1 else {names[0]: float("nan")}
        choice = min(times, key=times.get)  # a lone candidate is not timed
        _CHOICES[cache_key] = dict(key=key, deterministic=det, choice=choice, seconds=times)
        _LOG.info("clarity_fast auto backend for %s: %s (%s)", key, choice,
                  ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items()))
    return _CHOICES[cache_key]["choice"]


def cached_choice(key: Hashable) -> str | None:
    """The cached choice for ``key`` in the current deterministic mode, or None if not measured yet."""
    entry = _CHOICES.get((key, torch.are_deterministic_algorithms_enabled()))
    return entry["choice"] if entry else None


def backend_report() -> List[dict]:
    """Every choice ``auto`` made so far: ``key``, ``deterministic``, ``choice`` and ``seconds`` per candidate."""
    return [dict(entry) for entry in _CHOICES.values()]


def clear_backend_cache() -> None:
    _CHOICES.clear()
