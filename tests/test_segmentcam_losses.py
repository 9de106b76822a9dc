"""segmentcam_losses (SPEC §3, §4.2): the Triton kernels under TRITON_INTERPRET=1 against an
independent float64 reference, edge cases, gradcheck and bad input."""
import math

import pytest
import torch

from clarity_fast.kernels import segmentcam_losses, segmentcam_losses_torch
from clarity_fast.kernels.segmentcam_losses_triton import _seg_fwd_op
from clarity_fast.priors import distance_map

EPS = 1e-6
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.float16: dict(atol=1e-5, rtol=1e-5)}


def loop_reference(hm, s, y, m, d, from_logits):
    """Per-(b, c) Python loop in float64, written from SPEC §3 alone."""
    hm, s = hm.double(), s.double()
    if from_logits:
        hm = torch.sigmoid(hm)
    B, C = y.shape
    fg, bg, full = [], [], []
    prx = cnf = bas = ac = 0.0
    n_pos = 0
    sp = lambda x: math.log1p(math.exp(-abs(x))) + max(x, 0.0)  # noqa: E731
    for b in range(B):
        for c in range(C):
            h_, s_ = hm[b, c].flatten(), s[b, c].flatten()
            fg.append((h_ * s_).sum() / (h_.sum() + EPS))
            bg.append(((1 - h_) * s_).sum() / ((1 - h_).sum() + EPS))
            full.append(s_.mean())
            ac += h_.mean() / (B * C)
            if y[b, c] == 1:
                n_pos += 1
                if m is not None and m[b, c].any():
                    m_, d_ = m[b, c].flatten().double(), d[b, c].flatten().double()
                    prx = prx + (h_ * d_).sum() / (h_.sum() + EPS)
                    cnf = cnf + (h_ * (1 - m_)).sum() / (h_.sum() + EPS)
                bas = bas + torch.nn.functional.softplus(bg[-1]) / (sp(full[-1].item()) + EPS)
    fg, bg, full = (torch.stack(t).reshape(B, C) for t in (fg, bg, full))
    k = max(n_pos, 1)
    z = torch.zeros((), dtype=torch.float64)
    return [z + prx / k, z + cnf / k, z + ac, z + bas / k, fg, bg, full]


def make_case(case, B, C, h, w, dtype, from_logits):
    hm = torch.randn(B, C, h, w) * 3 if from_logits else torch.rand(B, C, h, w)
    s = torch.randn(B, C, h, w) * 2
    m = torch.rand(B, C, h, w) > 0.5
    y = (torch.rand(B, C) > 0.5).float()
    y[0, 0] = 1
    if case == "no positives":
        y.zero_()
    elif case == "all positive":
        y.fill_(1)
    elif case == "empty mask":
        m[0, 0] = False
        m[-1, -1] = False
    elif case == "full mask":
        m.fill_(True)
    elif case == "hm zeros":
        hm = torch.full_like(hm, -30.0 if from_logits else 0.0)
    elif case == "hm ones":
        hm = torch.full_like(hm, 30.0 if from_logits else 1.0)
    d = distance_map(m)
    return hm.to(dtype), s.to(dtype), y, m, d


