"""Attention + class-to-patch maps, forward + backward (SPEC §8).

Anchor: SDPA + a PyTorch recomputation of the class rows with autograd (the reference path).
GPU: B=64, N=1038 (512 px) and N=210 (224 px), nh=6, d=64, bf16. CPU: B=2, N=210, fp32,
Triton skipped (the interpreter is a correctness tool, not a benchmark).
FLOPs: 4·B·nh·N²·d forward, x3.5 forward + backward.
"""
import pytest
import torch

from clarity_fast.kernels import class_token_attention_torch
from clarity_fast.kernels.class_token_attention import class_token_attention_triton

C = 14


def eager_attention(q, k, v, num_class_tokens, scale, maps, map_weight):
    """Materialised softmax: the only way timm exposes attention maps."""
    p = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, dim=-1)
    out = p.to(q.dtype) @ v
    return out, map_weight * p[:, :, :num_class_tokens, num_class_tokens:].mean(1)


def xformers_recompute(q, k, v, num_class_tokens, scale, maps, map_weight):
    import xformers.ops as xops
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)
    _, m = class_token_attention_torch(q, k, v, num_class_tokens, scale, None, map_weight)
    return out, m


def fused(q, k, v, num_class_tokens, scale, maps, map_weight):
    return class_token_attention_triton(q, k, v, num_class_tokens, scale, maps, map_weight)


def fused_no_maps(q, k, v, num_class_tokens, scale, maps, map_weight):
    return class_token_attention_triton(q, k, v, num_class_tokens, scale, None, None)


IMPLS = {
    "sdpa+recompute": (class_token_attention_torch, True),
    "fused+maps": (fused, False),
    "fused, maps off": (fused_no_maps, False),
    "eager softmax": (eager_attention, False),
    "xformers+recompute": (xformers_recompute, False),
}


def shapes():
    if torch.cuda.is_available():
        return [(64, 1038, torch.bfloat16), (64, 210, torch.bfloat16)]
    return [(2, 210, torch.float32)]


@pytest.mark.parametrize("B,N,dtype", shapes(), ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_forward_backward(measure, device, impl, B, N, dtype):
    fn, anchor = IMPLS[impl]
    if impl.startswith("fused") and device.type != "cuda":
        pytest.skip("Triton kernels are benchmarked on CUDA only")
    if impl.startswith("xformers"):
        pytest.importorskip("xformers")
    nh, d = 6, 64
    q, k, v = (torch.randn(B, nh, N, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g_out = torch.randn(B, nh, N, d, device=device, dtype=dtype)
    g_maps = torch.randn(B, C, N - C, device=device)

    def step():
        out, maps = fn(q, k, v, C, d ** -0.5, None, 1.0)
        tensors, grads = [out], [g_out]
        if maps is not None:
            tensors.append(maps)
            grads.append(g_maps)
        torch.autograd.backward(tensors, grads)
        q.grad = k.grad = v.grad = None

    measure(step, group=f"attention B={B} N={N} {str(dtype)[6:]}", name=impl, anchor=anchor,
            flops=3.5 * 4 * B * nh * N * N * d)
