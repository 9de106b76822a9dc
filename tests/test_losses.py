"""Losses (SPEC §3) against values computed by hand on tiny tensors."""
import math

import numpy as np
import pytest
import torch

from clarity_fast import ClarityLoss, ClarityOutput
from clarity_fast.kernels import segmentcam_losses_torch
from clarity_fast.losses import oct_loss
from clarity_fast.priors import distance_map

EPS = 1e-6


def softplus(x):
    return math.log1p(math.exp(x))


def bce(x, y):
    return softplus(x) - x * y


def tiny_inputs():
    """B=1, C=2, 1 x 2 grid. Class 0: Hm [0.5, 1], S [2, 4], M [1, 0], Dist [0, 0.5];
    class 1: Hm [0, 0], S [1, 3], empty mask."""
    hm = torch.tensor([[[[0.5, 1.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    s = torch.tensor([[[[2.0, 4.0]], [[1.0, 3.0]]]], dtype=torch.float64)
    m = torch.tensor([[[[1, 0]], [[0, 0]]]], dtype=torch.bool)
    d = torch.tensor([[[[0.0, 0.5]], [[0.7, 0.9]]]], dtype=torch.float64)
    return hm, s, m, d


def test_segmentcam_losses_by_hand():
    hm, s, m, d = tiny_inputs()
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = segmentcam_losses_torch(hm, s, y, m, d, EPS)
    assert out.logits_fg[0, 0].item() == pytest.approx(5 / (1.5 + EPS), rel=1e-12)
    assert out.logits_bg[0, 0].item() == pytest.approx(1 / (0.5 + EPS), rel=1e-12)
    assert out.logits_full.tolist() == [[3.0, 2.0]]
    assert out.logits_fg[0, 1].item() == 0.0
    assert out.logits_bg[0, 1].item() == pytest.approx(4 / (2 + EPS), rel=1e-12)
    assert out.prx.item() == pytest.approx(0.5 / (1.5 + EPS), rel=1e-12)
    assert out.cnf.item() == pytest.approx(1.0 / (1.5 + EPS), rel=1e-12)
    assert out.ac.item() == pytest.approx(0.375, rel=1e-12)
    assert out.bas.item() == pytest.approx(softplus(1 / (0.5 + EPS)) / (softplus(3.0) + EPS), rel=1e-9)


def test_empty_mask_means_no_constraint():
    hm, s, m, d = tiny_inputs()
    hm[0, 1] = torch.tensor([[0.3, 0.9]])
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # only class 1 positive: its mask is empty
    out = segmentcam_losses_torch(hm, s, y, m, d, EPS)
    assert out.prx.item() == 0.0 and out.cnf.item() == 0.0


def test_no_positive_labels_gives_zero_not_nan():
    hm, s, m, d = tiny_inputs()
    hm.requires_grad_(True)
    s.requires_grad_(True)
    out = segmentcam_losses_torch(hm, s, torch.zeros(1, 2, dtype=torch.float64), m, d, EPS)
    assert out.prx.item() == 0.0 and out.cnf.item() == 0.0 and out.bas.item() == 0.0
    (out.prx + out.cnf + out.bas + out.ac).backward()
    assert torch.isfinite(hm.grad).all() and torch.isfinite(s.grad).all()


def test_oct_and_cct_by_hand():
    states = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])  # q=1, B=1, C=2, D=2: cosine 1/sqrt(2)
    assert oct_loss(states, "oct").item() == pytest.approx(0.5, rel=1e-6)
    assert oct_loss(states, "cct").item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    ortho = torch.eye(3).reshape(1, 1, 3, 3)
    assert oct_loss(ortho).item() == 0.0
    assert oct_loss(torch.randn(2, 3, 1, 8)).item() == 0.0  # C = 1: no pairs


def test_clarity_loss_total_by_hand():
    hm, s, m, d = tiny_inputs()
    y = torch.tensor([[1.0, 0.0]])
    lc, lf, teacher = [0.3, -1.2], [2.0, 0.5], [1.0, -2.0]
    states = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    out = ClarityOutput(logits=(torch.tensor([lc]) + torch.tensor([lf])) / 2, logits_cls=torch.tensor([lc]),
                        logits_fg=torch.tensor([lf]), heatmap=hm.float(), heatmap_logits=hm.logit().clamp(-40, 40),
                        scores=s.float(), class_states=states)
    loss = ClarityLoss()(out, y, masks=m, dist=d.float(), teacher_logits=torch.tensor([teacher]))
    yy = [1.0, 0.0]
    cls = sum(bce(a, t) for a, t in zip(lc, yy)) / 2 + sum(bce(a, t) for a, t in zip(lf, yy)) / 2
    sig = [1 / (1 + math.exp(-t)) for t in teacher]
    kd = sum(softplus((a + b) / 2) - (a + b) / 2 * p for a, b, p in zip(lc, lf, sig)) / 2
    terms = dict(cls=cls, kd=kd, oct=0.5, prx=0.5 / 1.5, cnf=1 / 1.5, ac=0.375,
                 bas=softplus(2.0) / softplus(3.0))
    for k, v in terms.items():
        assert loss.terms[k].item() == pytest.approx(v, rel=1e-4), k
    weights = dict(cls=1, kd=1, oct=0.1, prx=0.5, cnf=0.5, ac=0.1, bas=0.5)
    assert loss.total.item() == pytest.approx(sum(weights[k] * terms[k] for k in terms), rel=1e-4)


def test_cls_pos_weight_by_hand():
    """L_cls with positives weighted w: -(w y log sigmoid(l) + (1 - y) log sigmoid(-l)), mean, for l^C and l^f."""
    hm, s, m, d = tiny_inputs()
    lc, lf = [0.3, -1.2], [2.0, 0.5]
    out = ClarityOutput(logits=None, logits_cls=torch.tensor([lc]), logits_fg=torch.tensor([lf]), heatmap=hm.float(),
                        heatmap_logits=hm.logit().clamp(-40, 40), scores=s.float())
    loss = ClarityLoss(cls_pos_weight=3.0)(out, torch.tensor([[1.0, 0.0]]), masks=m, dist=d.float())
    expected = (3 * softplus(-0.3) + softplus(-1.2)) / 2 + (3 * softplus(-2.0) + softplus(0.5)) / 2
    assert loss.terms["cls"].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="cls_pos_weight must be > 0"):
        ClarityLoss(cls_pos_weight=0.0)


def test_distance_map_matches_brute_force():
    torch.manual_seed(3)
    masks = torch.rand(3, 2, 5, 7) > 0.8
    masks[0, 0] = False  # empty
    dist = distance_map(masks)
    ys, xs = np.mgrid[0:5, 0:7]
    for b in range(3):
        for c in range(2):
            m = masks[b, c].numpy()
            if not m.any():
                assert (dist[b, c] == 0).all()
                continue
            pts = np.stack([ys[m], xs[m]], 1)
            brute = np.sqrt(((np.stack([ys, xs], -1)[:, :, None] - pts) ** 2).sum(-1)).min(-1) / math.hypot(5, 7)
            np.testing.assert_allclose(dist[b, c].numpy(), brute, atol=1e-6)


def _output(B=2, C=3, g=4):
    hm = torch.rand(B, C, g, g)
    return ClarityOutput(logits=torch.randn(B, C), logits_cls=torch.randn(B, C), logits_fg=torch.randn(B, C),
                         heatmap=hm, heatmap_logits=hm.logit(), scores=torch.randn(B, C, g, g))


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=torch.zeros(2, 4)), "targets must have shape"),
    (dict(masks=torch.ones(2, 3, 5, 4, dtype=torch.bool)), "masks must have shape"),
    (dict(teacher_logits=torch.zeros(3, 3)), "teacher_logits must have shape"),
    (dict(dist=torch.zeros(2, 3, 4, 4)), "dist was given without masks"),
])
def test_bad_loss_inputs(kwargs, match):
    args = dict(targets=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ClarityLoss()(_output(), **args)


def test_labels_outside_01_rejected():
    with pytest.raises(ValueError, match="only 0 and 1"):
        ClarityLoss()(_output(), torch.full((2, 3), 0.5))
    out = _output()
    out.heatmap = None
    with pytest.raises(ValueError, match="only 0 and 1"):
        ClarityLoss()(out, torch.full((2, 3), 2.0))


def test_checks_are_deferred_to_every_kth_call_and_still_raise(monkeypatch):
    """No host read on every step: the counts are read on the first call and every validate_every calls;
    a mistake on call 3 is reported on call 5 with a clear message."""
    import clarity_fast.losses as losses
    reads = []
    real = losses.raise_if_invalid
    monkeypatch.setattr(losses, "raise_if_invalid", lambda *a: reads.append(1) or real(*a))
    loss_fn = ClarityLoss(validate_every=5)
    good, bad = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    for call in range(1, 5):
        loss_fn(_output(), bad if call == 3 else good)
    assert len(reads) == 1  # only the first call read back
    with pytest.raises(ValueError, match="only 0 and 1; 6 entries do not \\(in one of the last 4 loss calls\\)"):
        loss_fn(_output(), good)
    loss_fn(_output(), good)
    loss_fn.check()  # nothing pending after the report


def test_clarity_loss_defaults_trace_with_fullgraph():
    out = _output()
    out.heatmap_logits.requires_grad_(True)
    masks = torch.rand(2, 3, 4, 4) > 0.5
    dist = distance_map(masks)  # precomputed, as the data sets do
    loss_fn = ClarityLoss()
    loss_fn(out, torch.ones(2, 3), masks=masks, dist=dist)  # first call checked eagerly

    def step(logits, scores):
        o = ClarityOutput(logits=torch.zeros(2, 3), logits_cls=torch.zeros(2, 3), heatmap_logits=logits,
                          scores=scores)
        return loss_fn(o, torch.ones(2, 3), masks=masks, dist=dist).total

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(out.heatmap_logits, out.scores), step(out.heatmap_logits, out.scores))