CASES = ["random", "no positives", "all positive", "empty mask", "full mask", "hm zeros", "hm ones"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("grid", [(14, 14), (32, 32), (7, 9)], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_triton_against_loop_reference(poisoned_allocations, monkeypatch, dtype, grid, case):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "fused")
    from_logits = case in ("random", "empty mask")
    hm, s, y, m, d = make_case(case, 2, 3, *grid, dtype, from_logits)
    hm.requires_grad_(True)
    s.requires_grad_(True)
    out = segmentcam_losses(hm, s, y, m, d, from_logits=from_logits)
    w = torch.randn(7, 2, 3)

    def total(o):
        return (1.3 * o[0] + 0.7 * o[1] + 2.0 * o[2] + 0.5 * o[3] + (o[4] * w[0]).sum() + (o[5] * w[1]).sum()
                + (o[6] * w[2]).sum())

    dhm, ds = torch.autograd.grad(total(out), (hm, s))
    ref_hm, ref_s = (t.detach().double().requires_grad_() for t in (hm, s))
    ref = loop_reference(ref_hm, ref_s, y, m, d, from_logits)
    r_dhm, r_ds = torch.autograd.grad(total(ref), (ref_hm, ref_s))
    for name, a, b in zip(("prx", "cnf", "ac", "bas", "fg", "bg", "full"), out, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, **TOL[torch.float32], msg=name)
    g_tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else TOL[dtype]
    if case in ("hm zeros", "hm ones"):  # 1/eps amplifies fp32 rounding in these degenerate maps
        g_tol = dict(atol=1e-3, rtol=1e-4)
    # gradients are returned in the input dtype: compare with the exact ones rounded to it (with Hm ≡ 0,
    # d ℓ^f / d Hm = S / eps overflows fp16 to inf, exactly as it must)
    torch.testing.assert_close(dhm.double(), r_dhm.to(dtype).double(), **g_tol)
    torch.testing.assert_close(ds.double(), r_ds.to(dtype).double(), **g_tol)
    if case == "no positives":
        assert out[0].item() == 0 and out[1].item() == 0 and out[3].item() == 0


@pytest.mark.parametrize("from_logits", [False, True])
def test_reference_matches_loop_reference(from_logits):
    hm, s, y, m, d = make_case("empty mask", 2, 4, 5, 6, torch.float64, from_logits)
    out = segmentcam_losses_torch(hm, s, y, m, d, EPS, from_logits)
    for a, b in zip(out, loop_reference(hm, s, y, m, d, from_logits)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_without_masks_prx_cnf_zero(monkeypatch):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "fused")
    hm, s, y, _, _ = make_case("random", 2, 3, 5, 5, torch.float32, False)
    out = segmentcam_losses(hm, s, y)
    ref = segmentcam_losses_torch(hm, s, y)
    assert out.prx.item() == 0 and out.cnf.item() == 0
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "fused")
    hm, s, y, m, d = make_case("empty mask", 2, 2, 3, 5, torch.float64, True)
    d = d.double()

    def fn(hm, s):  # L_BAS is left out: its stop-gradient on ℓ^full is invisible to finite differences
        o = segmentcam_losses(hm, s, y, m, d, from_logits=True)
        return torch.stack([o.prx, o.cnf, o.ac]), o.logits_fg, o.logits_bg, o.logits_full

    assert torch.autograd.gradcheck(fn, (hm.requires_grad_(), s.requires_grad_()))


