"""class_token_attention (SPEC §4.1): the Triton kernel under TRITON_INTERPRET=1 against an
independent float64 reference, gradients through the maps, determinism and the no-N×N rule."""
import math

import pytest
import torch

from clarity_fast.kernels import class_token_attention, class_token_attention_torch
from clarity_fast.kernels.class_token_attention import _fwd_op, class_token_attention_triton

from conftest import tiny_model

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def naive_reference(q, k, v, C, scale, maps, map_weight):
    """Materialised float64 attention: the independent reference."""
    q, k, v = q.double(), k.double(), v.double()
    p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    new = map_weight * p[:, :, :C, C:].mean(1)
    return p @ v, new if maps is None else maps.double() + new


def _inputs(B, H, N, D, C, dtype, with_maps=True):
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3))
    mdt = torch.float64 if dtype == torch.float64 else torch.float32
    maps = torch.rand(B, C, N - C, dtype=mdt, requires_grad=True) if with_maps else None
    return q, k, v, maps


CASES = [(1, 2, 32), (1, 37, 64), (5, 6, 64), (5, 53, 32), (14, 15, 32), (14, 79, 64), (5, 23, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("C,N,D", CASES)
def test_triton_matches_float64_reference(poisoned_allocations, dtype, C, N, D):
    B, H = 2, 3
    q, k, v, maps = _inputs(B, H, N, D, C, dtype)
    scale, w = D ** -0.5, 0.125
    out, maps_out = class_token_attention_triton(q, k, v, C, scale, maps, w)
    go, gm = torch.randn_like(out), torch.randn_like(maps_out)
    grads = torch.autograd.grad((out * go).sum() + (maps_out * gm).sum(), (q, k, v, maps))

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, maps)]
    ref_out, ref_maps = naive_reference(*ref_in[:3], C, scale, ref_in[3], w)
    ref_grads = torch.autograd.grad((ref_out * go.double()).sum() + (ref_maps * gm.double()).sum(), ref_in)

    tol = TOL[dtype]
    assert out.dtype == dtype and maps_out.dtype == maps.dtype
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(maps_out.double(), ref_maps, **TOL[maps.dtype])
    for name, g, r in zip(("dq", "dk", "dv", "dmaps"), grads, ref_grads):
        scale_g = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double() / scale_g, r / scale_g, **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gradient_through_maps_alone(poisoned_allocations, dtype):
    """Only the maps are in the loss: dq and dk must come from the class rows alone, dv must be 0."""
    q, k, v, _ = _inputs(1, 2, 41, 32, 6, dtype)
    _, maps = class_token_attention_triton(q, k, v, 6, 32 ** -0.5, None, 1.0)
    gm = torch.randn_like(maps)
    dq, dk, dv = torch.autograd.grad((maps * gm).sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, ref_maps = naive_reference(*ref_in, 6, 32 ** -0.5, None, 1.0)
    rq, rk = torch.autograd.grad((ref_maps * gm.double()).sum(), ref_in[:2])
    torch.testing.assert_close(dq.double(), rq, **TOL[dtype])
    torch.testing.assert_close(dk.double(), rk, **TOL[dtype])
    assert (dv == 0).all()
    assert (dq[:, :, 6:] == 0).all(), "patch-row queries do not touch the maps"


def test_plain_attention_without_maps(poisoned_allocations):
    q, k, v, _ = _inputs(2, 2, 29, 64, 3, torch.float32, with_maps=False)
    out, maps = class_token_attention_triton(q, k, v, 3, 0.1, None, None)
    assert maps is None
    ref, _ = naive_reference(q, k, v, 3, 0.1, None, 1.0)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    g = torch.randn_like(out)
    dq, = torch.autograd.grad((out * g).sum(), (q,))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r, _ = naive_reference(*ref_in, 3, 0.1, None, 1.0)
    rq, = torch.autograd.grad((r * g.double()).sum(), ref_in[:1])
    torch.testing.assert_close(dq.double(), rq, **TOL[torch.float32])


def test_gradcheck_fp64_with_maps_in_loss():
    q, k, v, maps = _inputs(1, 2, 7, 32, 2, torch.float64)

    def fn(q, k, v, maps):
        return class_token_attention_triton(q, k, v, 2, 0.3, maps, 0.5)

    assert torch.autograd.gradcheck(fn, (q, k, v, maps), fast_mode=True)


def test_torch_reference_matches_naive():
    q, k, v, maps = _inputs(2, 3, 33, 16, 4, torch.float64)
    out, m = class_token_attention_torch(q, k, v, 4, 0.25, maps, 0.3)
    ref_out, ref_maps = naive_reference(q, k, v, 4, 0.25, maps, 0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(m, ref_maps)


def test_deterministic_bitwise():
    q, k, v, maps = _inputs(2, 2, 45, 32, 5, torch.float32)
    runs = []
    for _ in range(2):
        out, m = class_token_attention_triton(q, k, v, 5, 0.2, maps, 0.25)
        grads = torch.autograd.grad(out.square().sum() + m.square().sum(), (q, k, v, maps))
        runs.append((out, m, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(poisoned_allocations):
    B, N, H, D, C = 2, 31, 2, 32, 3
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out, m = class_token_attention_triton(q, k, v, C, 0.2, None, 1.0)
    (out.sum() + m.sum()).backward()
    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.permute(2, 0, 3, 1, 4).unbind(0)
    ref_out, ref_m = naive_reference(rq, rk, rv, C, 0.2, None, 1.0)
    (ref_out.sum() + ref_m.sum()).backward()
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    torch.testing.assert_close(m.double(), ref_m, **TOL[torch.float32])
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, **TOL[torch.float32])


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_n_by_n_tensor_saved_in_model_step(monkeypatch, backend):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
    model = tiny_model(embed_dim=64, num_heads=2, depth=2)  # head_dim 32, N = 5 + 16 = 21
    N = 21
    x = torch.randn(2, 3, 64, 64)
    shapes = _saved_shapes(lambda: model.forward_outputs(x).maps.sum().backward())
    assert shapes, "the hook saw nothing"
    assert not [s for s in shapes if len(s) >= 2 and s[-1] == N and s[-2] == N], shapes


def test_saved_tensor_check_catches_eager_attention():
    """The check above can fail: materialised attention saves an N×N tensor."""
    q, k, v, _ = _inputs(1, 2, 21, 32, 5, torch.float32, with_maps=False)
    shapes = _saved_shapes(lambda: (torch.softmax(q @ k.transpose(-2, -1), -1) @ v).sum().backward())
    assert (1, 2, 21, 21) in shapes


def test_model_through_triton_matches_torch_backend(monkeypatch):
    model = tiny_model(embed_dim=64, num_heads=2)
    x = torch.randn(2, 3, 64, 64)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
        model.zero_grad()
        out = model.forward_outputs(x)
        (out.logits.sum() + out.maps.square().sum()).backward()
        results[backend] = (out.logits, out.maps, model.blocks[0].attn.qkv.weight.grad.clone())
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_custom_op_schema_fake_and_autograd():
    q, k, v, maps = _inputs(1, 2, 19, 32, 3, torch.float32)
    torch.library.opcheck(_fwd_op, (q, k, v, 3, 0.2, maps, 0.5, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_no_graph_break(monkeypatch):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "triton")
    q, k, v, maps = _inputs(1, 2, 19, 32, 3, torch.float32)

    def fn(q, k, v, maps):
        out, m = class_token_attention(q, k, v, 3, maps=maps, map_weight=0.5)
        return out.sum() + m.sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, maps), fn(q, k, v, maps))


@pytest.mark.parametrize("make,match", [
    (lambda q: (q, q[:, :, :-1], q, 3), "same shape"),
    (lambda q: (q, q, q.double(), 3), "share a dtype"),
    (lambda q: (q, q, q, 19), "num_class_tokens"),
    (lambda q: (q, q, q, 0), "num_class_tokens"),
    (lambda q: (q[0], q[0], q[0], 3), "4-d"),
    (lambda q: (q.int(), q.int(), q.int(), 3), "fp16, bf16, fp32 or fp64"),
    (lambda q: (q, q.to("meta"), q, 3), "one device"),
])
def test_bad_inputs(make, match):
    q = torch.randn(1, 2, 19, 32)
    with pytest.raises(ValueError, match=match):
        class_token_attention(*make(q))


def test_bad_maps_and_triton_limits(monkeypatch):
    q = torch.randn(1, 2, 19, 32)
    with pytest.raises(ValueError, match="maps must have shape"):
        class_token_attention(q, q, q, 3, maps=torch.zeros(1, 3, 15), map_weight=1.0)
    with pytest.raises(ValueError, match="map_weight is None"):
        class_token_attention(q, q, q, 3, maps=torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="maps must be torch.float32"):
        class_token_attention(q, q, q, 3, maps=torch.zeros(1, 3, 16, dtype=torch.float64), map_weight=1.0)
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "triton")
    q48 = torch.randn(1, 2, 19, 48)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        class_token_attention(q48, q48, q48, 3)
    q_big = torch.randn(1, 1, 70, 32)
    with pytest.raises(ValueError, match="num_class_tokens must be <= 64"):
        class_token_attention(q_big, q_big, q_big, 65)


def test_backend_selection_errors(monkeypatch):
    q = torch.randn(1, 1, 5, 32)
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="CLARITY_FAST_BACKEND must be one of"):
        class_token_attention(q, q, q, 1)
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        class_token_attention(q, q, q, 1)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = _inputs(1, 1, 9, 16, 2, torch.float64, with_maps=False)
    out, m = class_token_attention(q, k, v, 2, map_weight=1.0)
    ref_out, ref_m = naive_reference(q, k, v, 2, 1 / math.sqrt(16), None, 1.0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(m, ref_m)


def test_triton_supports_decides_the_auto_fallback():
    from clarity_fast.kernels.class_token_attention import triton_supports
    assert triton_supports(torch.empty(1, 1, 8, 64), 14)
    assert not triton_supports(torch.empty(1, 1, 8, 48), 14)
    assert not triton_supports(torch.empty(1, 1, 80, 64), 65)
