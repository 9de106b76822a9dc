"""Faithfulness to the paper's figures (SPEC §9)."""
import pytest
import timm

import clarity_fast  # noqa: F401  (registers the models)
from clarity_fast.flops import count_macs


@pytest.mark.parametrize("name,side,paper_gmacs", [("clarity_s16_224", 224, 5.99), ("clarity_s16_512", 512, 37.84)])
def test_macs_within_2_percent_of_paper(name, side, paper_gmacs):
    macs = count_macs(timm.create_model(name), side)
    assert macs["attention"] > 0
    assert abs(macs["total"] / 1e9 - paper_gmacs) / paper_gmacs < 0.02, macs


def test_attention_macs_are_counted_explicitly():
    macs = count_macs(timm.create_model("clarity_s16_224"), 224)
    assert macs["attention"] == 12 * 2 * 210 * 210 * 384


def test_segmentcam_adds_24_7_percent_parameters():
    model = timm.create_model("clarity_s16_224")
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("segmentcam.", "head.")))
    segcam = sum(p.numel() for p in model.segmentcam.parameters())
    assert abs(100 * segcam / backbone - 24.7) <= 1.0