def test_uint8_and_float_masks_and_fp16_dist(monkeypatch):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", "fused")
    hm, s, y, m, d = make_case("random", 2, 3, 6, 6, torch.float32, False)
    ref = segmentcam_losses(hm, s, y, m, d)
    for masks, dist in ((m.to(torch.uint8), d), (m.float(), d.half().float()), (m, d.half())):
        out = segmentcam_losses(hm, s, y, masks, dist)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_custom_op_schema_and_fake():
    hm, s, y, m, d = make_case("random", 2, 3, 4, 5, torch.float32, False)
    torch.library.opcheck(_seg_fwd_op, (hm.requires_grad_(), s.requires_grad_(), y, m, d, False, EPS),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_bad_inputs(monkeypatch, backend):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
    hm, s, y, m, d = make_case("random", 2, 3, 4, 4, torch.float32, False)
    with pytest.raises(ValueError, match="scores must have the heatmap's shape"):
        segmentcam_losses(hm, s[:, :, :3], y, m, d)
    with pytest.raises(ValueError, match="labels must have shape"):
        segmentcam_losses(hm, s, y[:1], m, d)
    with pytest.raises(ValueError, match="masks must have the heatmap's shape"):
        segmentcam_losses(hm, s, y, m[:, :2], d)
    with pytest.raises(ValueError, match="masks and dist must be given together"):
        segmentcam_losses(hm, s, y, m, None)
    with pytest.raises(ValueError, match="labels must contain only 0 and 1"):
        segmentcam_losses(hm, s, torch.full_like(y, 0.5), m, d)
    bad = hm.clone()
    bad[1, 2, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        segmentcam_losses(bad, s, y, m, d)
    bad_s = s.clone()
    bad_s[0, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        segmentcam_losses(hm, bad_s, y, m, d)


# --------------------------------------------------------------------------- precision and input checks (issue 9)


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_softplus_terms_exact_at_very_negative_and_positive_logits(monkeypatch, backend):
    """L_BAS = softplus(ℓ^b) / (softplus(ℓ^full) + ε) and its gradients where ℓ^b ≈ ℓ^full ≈ v, from -30 to 40:
    log(1 + exp(v)) must not lose exp(v) next to 1 (6 % off at v = -15 before the fix). Each class is its own
    positive pair, so per-class gradients are compared at their own scale."""
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
    values = torch.tensor([-30.0, -15.0, -10.0, -7.0, 0.0, 7.0, 15.0, 25.0, 40.0])
    B, C, h, w = 1, len(values), 4, 5
    hm = torch.rand(B, C, h, w, requires_grad=True)
    s = (values.view(1, C, 1, 1) + 0.5 * torch.randn(B, C, h, w)).requires_grad_(True)
    y = torch.ones(B, C)
    out = segmentcam_losses(hm, s, y, eps=EPS)
    dhm, ds = torch.autograd.grad(out.bas, (hm, s))
    ref_in = [hm.detach().double().requires_grad_(), s.detach().double().requires_grad_()]
    ref = segmentcam_losses_torch(*ref_in, y.double(), eps=EPS)
    r_dhm, r_ds = torch.autograd.grad(ref.bas, ref_in)
    assert out.bas.item() == pytest.approx(ref.bas.item(), rel=2e-6)
    for got, want in ((ds, r_ds), (dhm, r_dhm)):
        for c in range(C):  # relative error per class, at that class's gradient scale
            err = (got[0, c].double() - want[0, c]).abs().max() / want[0, c].abs().max()
            assert err < 1e-4, (c, values[c].item(), err.item())


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_fp16_saturated_heatmap_gives_finite_gradients_through_clarity_loss(monkeypatch, backend):
    """Saturated fp16 heatmaps: the loss works on the heatmap logits, so no 1/ε gradient ever meets fp16."""
    from clarity_fast import ClarityLoss, ClarityOutput
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
    B, C, g = 2, 3, 4
    logits = torch.full((B, C, g, g), -20.0, dtype=torch.float16)
    logits[1] = 20.0
    logits.requires_grad_(True)
    scores = torch.randn(B, C, g, g, dtype=torch.float16, requires_grad=True)
    masks = torch.rand(B, C, g, g) > 0.5
    out = ClarityOutput(logits=torch.zeros(B, C), logits_cls=torch.zeros(B, C), heatmap_logits=logits,
                        heatmap=logits.sigmoid(), scores=scores)
    loss = ClarityLoss()(out, torch.ones(B, C), masks=masks)
    loss.total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_priors_outside_01_nan_dist_and_empty_batch_are_refused_alike(monkeypatch, backend):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
    hm, s = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    y = torch.ones(2, 3)
    m = (torch.rand(2, 3, 4, 4) > 0.5).to(torch.uint8)
    d = distance_map(m.bool())
    with pytest.raises(ValueError, match="masks must contain only 0 and 1"):
        segmentcam_losses(hm, s, y, m * 255, d)
    bad_d = d.clone()
    bad_d[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="dist must be finite; 1 entries"):
        segmentcam_losses(hm, s, y, m, bad_d)
    with pytest.raises(ValueError, match="must not be empty"):
        segmentcam_losses(hm[:0], s[:0], y[:0], m[:0], d[:0])
    out = segmentcam_losses(hm, s, y, m.float(), d)  # 0/1 floats are fine
    assert out.invalid.tolist() == [0, 0, 0]


def test_no_gradient_to_the_priors_on_either_backend(monkeypatch):
    hm, s = torch.rand(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    m = torch.rand(2, 3, 4, 4) > 0.5
    results = {}
    for backend in ("fused", "torch"):
        monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
        d = distance_map(m).requires_grad_()
        out = segmentcam_losses(hm, s, torch.ones(2, 3), m, d)
        total = out.prx + out.cnf + out.ac + out.bas
        assert total.grad_fn is not None
        total.backward()
        results[backend] = (total.item(), d.grad)
        hm.grad = None
    assert results["fused"][1] is None and results["torch"][1] is None
    assert results["fused"][0] == pytest.approx(results["torch"][0], rel=1e-5)
