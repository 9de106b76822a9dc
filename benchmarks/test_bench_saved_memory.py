"""Bytes saved for backward per image, CLARiTy-S-16-512 (SPEC §8, device independent).

Counted with saved-tensor hooks over one training forward under bf16 autocast (SPEC §7: maps,
OCT states, SegmentCAM, loss); storages shared by several saved tensors count once. Per image =
bytes at batch 2 minus bytes at batch 1 (the bf16 weight copies autocast saves are per step,
not per image). Anchor: the same model with eager attention (materialised softmax, the only
way timm gives maps). Target (SPEC §8): <= 200 MB per image. On CPU the attention runs the
PyTorch reference, which also saves an fp32 copy of k for the class rows; the Triton path
saves only q, k, v, out and the row log-sum-exp.
"""
import pytest
import torch

import clarity_fast
import clarity_fast.layers as layers
from clarity_fast import ClarityLoss

from conftest import record_saved_bytes
from test_bench_attention import eager_attention


def eager_class_token_attention(q, k, v, num_classes, *, scale=None, maps=None, map_weight=None):
    out, new = eager_attention(q, k, v, num_classes, scale, None, 1.0 if map_weight is None else map_weight)
    if map_weight is None:
        return out, None
    return out, new if maps is None else maps + new


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            storages[(s.data_ptr(), t.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model.forward_outputs(x, segmentcam_logits=False)
        loss = ClarityLoss()(out, torch.zeros_like(out.logits))
    loss.total.backward()
    return sum(storages.values())


@pytest.mark.parametrize("attention", ["fused / reference", "eager softmax"])
def test_saved_bytes_per_image_512(attention, monkeypatch, device):
    if attention == "eager softmax":
        monkeypatch.setattr(layers, "class_token_attention", eager_class_token_attention)
    model = clarity_fast.create_model("clarity_s16_512").to(device)
    one, two = (saved_bytes(model, torch.randn(b, 3, 512, 512, device=device)) for b in (1, 2))
    backend = "auto backend" if device.type == "cuda" else "torch reference"
    record_saved_bytes(f"CLARiTy-S-16-512, bf16 autocast, {backend}", attention, two - one,
                       anchor=attention == "eager softmax")
