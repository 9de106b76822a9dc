"""Offline weights: DINO and timm checkpoint layouts, resampling, in_chans=1, bad checkpoints."""
import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from clarity_fast import create_model, from_timm


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    v = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad():
        v.cls_token.normal_()
    return v


@pytest.fixture(scope="module")
def dino_pth(vit, tmp_path_factory):
    """An original-DINO training checkpoint: teacher/student wrappers, module.backbone. prefixes, a head."""
    sd = {f"module.backbone.{k}": v.clone() for k, v in vit.state_dict().items()}
    sd["module.head.mlp.0.weight"] = torch.randn(8, 384)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    torch.save({"teacher": sd, "student": sd, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, path)
    return path


@pytest.fixture(scope="module")
def timm_safetensors(vit, tmp_path_factory):
    """timm's vit_small_patch16_224.dino layout, with a classifier head, as safetensors."""
    sd = {k: v.clone().contiguous() for k, v in vit.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 384), torch.randn(10)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(sd, str(path))
    return path


def _check_backbone(model, vit, side):
    src = vit.state_dict()
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight, src["blocks.5.attn.qkv.weight"])
    torch.testing.assert_close(model.norm.weight, src["norm.weight"])
    expected = resample_abs_pos_embed(src["pos_embed"][:, 1:], [side // 16] * 2, [14, 14], num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed, expected)


@pytest.mark.parametrize("side", [224, 512])
def test_dino_pth_layout(vit, dino_pth, side):
    model = create_model(f"clarity_s16_{side}", pretrained=dino_pth, class_token_noise=0.0)
    _check_backbone(model, vit, side)
    source = vit.cls_token + vit.pos_embed[:, :1]
    torch.testing.assert_close(model.cls_token, source.expand(1, 14, 384))


def test_timm_safetensors_layout_through_timm(vit, timm_safetensors):
    model = timm.create_model("clarity_s16_512", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(timm_safetensors)))
    _check_backbone(model, vit, 512)
    source = (vit.cls_token + vit.pos_embed[:, :1])[0, 0]
    noise = model.cls_token[0] - source
    assert (noise.abs().sum(-1) > 0).all(), "class tokens must differ (symmetry breaking)"
    expected_std = 0.02 * source.norm() / 384 ** 0.5
    assert 0.7 < (noise.std() / expected_std).item() < 1.3
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        out = model.forward_outputs(x)
    assert out.maps.shape == (1, 14, 32, 32)


def test_in_chans_1_sums_rgb_kernels(vit, timm_safetensors):
    gray = create_model("clarity_s16_224", pretrained=timm_safetensors, in_chans=1, class_token_noise=0.0).eval()
    rgb = create_model("clarity_s16_224", pretrained=timm_safetensors, class_token_noise=0.0).eval()
    rgb.load_state_dict({k: v for k, v in gray.state_dict().items() if k != "patch_embed.proj.weight"}, strict=False)
    torch.testing.assert_close(gray.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gray.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=1e-4)


def test_clarity_checkpoint_round_trip(tmp_path):
    model = create_model("clarity_s16_224", num_classes=3)
    path = tmp_path / "clarity.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = create_model("clarity_s16_224", pretrained=path, num_classes=3)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_missing_and_unexpected_keys_are_named(vit, tmp_path):
    sd = dict(vit.state_dict())
    del sd["blocks.3.mlp.fc1.weight"]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.3.mlp.fc1.weight'\]"):
        create_model("clarity_s16_224", pretrained=path)
    sd = dict(vit.state_dict())
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.0.attn.extra'\]"):
        create_model("clarity_s16_224", pretrained=path)


def test_bad_pretrained_arguments(tmp_path):
    with pytest.raises(ValueError, match="no weights can be downloaded"):
        create_model("clarity_s16_224", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("clarity_s16_224", pretrained=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="must name a CLARiTy model"):
        create_model("vit_small_patch16_224")


def test_from_timm_any_vit():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                            depth=3, init_values=1e-5)
    model = from_timm(vit, num_classes=4)
    assert model.num_map_layers == 3 and model.patch_size == 8 and model.embed_dim == 192
    torch.testing.assert_close(model.blocks[1].ls1.gamma, vit.blocks[1].ls1.gamma)
    assert model.forward_outputs(torch.randn(1, 3, 64, 64)).maps.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        from_timm(torch.nn.Linear(2, 2))


def test_from_timm_register_tokens_dropped():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, reg_tokens=4,
                            no_embed_class=True, img_size=64)
    model = from_timm(vit, num_classes=2, class_token_noise=0.0)
    torch.testing.assert_close(model.cls_token, vit.cls_token.expand(1, 2, 384))
    torch.testing.assert_close(model.pos_embed, vit.pos_embed)


def test_from_timm_register_tokens_with_embedded_prefix():
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, reg_tokens=2,
                            no_embed_class=False, img_size=64)
    model = from_timm(vit, num_classes=2, class_token_noise=0.0)
    torch.testing.assert_close(model.cls_token, (vit.cls_token + vit.pos_embed[:, :1]).expand(1, 2, 384))
    torch.testing.assert_close(model.pos_embed, vit.pos_embed[:, 3:])
