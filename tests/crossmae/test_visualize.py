"""The reconstruction grid: columns hold what they claim to hold, and the image is readable
(cells >= 96 px, labelled columns, rows apart, the title on top)."""
import pytest
import torch

from crossmae import MaskedAutoencoder, model_config
from crossmae.model import patchify
from crossmae.visualize import (COLUMNS, MIN_CELL, ROW_GAP, grid_layout, reconstruction_columns,
                                reconstruction_grid)

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
WHITE = 255


def _patch_grid(img_hwc: torch.Tensor, p: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (L, p*p*3) like patchify."""
    return patchify(img_hwc.permute(2, 0, 1)[None].float(), p)[0]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = MaskedAutoencoder(model_config("crossmae_vit_micro_patch4_dec64d2b", img_size=32))
    u8 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    imgs, noise = (u8.float() / 255 - MEAN) / STD, torch.rand(3, model.config.num_patches)
    return model, u8, imgs, noise, reconstruction_columns(model, imgs, noise)


def test_grid_columns(micro):
    model, u8, imgs, noise, (cells, details) = micro
    assert cells.shape == (3, 4, 32, 32, 3) and cells.dtype == torch.uint8
    assert details == ["32x32 px", "16 of 64 visible", "16 of 48 (gamma 0.25)", "all 48 masked"]
    assert model.training, "the model's mode is restored"
    masking = model.make_masking(imgs, noise)
    for n in range(3):
        assert (cells[n, 0].permute(2, 0, 1).int() - u8[n].int()).abs().max() <= 1  # original
        masked, subset, full = (_patch_grid(cells[n, c], 4) for c in (1, 2, 3))
        orig = _patch_grid(u8[n].permute(1, 2, 0), 4)
        vis, hidden, pred = masking.ids_visible[n], masking.ids_masked[n], masking.ids_pred[n]
        for col in (masked, subset, full):
            assert (col[vis] - orig[vis]).abs().max() <= 1, "visible patches pasted back unchanged"
        assert ((masked[hidden] - 127.5).abs() <= 1).all(), "hidden patches are gray"
        not_pred = hidden[~torch.isin(hidden, pred)]
        assert ((subset[not_pred] - 127.5).abs() <= 1).all(), "the subset column decodes only gamma's patches"
        assert ((subset[pred] - 127.5).abs() > 1).any() and ((full[not_pred] - 127.5).abs() > 1).any()


def test_grid_is_upscaled_labelled_titled_and_rows_are_separated(micro):
    model, _, imgs, noise, (cells, details) = micro
    grid = reconstruction_grid(model, imgs, noise, title="step 300")
    lay = grid_layout(3, 32, 32, list(COLUMNS) + details, "step 300")
    assert grid.shape == (lay.height, lay.width, 3) and grid.dtype == torch.uint8
    assert lay.cell_h == lay.cell_w >= MIN_CELL and lay.scale >= 3
    for row in range(3):
        for col in range(4):
            top, left = lay.cell_box(row, col)
            cell = grid[top:top + lay.cell_h, left:left + lay.cell_w]
            # nearest upscaling: every source pixel becomes a scale x scale block, exactly
            assert torch.equal(cell, cells[row, col].repeat_interleave(lay.scale, 0).repeat_interleave(lay.scale, 1))
        if row:  # between rows: background with one gray rule across the grid
            gap = grid[lay.cell_box(row, 0)[0] - ROW_GAP:lay.cell_box(row, 0)[0]]
            ruled = [(line != WHITE).any().item() for line in gap]
            assert sum(ruled) == 1 and (gap[ruled.index(True), 8:-8] < WHITE).all()
    top0 = lay.cell_box(0, 0)[0]
    for col in range(4):  # ink (the label) in the header over every column
        left = lay.cell_box(0, col)[1]
        labels = grid[lay.title_h:top0, left:left + lay.cell_w]
        assert (labels < 128).any(), COLUMNS[col]
    assert (grid[:lay.title_h] < 128).any(), "the title is drawn"
    plain = reconstruction_grid(model, imgs, noise)  # the trainer's call: no title, same cells
    assert plain.shape == (lay.height - lay.title_h, lay.width, 3)
    assert torch.equal(plain, grid[lay.title_h:]), "the title only adds a band on top"


def test_large_images_are_not_upscaled():
    lay = grid_layout(2, 224, 224, list(COLUMNS), "step 1")
    assert lay.scale == 1 and lay.cell_w == 224
