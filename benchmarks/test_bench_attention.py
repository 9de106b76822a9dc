"""Attention + class-to-patch maps, forward and forward + backward (SPEC §8, issue 12).

Anchor of each group: SDPA (PyTorch's own choice of kernel) + a PyTorch recomputation of the C class
rows with autograd (the ``torch`` backend). Against it: the ``fused`` and ``sdpa+maps`` Triton
backends, ``auto`` (the row name says what it chose), SDPA alone with each kernel pinned (no maps:
the floor any maps must be paid on top of), and eager softmax attention (the only way timm gives maps).

GPU: B in {1, 16, 64}, N in {210, 1038} (224 and 512 px), nh=6, d=64, bf16. CPU: B=2, N=210, fp32, no
Triton rows (the interpreter is a correctness tool, not a benchmark).
FLOPs: 4·B·nh·N²·d forward, x3.5 forward + backward.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from clarity_fast.kernels import attention_backend, class_token_attention, class_token_attention_torch
from clarity_fast.kernels.class_token_attention_triton import fused_attention, sdpa_maps_attention

C = 14
NH, D = 6, 64


def eager_attention(q, k, v, num_classes, scale, maps, map_weight):
    """Materialised softmax: the only way timm exposes attention maps."""
    p = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1)
    out = p.to(q.dtype) @ v
    return out, map_weight * p[:, :, :num_classes, num_classes:].mean(1)


def auto(q, k, v, num_classes, scale, maps, map_weight):
    return class_token_attention(q, k, v, num_classes, scale=scale, maps=maps, map_weight=map_weight)


def sdpa_alone(backend):
    def fn(q, k, v, num_classes, scale, maps, map_weight):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), None
    return fn


IMPLS = {
    "sdpa+recompute": class_token_attention_torch,
    "fused": fused_attention,
    "sdpa+maps": sdpa_maps_attention,
    "auto": auto,
    "sdpa alone: flash": sdpa_alone(SDPBackend.FLASH_ATTENTION),
    "sdpa alone: cudnn": sdpa_alone(SDPBackend.CUDNN_ATTENTION),
    "sdpa alone: efficient": sdpa_alone(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa alone: math": sdpa_alone(SDPBackend.MATH),
    "eager softmax": eager_attention,
}
TRITON_IMPLS = ("fused", "sdpa+maps", "auto")


def shapes():
    if torch.cuda.is_available():
        return [(B, N, torch.bfloat16) for N in (1038, 210) for B in (64, 16, 1)]
    return [(2, 210, torch.float32)]


@pytest.mark.parametrize("B,N,dtype", shapes(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention(measure, device, impl, mode, B, N, dtype):
    fn = IMPLS[impl]
    if impl in TRITON_IMPLS and device.type != "cuda":
        pytest.skip("Triton kernels are benchmarked on CUDA only")
    backward = mode == "fwd+bwd"
    qkv = torch.randn(3, B, NH, N, D, device=device, dtype=dtype, requires_grad=backward)
    q, k, v = qkv.unbind(0)
    g_out = torch.randn(B, NH, N, D, device=device, dtype=dtype)
    g_maps = torch.randn(B, C, N - C, device=device)

    def step():
        with torch.set_grad_enabled(backward):
            out, maps = fn(q, k, v, C, D ** -0.5, None, 1.0)
        if backward:
            tensors, grads = [out], [g_out]
            if maps is not None:
                tensors.append(maps)
                grads.append(g_maps)
            torch.autograd.backward(tensors, grads)
            qkv.grad = None

    try:
        step()
    except RuntimeError as err:  # an SDPA kernel pinned where it does not apply
        pytest.skip(f"{impl}: {str(err).splitlines()[0]}")
    name = impl
    if impl == "auto":
        with torch.set_grad_enabled(backward):
            name = f"auto ({attention_backend(q, C, True)})"
    flops = 4 * B * NH * N * N * D * (3.5 if backward else 1.0)
    measure(step, group=f"attention {mode} B={B} N={N} {str(dtype)[6:]}", name=name,
            anchor=impl == "sdpa+recompute", flops=flops)
