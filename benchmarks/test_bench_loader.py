"""NIH cache loader alone at 512 px (SPEC §5): images/s of a DataLoader reading the uint8
memory-mapped cache with masks and distance maps, on a synthetic cache of 256 images."""
import numpy as np
import pytest
import torch
from PIL import Image

from clarity_fast.data import collate
from clarity_fast.nih import ChestXDetSegmenter, NIHCacheDataset, compute_masks, prepare, read_labels

N_IMAGES = 256


class _Bands(torch.nn.Module):
    def forward(self, x):
        return 4 - 10 * (x.mean(1, keepdim=True) - torch.linspace(-2, 2, 14).view(1, 14, 1, 1)).abs()


@pytest.fixture(scope="module")
def cache_512(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih512")
    (root / "images").mkdir()
    ids = list(read_labels()["image"].head(N_IMAGES))
    rng = np.random.default_rng(0)
    for name in ids:
        Image.fromarray((rng.random((512, 512)) * 255).astype(np.uint8)).save(root / "images" / name)
    (root / "train_val_list.txt").write_text("\n".join(ids) + "\n")
    (root / "test_list.txt").write_text("")
    cache = root / "cache"
    prepare(root, cache, size=512, progress=False)
    compute_masks(cache, ChestXDetSegmenter(_Bands()), patch_size=16, batch_size=16, progress=False)
    return cache


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_images_per_second(measure, cache_512, workers):
    data = NIHCacheDataset(cache_512, "train")
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, num_workers=workers, collate_fn=collate,
                                         persistent_workers=workers > 0)

    def epoch():
        for batch in loader:
            assert batch["image"].shape[-1] == 512

    seconds = measure(epoch, group="NIH cache loader, 512 px, batch 32", name=f"{workers} workers",
                      anchor=workers == 0, rounds=3)
    print(f"\n{len(data) / seconds:.0f} images/s with {workers} workers")
