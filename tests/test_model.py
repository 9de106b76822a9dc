"""The CLARiTy model: timm equivalence, maps, timm API, ablations and bad input."""
import pytest
import timm
import torch

import clarity_fast
from clarity_fast import Clarity, ClarityLoss, from_timm

from conftest import tiny_model

TINY = dict(img_size=64, patch_size=8, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_map_layers=2,
            num_oct_layers=2)


def _timm_attention_probs(vit, x):
    """Forward timm's ViT with non-fused attention and capture every softmax (B, nh, N, N)."""
    probs = []
    hooks = []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o.detach())))
    feats = vit.forward_features(x)
    for h in hooks:
        h.remove()
    return feats, probs


def test_from_timm_matches_timm_features_and_maps():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        vit.cls_token.normal_()
    model = from_timm(vit, num_classes=1, class_token_noise=0.0).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, probs = _timm_attention_probs(vit, x)
        out = model.forward_outputs(x)
        feats = model.forward_features(x)
    torch.testing.assert_close(feats[:, 1:], ref[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[:, :1], ref[:, :1], atol=1e-5, rtol=0)
    p = 8
    expected = torch.stack([pr[:, :, 0, 1:].mean(1) for pr in probs[-p:]]).mean(0).reshape(2, 1, 14, 14)
    torch.testing.assert_close(out.maps, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,side", [("clarity_s16_224", 224), ("clarity_s16_512", 512)])
def test_maps_shape_and_row_sums_full_size(name, side):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model.forward_outputs(torch.randn(1, 3, side, side))
    g = side // 16
    assert out.maps.shape == (1, 14, g, g)
    assert out.maps.dtype == torch.float32
    assert (out.maps >= 0).all()
    assert (out.maps.flatten(2).sum(-1) <= 1 + 1e-5).all()
    for t in (out.heatmap, out.scores, out.loc_map, out.fg_mask):
        assert t.shape == (1, 14, g, g)


def test_non_square_image():
    model = tiny_model(img_size=(48, 80)).eval()
    out = model.forward_outputs(torch.randn(2, 3, 48, 80))
    assert out.maps.shape == (2, 5, 3, 5)
    assert out.heatmap.shape == (2, 5, 3, 5)
    rows = out.maps.flatten(2).sum(-1)
    assert (out.maps >= 0).all() and (rows <= 1 + 1e-5).all() and (rows > 0).all()
    assert model(torch.randn(2, 3, 48, 80)).shape == (2, 5)


def test_forward_is_logits_and_matches_outputs_and_head():
    model = tiny_model().eval()
    x = torch.randn(3, 3, 64, 64)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 5)
    out = model.forward_outputs(x)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
    torch.testing.assert_close(out.logits, (out.logits_cls + out.logits_fg) / 2)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (3, 5, 48)
    assert torch.equal(out.fg_mask, out.heatmap >= 0.5)
    torch.testing.assert_close(out.loc_map, out.maps * out.fg_mask)


def test_timm_create_model_and_num_classes_42():
    model = timm.create_model("clarity_s16_224", num_classes=42, in_chans=1)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.pretrained_cfg["first_conv"] == "patch_embed.proj"
    assert model.pretrained_cfg["classifier"] == "head"
    assert model.cls_token.shape == (1, 42, 384)
    assert model(torch.randn(1, 1, 224, 224)).shape == (1, 42)
    assert isinstance(clarity_fast.create_model("clarity_s16_512"), Clarity)


def test_every_parameter_gets_a_gradient():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    masks = torch.rand(2, 5, 4, 4) > 0.3
    loss = ClarityLoss()(model.forward_outputs(x), y, masks=masks, teacher_logits=torch.randn(2, 5))
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert set(loss.terms) == {"cls", "kd", "oct", "prx", "cnf", "ac", "bas"}


def test_grad_checkpointing_gives_identical_outputs_and_grads():
    torch.manual_seed(1)
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 2, (2, 5)).float()

    def run():
        model.zero_grad()
        out = model.forward_outputs(x)
        ClarityLoss()(out, y).total.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = run()
    model.set_grad_checkpointing(True)
    out, grads = run()
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.maps, ref.maps, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_reset_classifier_and_timm_helpers():
    model = tiny_model()
    model.reset_classifier(7, global_pool="gap")
    assert model.cls_token.shape == (1, 7, 48) and model.head.pool == "gap"
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model.forward_outputs(torch.randn(1, 3, 64, 64)).maps.shape == (1, 7, 4, 4)
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len(list(model.parameters()))
    assert model.get_classifier() is model.head


