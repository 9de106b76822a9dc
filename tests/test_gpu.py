"""Compiled-Triton checks on CUDA (skipped without a GPU; run by benchmarks/gpu_check.sh).

Both Triton backends (``fused``, ``sdpa+maps``) in bf16 / fp16 / fp32 at the full 224 and 512 shapes
(nh=6, d=64, C=14) against a float64 reference: relative error ‖x − ref‖ / ‖ref‖ of out, maps, dq,
dk, dv, dmaps with the maps in the loss; then determinism, the model, torch.compile and ``auto``.
"""
import pytest
import torch

from clarity_fast.kernels import backend_report, class_token_attention, clear_backend_cache
from clarity_fast.kernels.class_token_attention_triton import fused_attention, sdpa_maps_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = {"fused": fused_attention, "sdpa+maps": sdpa_maps_attention}
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def reference(q, k, v, C, scale, maps, w):
    q, k, v = q.double(), k.double(), v.double()
    p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    return p @ v, maps.double() + w * p[:, :, :C, C:].mean(1)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("N", [210, 1038, 333])
def test_compiled_kernels_against_float64(backend, dtype, N):
    torch.manual_seed(0)
    B, nh, d, C = 4, 6, 64, 14
    q, k, v = (torch.randn(B, nh, N, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    maps = torch.rand(B, C, N - C, device="cuda", requires_grad=True)
    out, m = BACKENDS[backend](q, k, v, C, d ** -0.5, maps, 0.125)
    go, gm = torch.randn_like(out), torch.randn_like(m) * 100
    grads = torch.autograd.grad((out * go).sum() + (m * gm).sum(), (q, k, v, maps))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, maps)]
    r_out, r_m = reference(*ref_in[:3], C, d ** -0.5, ref_in[3], 0.125)
    r_grads = torch.autograd.grad((r_out * go.double()).sum() + (r_m * gm.double()).sum(), ref_in)
    errors = {"out": rel_err(out, r_out), "maps": rel_err(m, r_m)}
    errors.update({n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv", "dmaps"), grads, r_grads)})
    print(f"\n{backend} {str(dtype)[6:]} N={N}: " + ", ".join(f"{k_}={v_:.2e}" for k_, v_ in errors.items()))
    assert all(e < REL_TOL[dtype] for e in errors.values()), errors


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_compiled_kernels_deterministic(backend):
    q, k, v = (torch.randn(8, 6, 1038, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    runs = []
    for _ in range(2):
        out, m = BACKENDS[backend](q, k, v, 14, 0.125, None, 1.0)
        # sdpa+maps: the class-row kernels must be bitwise stable; SDPA's own backward is PyTorch's
        loss = m.sum() if backend == "sdpa+maps" else out.float().square().sum() + m.sum()
        runs.append((out, m, *torch.autograd.grad(loss, (q, k))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa+maps"])
def test_model_train_step_matches_reference(monkeypatch, backend):
    import clarity_fast
    model = clarity_fast.create_model("clarity_s16_224").cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    results = {}
    for name in ("torch", backend):
        monkeypatch.setenv("CLARITY_FAST_BACKEND", name)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_outputs(x)
            loss = clarity_fast.ClarityLoss()(out, torch.ones_like(out.logits))
        loss.total.backward()
        results[name] = (out.maps.float(), model.blocks[0].attn.qkv.weight.grad.float().clone())
    assert rel_err(results[backend][0], results["torch"][0].double()) < 2e-2
    assert rel_err(results[backend][1], results["torch"][1].double()) < 5e-2


@pytest.mark.parametrize("backend", ["auto", "fused", "sdpa+maps"])
def test_torch_compile_fullgraph_on_cuda(monkeypatch, backend):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)

    def fn(q, k, v):
        out, m = class_token_attention(q, k, v, 14, map_weight=1.0)
        return out.float().sum() + m.sum()

    q, k, v = (torch.randn(2, 6, 210, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), rtol=1e-3, atol=1e-2)
    compiled(q, k, v).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_auto_measures_and_reports_its_choice(monkeypatch):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "auto")
    clear_backend_cache()
    q = torch.randn(4, 6, 210, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, m = class_token_attention(q, q, q, 14, map_weight=1.0)
    (report,) = backend_report()
    assert report["choice"] in ("fused", "sdpa+maps") and set(report["seconds"]) == {"fused", "sdpa+maps"}
    print(f"\nauto at B=4 N=210 bf16: {report['choice']} "
          + ", ".join(f"{n} {s * 1e3:.3f} ms" for n, s in report["seconds"].items()))
    torch.use_deterministic_algorithms(True)
    try:
        q2 = torch.randn(4, 6, 333, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        class_token_attention(q2, q2, q2, 14, map_weight=1.0)
        assert backend_report()[-1]["choice"] == "fused"
    finally:
        torch.use_deterministic_algorithms(False)


def test_auto_backend_falls_back_for_shapes_the_kernels_do_not_cover(monkeypatch):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "auto")
    q = torch.randn(1, 2, 80, 48, device="cuda")  # head_dim 48
    out, m = class_token_attention(q, q, q, 3, map_weight=1.0)
    assert out.shape == q.shape and m.shape == (1, 3, 77)
    q = torch.randn(1, 2, 80, 64, device="cuda")
    out, m = class_token_attention(q, q, q, 70, map_weight=1.0)  # more than 64 classes
    assert m.shape == (1, 70, 10)
