"""The torchxrayvision adapter, checked with torchxrayvision's own reader and transforms on NIH radiographs."""
from pathlib import Path

import numpy as np
import pytest
import torch

from clarity_fast.predict import load_image
from clarity_fast.xrv_adapter import XRVModel

from conftest import tiny_model

xrv = pytest.importorskip("torchxrayvision")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-samples"
SAMPLES = sorted(SHARED.glob("*.png")) if SHARED.exists() else []


def _xrv_image(path: Path, size: int) -> torch.Tensor:
    """torchxrayvision's documented pipeline: read, normalize to [-1024, 1024], centre crop, resize."""
    import skimage.io
    import torchvision
    img = xrv.datasets.normalize(skimage.io.imread(str(path)), 255)
    img = (img if img.ndim == 2 else img[..., 0])[None]
    img = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)])(img)
    return torch.from_numpy(np.asarray(img, dtype=np.float32))[None]


def test_names_follow_torchxrayvision():
    model = XRVModel(tiny_model(num_classes=14))
    assert model.pathologies == model.targets == list(model.model.class_names)
    assert set(model.pathologies) <= set(xrv.datasets.default_pathologies)  # its own spelling of NIH's classes


@pytest.mark.skipif(not SAMPLES, reason="needs ../shared/data/nih-samples")
@pytest.mark.parametrize("in_chans", [1, 3])
def test_xrv_pipeline_matches_the_library_pipeline(in_chans):
    """An NIH radiograph through torchxrayvision's reader and transforms into the adapter gives what the same
    file gives through clarity_fast's own decoder (two independent resizers: close, not equal)."""
    torch.manual_seed(0)
    clarity = tiny_model(num_classes=14, in_chans=in_chans).eval()
    model = XRVModel(clarity, apply_sigmoid=True).eval()
    for path in SAMPLES:
        x = _xrv_image(path, 64)
        assert x.shape == (1, 1, 64, 64) and -1024 <= x.min() and x.max() <= 1024
        ours = load_image(path, 64)[None]  # (1, 1, 64, 64) in [0, 1]
        from clarity_fast.data import normalize
        # what the model sees: torchxrayvision's range mapped back, against the library's own input (ImageNet units)
        assert (model._to_model_input(x) - normalize(ours, in_chans)).abs().mean() < 0.1
        with torch.no_grad():
            want = clarity(normalize(ours, in_chans)).sigmoid()
            got = model(x)
            feats = model.features(x)
        assert got.shape == (1, 14) and ((got - want).abs().max() < 0.02)
        assert feats.shape == (1, clarity.embed_dim, 4, 4)
        with torch.no_grad():  # another resolution is resized to the model's, as torchxrayvision's models do
            torch.testing.assert_close(model(_xrv_image(path, 128)), got, atol=0.05, rtol=0)


def test_bad_input_is_named():
    model = XRVModel(tiny_model())
    with pytest.raises(ValueError, match="single-channel"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="must be square"):
        model(torch.zeros(1, 1, 64, 80))
    with pytest.raises(ValueError, match="must be a clarity_fast Clarity model"):
        XRVModel(torch.nn.Linear(2, 2))
