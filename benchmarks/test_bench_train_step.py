"""One training step of CLARiTy (SPEC §8): clarity_fast attention (the fused Triton kernel on CUDA, the
PyTorch reference on CPU) vs the same model with eager attention
(materialised softmax, the only way timm gives maps), with and without block checkpointing.

GPU: CLARiTy-S-16-512, B=32, bf16 autocast; images/s and peak memory (targets: >= 2.5x img/s,
<= 1/3 peak memory; <= 8 GB, <= 3 GB with checkpointing). CPU: CLARiTy-S-16-224, B=2, fp32.
"""
import pytest
import torch

import clarity_fast
import clarity_fast.layers as layers
from clarity_fast import ClarityLoss

from test_bench_saved_memory import eager_class_token_attention


def config():
    if torch.cuda.is_available():
        return "clarity_s16_512", 512, 32
    return "clarity_s16_224", 224, 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "block-ckpt"])
@pytest.mark.parametrize("attention", ["clarity_fast", "eager softmax"])
def test_train_step(measure, device, monkeypatch, attention, checkpointing):
    if attention == "eager softmax":
        monkeypatch.setattr(layers, "class_token_attention", eager_class_token_attention)
    name, side, B = config()
    model = clarity_fast.create_model(name).to(device)
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClarityLoss(validate=False)
    x = torch.randn(B, 3, side, side, device=device)
    y = (torch.rand(B, 14, device=device) > 0.7).float()
    g = side // 16
    masks = torch.rand(B, 14, g, g, device=device) > 0.3
    dist = torch.rand(B, 14, g, g, device=device) * ~masks
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model.forward_outputs(x, segmentcam_logits=False), y, masks=masks, dist=dist).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = measure(step, group=f"train step {name} B={B}", name=f"{attention}, {'block ckpt' if checkpointing else 'no ckpt'}",
                      anchor=attention == "eager softmax" and not checkpointing, rounds=10 if amp else 3)
    print(f"\n{attention} {'ckpt' if checkpointing else ''}: {B / seconds:.1f} images/s")
