"""class_token_attention (SPEC §4.1): both Triton backends (``fused``, ``sdpa+maps``) under
TRITON_INTERPRET=1 against an independent float64 reference, gradients through the maps,
determinism, the no-N×N rule, bad input and the ``auto`` dispatch."""
import math
import re

import pytest
import torch

from clarity_fast.kernels import _dispatch, class_token_attention, class_token_attention_torch
from clarity_fast.kernels.class_token_attention import attention_backend
from clarity_fast.kernels.class_token_attention_triton import (_class_row_maps_op, _fwd_op, fused_attention,
                                                               sdpa_maps_attention)

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


BACKENDS = {"fused": fused_attention, "sdpa+maps": sdpa_maps_attention}
CASES = [(1, 2, 32), (1, 37, 64), (5, 6, 64), (5, 53, 32), (14, 15, 32), (14, 79, 64), (5, 23, 128)]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("C,N,D", CASES)
def test_triton_matches_float64_reference(poisoned_allocations, backend, dtype, C, N, D):
    B, H = 2, 3
    q, k, v, maps = _inputs(B, H, N, D, C, dtype)
    scale, w = D ** -0.5, 0.125
    out, maps_out = BACKENDS[backend](q, k, v, C, scale, maps, w)
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


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gradient_through_maps_alone(poisoned_allocations, backend, dtype):
    """Only the maps are in the loss: dq and dk must come from the class rows alone, dv must be 0."""
    q, k, v, _ = _inputs(1, 2, 41, 32, 6, dtype)
    _, maps = BACKENDS[backend](q, k, v, 6, 32 ** -0.5, None, 1.0)
    gm = torch.randn_like(maps)
    dq, dk, dv = torch.autograd.grad((maps * gm).sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, ref_maps = naive_reference(*ref_in, 6, 32 ** -0.5, None, 1.0)
    rq, rk = torch.autograd.grad((ref_maps * gm.double()).sum(), ref_in[:2])
    torch.testing.assert_close(dq.double(), rq, **TOL[dtype])
    torch.testing.assert_close(dk.double(), rk, **TOL[dtype])
    assert (dv == 0).all()
    assert (dq[:, :, 6:] == 0).all(), "patch-row queries do not touch the maps"


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_plain_attention_without_maps(poisoned_allocations, backend):
    q, k, v, _ = _inputs(2, 2, 29, 64, 3, torch.float32, with_maps=False)
    out, maps = BACKENDS[backend](q, k, v, 3, 0.1, None, None)
    assert maps is None
    ref, _ = naive_reference(q, k, v, 3, 0.1, None, 1.0)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    g = torch.randn_like(out)
    dq, = torch.autograd.grad((out * g).sum(), (q,))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r, _ = naive_reference(*ref_in, 3, 0.1, None, 1.0)
    rq, = torch.autograd.grad((r * g.double()).sum(), ref_in[:1])
    torch.testing.assert_close(dq.double(), rq, **TOL[torch.float32])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_gradcheck_fp64_with_maps_in_loss(backend):
    q, k, v, maps = _inputs(1, 2, 7, 32, 2, torch.float64)

    def fn(q, k, v, maps):
        return BACKENDS[backend](q, k, v, 2, 0.3, maps, 0.5)

    assert torch.autograd.gradcheck(fn, (q, k, v, maps), fast_mode=True)


def test_torch_reference_matches_naive():
    q, k, v, maps = _inputs(2, 3, 33, 16, 4, torch.float64)
    out, m = class_token_attention_torch(q, k, v, 4, 0.25, maps, 0.3)
    ref_out, ref_maps = naive_reference(q, k, v, 4, 0.25, maps, 0.3)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(m, ref_maps)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_deterministic_bitwise(backend):
    q, k, v, maps = _inputs(2, 2, 45, 32, 5, torch.float32)
    runs = []
    for _ in range(2):
        out, m = BACKENDS[backend](q, k, v, 5, 0.2, maps, 0.25)
        grads = torch.autograd.grad(out.square().sum() + m.square().sum(), (q, k, v, maps))
        runs.append((out, m, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_non_contiguous_inputs(poisoned_allocations, backend):
    B, N, H, D, C = 2, 31, 2, 32, 3
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out, m = BACKENDS[backend](q, k, v, C, 0.2, None, 1.0)
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


@pytest.mark.parametrize("backend", ["fused", "sdpa+maps", "torch"])
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
    for backend in ("torch", "fused", "sdpa+maps"):
        monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
        model.zero_grad()
        out = model.forward_outputs(x)
        (out.logits.sum() + out.maps.square().sum()).backward()
        results[backend] = (out.logits, out.maps, model.blocks[0].attn.qkv.weight.grad.clone())
    for backend in ("fused", "sdpa+maps"):
        for a, b in zip(results["torch"], results[backend]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_custom_ops_schema_fake_and_autograd():
    q, k, v, maps = _inputs(1, 2, 19, 32, 3, torch.float32)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(_fwd_op, (q, k, v, 3, 0.2, maps, 0.5, True), test_utils=checks)
    torch.library.opcheck(_class_row_maps_op, (q[:, :, :3], k, 0.2, maps, 0.5), test_utils=checks)


@pytest.mark.parametrize("backend", ["fused", "sdpa+maps"])
def test_torch_compile_fullgraph_no_graph_break(monkeypatch, backend):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
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
    (lambda q: (q, q, q, 19), "num_classes"),
    (lambda q: (q, q, q, 0), "num_classes"),
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
    for backend in ("fused", "sdpa+maps"):
        monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
        q48 = torch.randn(1, 2, 19, 48)
        with pytest.raises(ValueError, match=re.escape(f"CLARITY_FAST_BACKEND={backend} cannot run") + ".*head_dim must be one of"):
            class_token_attention(q48, q48, q48, 3)
        q_big = torch.randn(1, 1, 70, 32)
        with pytest.raises(ValueError, match="num_classes must be <= 64"):
            class_token_attention(q_big, q_big, q_big, 65)


def test_backend_selection_errors(monkeypatch):
    q = torch.randn(1, 1, 5, 32)
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="CLARITY_FAST_BACKEND must be one of"):
        class_token_attention(q, q, q, 1)
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "triton")  # the old name: refused, with the valid ones listed
    with pytest.raises(ValueError, match="'fused', 'sdpa\\+maps'"):
        class_token_attention(q, q, q, 1)
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "sdpa+maps")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CLARITY_FAST_BACKEND=sdpa\\+maps on cpu tensors needs.*TRITON_INTERPRET=1"):
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


# --------------------------------------------------------------------------- bugs found by review (issue 12)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_non_contiguous_maps_input_is_read_by_its_strides(backend):
    """An incoming maps given as a transposed view must be accumulated element by element, not by memory order."""
    B, H, N, D, C = 2, 2, 29, 32, 4
    q, k, v, _ = _inputs(B, H, N, D, C, torch.float32, with_maps=False)
    maps = torch.rand(B, N - C, C).transpose(1, 2)
    assert not maps.is_contiguous()
    _, m = BACKENDS[backend](q, k, v, C, 0.2, maps, 0.5)
    _, ref = naive_reference(q, k, v, C, 0.2, maps, 0.5)
    torch.testing.assert_close(m.double(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("maps_in_loss", [True, False])
def test_very_negative_class_row_lse_gives_finite_exact_gradients(backend, maps_in_loss):
    """Class rows whose log-sum-exp is far below -88 (exp underflows in fp32), N not a multiple of the
    block: out-of-range columns must not turn exp(s - lse) into inf and the gradients into NaN."""
    B, H, N, D, C = 1, 2, 37, 32, 3
    u = torch.randn(D).abs() + 1.0
    k = (u + 0.01 * torch.randn(B, H, N, D)).requires_grad_()
    q = torch.randn(B, H, N, D)
    q[:, :, :C] = -20.0 * u  # class-row scores near -20 * |u|^2 / sqrt(D), LSE well below -88
    q.requires_grad_()
    v = torch.randn(B, H, N, D, requires_grad=True)
    out, m = BACKENDS[backend](q, k, v, C, D ** -0.5, None, 1.0)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_m = naive_reference(*ref_in, C, D ** -0.5, None, 1.0)
    lse = torch.logsumexp(ref_in[0][:, :, :C] @ ref_in[1].transpose(-2, -1) * D ** -0.5, -1)
    assert lse.max() < -88, lse
    go, gm = torch.randn_like(out), torch.randn_like(m)
    loss = (out * go).sum() + ((m * gm).sum() if maps_in_loss else 0)
    r_loss = (r_out * go.double()).sum() + ((r_m * gm.double()).sum() if maps_in_loss else 0)
    grads = torch.autograd.grad(loss, (q, k, v))
    r_grads = torch.autograd.grad(r_loss, ref_in)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_maps_outside_the_loss_cost_no_maps_backward(monkeypatch, backend):
    """Maps computed but not in the loss: the class-row backward kernels are never launched."""
    import clarity_fast.kernels.class_token_attention_triton as T
    calls = []
    real = T._launch_class_rows_dq
    monkeypatch.setattr(T, "_launch_class_rows_dq", lambda *a: calls.append(1) or real(*a))
    q, k, v, _ = _inputs(1, 2, 21, 32, 3, torch.float32, with_maps=False)
    out, m = BACKENDS[backend](q, k, v, 3, 0.2, None, 1.0)
    out.sum().backward()
    assert not calls
    q.grad = None
    out, m = BACKENDS[backend](q, k, v, 3, 0.2, None, 1.0)
    (out.sum() + m.sum()).backward()
    assert calls == [1]


# --------------------------------------------------------------------------- auto dispatch


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """``auto`` as on CUDA, on CPU tensors: candidates are timed by a fake timer (the interpreter is no benchmark)."""
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "auto")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    _dispatch.clear_backend_cache()
    timed = []
    speeds = {"fused": 2.0, "sdpa+maps": 1.0}
    monkeypatch.setattr(_dispatch, "timer", lambda name, fn: timed.append(name) or speeds[name])
    yield timed, speeds
    _dispatch.clear_backend_cache()


def test_auto_measures_once_per_shape_and_caches(auto_on_cpu):
    timed, speeds = auto_on_cpu
    q = torch.randn(1, 2, 21, 32, requires_grad=True)
    assert attention_backend(q, 3, True) == "sdpa+maps"
    assert sorted(timed) == ["fused", "sdpa+maps"]
    speeds.update(fused=0.5)  # a later change of speed is not seen: the choice is cached
    assert attention_backend(q, 3, True) == "sdpa+maps" and len(timed) == 2
    assert attention_backend(q, 3, False) == "fused" and len(timed) == 4  # maps off: its own measurement
    report = _dispatch.backend_report()
    assert [r["choice"] for r in report] == ["sdpa+maps", "fused"]
    assert report[0]["key"][1] == (1, 2, 21, 32) and report[0]["seconds"] == {"fused": 2.0, "sdpa+maps": 1.0}


def test_auto_in_deterministic_mode_picks_only_deterministic_paths(auto_on_cpu):
    timed, _ = auto_on_cpu
    q = torch.randn(1, 2, 21, 32)
    torch.use_deterministic_algorithms(True)
    try:
        assert attention_backend(q, 3, True) == "fused"
    finally:
        torch.use_deterministic_algorithms(False)
    assert timed == []
    assert attention_backend(q, 3, True) == "sdpa+maps"


def test_auto_runs_the_reference_where_the_kernels_do_not_apply(auto_on_cpu):
    timed, _ = auto_on_cpu
    assert attention_backend(torch.randn(1, 2, 21, 48), 3, True) == "torch"  # head_dim 48
    assert attention_backend(torch.randn(1, 1, 80, 32), 70, True) == "torch"  # more than 64 classes
    assert attention_backend(torch.randn(1, 1, 21, 32, dtype=torch.float64), 3, True) == "torch"
    assert timed == []


def test_auto_workloads_run_both_backends(auto_on_cpu, monkeypatch):
    """The timed workloads are real calls with a backward: run them (through the interpreter) once."""
    ran = []
    monkeypatch.setattr(_dispatch, "timer", lambda name, fn: fn() or ran.append(name) or len(ran))
    q = torch.randn(1, 2, 21, 32, requires_grad=True)
    assert attention_backend(q, 3, True) == "fused"
    assert ran == ["fused", "sdpa+maps"]