def test_segmentcam_logits_are_computed_once_in_training(monkeypatch):
    """forward_outputs(segmentcam_logits=False) leaves ℓ^f, ℓ^b, ℓ^full to ClarityLoss's fused pass: the same
    loss and gradients as computing them in the model, and the PyTorch logits function never runs."""
    import clarity_fast.clarity as clarity_module
    from conftest import tiny_model
    model = tiny_model().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y = (torch.rand(2, 5) > 0.5).double()
    masks = torch.rand(2, 5, 4, 4) > 0.4
    teacher = torch.randn(2, 5, dtype=torch.float64)
    reference = ClarityLoss()(model.forward_outputs(x), y, masks=masks, teacher_logits=teacher)
    ref_grads = torch.autograd.grad(reference.total, list(model.parameters()), allow_unused=True)
    calls = []
    real = clarity_module.segmentcam_logits
    monkeypatch.setattr(clarity_module, "segmentcam_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = model.forward_outputs(x, segmentcam_logits=False)
    assert out.logits is None and out.logits_fg is None
    once = ClarityLoss()(out, y, masks=masks, teacher_logits=teacher)
    assert calls == [] and out.logits is not None and out.logits_bg is not None
    torch.testing.assert_close(once.total, reference.total)
    grads = torch.autograd.grad(once.total, list(model.parameters()), allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r)
