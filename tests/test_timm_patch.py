"""patch_timm: any timm ViT keeps its outputs and gains CLS->patch maps with no N×N tensor."""
import pytest
import timm
import torch

from clarity_fast import attention_maps, patch_timm


def _reference_maps(vit, x, layers):
    probs = []
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    hooks = [vit.blocks[i].attn.attn_drop.register_forward_hook(lambda m, i_, o: probs.append(o)) for i in layers]
    with torch.no_grad():
        logits = vit(x)
    for h in hooks:
        h.remove()
    return logits, probs


@pytest.mark.parametrize("backend", ["torch", "fused", "sdpa+maps"])
@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_patched_vit_same_logits_and_cls_maps(monkeypatch, backend, reg_tokens):
    monkeypatch.setenv("CLARITY_FAST_BACKEND", backend)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=7,
                            reg_tokens=reg_tokens, no_embed_class=reg_tokens > 0).eval()
    x = torch.randn(2, 3, 64, 64)
    ref_logits, probs = _reference_maps(vit, x, [1, 2])
    patch_timm(vit, layers=[1, -1])
    with torch.no_grad():
        logits = vit(x)
    maps = attention_maps(vit)
    assert sorted(maps) == [1, 2]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    prefix = 1 + reg_tokens
    for layer, p in zip([1, 2], probs):
        expected = p[:, :, 0, prefix:].mean(1).reshape(2, 4, 4)
        assert maps[layer].shape == (2, 4, 4)
        torch.testing.assert_close(maps[layer], expected, atol=1e-6, rtol=1e-5)


def test_patch_timm_bad_input():
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        patch_timm(torch.nn.Linear(3, 3))
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2)
    with pytest.raises(ValueError, match="layers must index"):
        patch_timm(vit, layers=[5])
    with pytest.raises(ValueError, match="no maps recorded"):
        attention_maps(patch_timm(vit, layers=[]))
