"""The reconstruction grid: columns hold what they claim to hold."""
import torch

from crossmae import MaskedAutoencoder, model_config
from crossmae.model import patchify
from crossmae.visualize import reconstruction_grid

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _patch_grid(img_hwc: torch.Tensor, p: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (L, p*p*3) like patchify."""
    return patchify(img_hwc.permute(2, 0, 1)[None].float(), p)[0]


def test_grid_columns():
    torch.manual_seed(0)
    model = MaskedAutoencoder(model_config("crossmae_vit_micro_patch4_dec64d2b", img_size=32))
    u8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    imgs = (u8.float() / 255 - MEAN) / STD
    noise = torch.rand(3, model.config.num_patches)
    grid = reconstruction_grid(model, imgs, noise)
    assert grid.shape == (3 * 32, 4 * 32, 3) and grid.dtype == torch.uint8
    assert model.training, "the model's mode is restored"
    masking = model.make_masking(imgs, noise)
    for n in range(3):
        rows = grid[32 * n:32 * (n + 1)]
        assert (rows[:, :32].permute(2, 0, 1).int() - u8[n].int()).abs().max() <= 1  # original
        masked, subset, full = (_patch_grid(rows[:, 32 * c:32 * (c + 1)], 4) for c in (1, 2, 3))
        orig = _patch_grid(u8[n].permute(1, 2, 0), 4)
        vis, hidden, pred = masking.ids_visible[n], masking.ids_masked[n], masking.ids_pred[n]
        for col in (masked, subset, full):
            assert (col[vis] - orig[vis]).abs().max() <= 1, "visible patches pasted back unchanged"
        assert ((masked[hidden] - 127.5).abs() <= 1).all(), "hidden patches are gray"
        not_pred = hidden[~torch.isin(hidden, pred)]
        assert ((subset[not_pred] - 127.5).abs() <= 1).all(), "the subset column decodes only gamma's patches"
        assert ((subset[pred] - 127.5).abs() > 1).any() and ((full[not_pred] - 127.5).abs() > 1).any()
