"""Reconstruction grids: what the model sees and what it predicts, as one uint8 image.

Columns per image (one row each):
    original | masked (visible patches only) | predicted subset (gamma; the training query,
    visible patches pasted back) | full decode of every masked patch in one pass (visible
    patches pasted back).
With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels; each prediction is
mapped back with its own target patch's mean and variance (as the released MAE notebooks do), so
the grid shows shape and texture, not the patch statistics the loss never asked for.
No file I/O here: ``pipelines`` writes the PNG.
"""
from __future__ import annotations

import torch

from .masking import gather_tokens
from .model import MaskedAutoencoder, patchify, unpatchify

GRAY = 0.5  # value of hidden patches in [0, 1] image space


def _to_pixels(model: MaskedAutoencoder, pred: torch.Tensor, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Predictions (N, Q, patch_dim) -> patches in the input's (normalised) pixel space."""
    if not model.config.norm_pix_loss:
        return pred.float()
    target = gather_tokens(patchify(imgs.float(), model.config.patch_size), ids)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return pred.float() * (var + 1e-6) ** 0.5 + mean


def _paste(base: torch.Tensor, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = base.clone()
    out.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, base.shape[-1]), patches)
    return out


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """(N, 3, H, W) normalised images + masking noise -> uint8 (N*H, 4*W, 3) grid.

    Every rank of a ZeRO-3 run must call this (the forward gathers sharded parameters)."""
    c = model.config
    was_training = model.training
    model.eval()
    try:
        sub = model(imgs, noise, query="pred")
        full = model(imgs, noise, query="masked") if c.decoder == "cross" else sub
    finally:
        model.train(was_training)
    patches = patchify(imgs.float(), c.patch_size)
    gray_value = ((GRAY - torch.tensor(mean)) / torch.tensor(std)).to(patches)  # per channel, normalised
    gray = gray_value.repeat(c.patch_size * c.patch_size).expand_as(patches)  # pixels are (p, p, C) in a patch
    visible = _paste(gray, gather_tokens(patches, sub.masking.ids_visible), sub.masking.ids_visible)
    subset = _paste(visible, _to_pixels(model, sub.pred, imgs, sub.ids_query), sub.ids_query)
    decoded = _paste(visible, _to_pixels(model, full.pred, imgs, full.ids_query), full.ids_query)
    cols = [imgs.float()] + [unpatchify(x, c.patch_size, c.in_chans) for x in (visible, subset, decoded)]
    grid = torch.cat(cols, dim=3)  # (N, 3, H, 4W)
    grid = grid * torch.tensor(std).view(1, 3, 1, 1).to(grid) + torch.tensor(mean).view(1, 3, 1, 1).to(grid)
    grid = (grid.clamp(0, 1) * 255).round().to(torch.uint8)
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[3], 3).cpu()