@pytest.mark.parametrize("kwargs", [dict(pool="gap"), dict(segmentcam=False), dict(num_map_layers=0),
                                    dict(num_oct_layers=0), dict(num_classes=1)])
def test_ablations_run(kwargs):
    model = tiny_model(**kwargs)
    out = model.forward_outputs(torch.randn(2, 3, 64, 64))
    C = model.num_classes
    loss = ClarityLoss()(out, torch.ones(2, C))
    loss.total.backward()
    assert torch.isfinite(loss.total)
    if kwargs.get("segmentcam") is False:
        assert out.heatmap is None and torch.equal(out.logits, out.logits_cls)
    if kwargs.get("num_map_layers") == 0:
        assert out.maps is None and out.loc_map is None


def test_dynamic_img_size():
    model = tiny_model(dynamic_img_size=True).eval()
    out = model.forward_outputs(torch.randn(1, 3, 96, 64))
    assert out.maps.shape == (1, 5, 6, 4)


@pytest.mark.parametrize("shape,match", [
    ((1, 1, 64, 64), "in_chans=3"),
    ((1, 3, 64, 60), "divisible by patch_size"),
    ((1, 3, 96, 96), "must be 64x64"),
    ((3, 64, 64), "4-d"),
])
def test_bad_images(shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_model()(torch.randn(*shape))


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=70), "img_size"), (dict(num_classes=0), "num_classes"),
    (dict(num_map_layers=9), "num_map_layers"), (dict(pool="max"), "pool"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)


def test_bf16_autocast_keeps_maps_fp32():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_outputs(torch.randn(2, 3, 64, 64))
        loss = ClarityLoss()(out, torch.ones(2, 5))
    loss.total.backward()
    assert out.maps.dtype == torch.float32
    rows = out.maps.flatten(2).sum(-1)
    assert (rows <= 1 + 1e-3).all() and torch.isfinite(loss.total)


def test_forward_intermediates_match_timm_vit():
    """timm's own forward_intermediates on the source ViT is the truth (one class token, same weights)."""
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=3).eval()
    model = from_timm(vit, num_classes=1, class_token_noise=0.0).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for kwargs in (dict(indices=2), dict(indices=[0, 2], norm=True, output_fmt="NLC")):
            ref_final, ref = vit.forward_intermediates(x, return_prefix_tokens=True, **kwargs)
            final, got = model.forward_intermediates(x, return_prefix_tokens=True, **kwargs)
            torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=0)
            assert len(got) == len(ref)
            for (g, gp), (r, rp) in zip(got, ref):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
                torch.testing.assert_close(gp, rp, atol=1e-5, rtol=0)


def test_timm_features_only():
    model = timm.create_model("clarity_s16_224", features_only=True, out_indices=(1, 3), **TINY)
    feats = model(torch.randn(2, 1, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8)] * 2
    assert model.feature_info.channels() == [32, 32]


def test_class_names_travel_with_the_model():
    names = ["Effusion", "Mass", "Nodule", "Edema", "Hernia"]
    model = timm.create_model("clarity_s16_224", num_classes=5, label_names=names, **TINY)
    assert model.class_names == tuple(names) and model.pretrained_cfg["label_names"] == tuple(names)
    assert timm.create_model("clarity_s16_224", **TINY).class_names == clarity_fast.pathologies.CLASS_NAMES
    assert timm.create_model("clarity_s16_224", num_classes=2, **TINY).class_names == ("class_0", "class_1")
    overlay = timm.create_model("clarity_s16_224", num_classes=2, pretrained_cfg_overlay=dict(label_names=("a", "b")),
                                **TINY)
    assert overlay.class_names == ("a", "b")
    model.reset_classifier(2, label_names=["Mass", "Nodule"])
    assert model.class_names == ("Mass", "Nodule") and model.pretrained_cfg["label_names"] == ("Mass", "Nodule")
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2)
    with pytest.raises(ValueError, match="label_names must be 2 strings"):
        model.class_names = ["one"]
    with pytest.raises(ValueError, match="label_names must be distinct"):
        timm.create_model("clarity_s16_224", num_classes=2, label_names=["a", "a"], **TINY)
