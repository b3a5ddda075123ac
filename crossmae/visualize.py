"""Reconstruction grids: what the model sees and what it predicts, as one labelled uint8 image.

Columns per image (one row each):
    original | masked (visible patches only) | predicted subset (gamma; the training query,
    visible patches pasted back) | full decode of every masked patch in one pass (visible
    patches pasted back).
With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels; each prediction is
mapped back with its own target patch's mean and variance (as the released MAE notebooks do), so
the grid shows shape and texture, not the patch statistics the loss never asked for.
Small images are enlarged by an integer factor (nearest neighbour: every patch stays a sharp
square) so a cell is at least MIN_CELL px: the demo's 32 px digits were unreadable at 1x.
No file I/O here: ``pipelines`` writes the PNG.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .masking import gather_tokens
from .model import MaskedAutoencoder, patchify, unpatchify

GRAY = 0.5  # value of hidden patches in [0, 1] image space
COLUMNS = ("original", "masked", "predicted subset", "full decode")
MIN_CELL = 96  # px per cell at least: 32 px inputs are shown at 3x (4x where a label needs it)
TITLE_SIZE = 17  # px; labels 13
MARGIN, COL_GAP, ROW_GAP = 6, 4, 9  # px of background around, between columns, between rows
BACKGROUND, INK, RULE = (255, 255, 255), (0, 0, 0), (170, 170, 170)  # hidden patches are gray 128


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
def reconstruction_columns(model: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor,
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) normalised images + masking noise -> (uint8 (N, 4, H, W, 3) cells at 1x,
    one detail line per column for the labels). Every rank of a ZeRO-3 run must call this (the
    forward gathers sharded parameters)."""
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
    cells = torch.stack(cols, dim=1)  # (N, 4, 3, H, W)
    cells = cells * torch.tensor(std).view(1, 1, 3, 1, 1).to(cells) + torch.tensor(mean).view(1, 1, 3, 1, 1).to(cells)
    cells = (cells.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()
    num_patches, num_visible = patches.shape[1], sub.masking.num_visible
    details = [f"{imgs.shape[-2]}x{imgs.shape[-1]} px", f"{num_visible} of {num_patches} visible",
               f"{sub.ids_query.shape[1]} of {num_patches - num_visible} (gamma {c.pred_ratio:g})",
               f"all {full.ids_query.shape[1]} masked"]
    return cells, details


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in default font (no font files), at ``size`` px where FreeType is available."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the 11 px bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    """(width, height) of the ink drawn at an origin: the bbox's right and bottom edges (its top
    edge is below the origin by the font's ascender gap, still part of the line)."""
    _, _, right, bottom = font.getbbox(text or " ")
    return right, bottom


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes: a header (title, then two label lines per column), then one row
    of ``columns`` cells per image; cells ``cell`` px square-scaled by ``scale`` (nearest)."""

    rows: int
    columns: int
    cell_h: int
    cell_w: int
    scale: int
    line_h: int
    title_h: int

    @property
    def header_h(self) -> int:
        return MARGIN + self.title_h + 2 * self.line_h + 4

    @property
    def width(self) -> int:
        return 2 * MARGIN + self.columns * self.cell_w + (self.columns - 1) * COL_GAP

    @property
    def height(self) -> int:
        return self.header_h + self.rows * self.cell_h + (self.rows - 1) * ROW_GAP + MARGIN

    def cell_box(self, row: int, col: int) -> tuple[int, int]:
        """(top, left) pixel of a cell."""
        return self.header_h + row * (self.cell_h + ROW_GAP), MARGIN + col * (self.cell_w + COL_GAP)


def grid_layout(rows: int, height: int, width: int, labels: list[str], title: str | None = None,
                font=None) -> GridLayout:
    """Integer upscale so each cell is >= MIN_CELL px and wide enough for its labels."""
    font = font or _font()
    label_w = max(_text_size(font, t)[0] for t in labels) + 6
    scale = max(1, math.ceil(MIN_CELL / min(height, width)), math.ceil(label_w / width))
    line_h = _text_size(font, "Ag")[1] + 2
    title_h = _text_size(_font(TITLE_SIZE), "Ag")[1] + 6 if title else 0
    return GridLayout(rows, len(COLUMNS), height * scale, width * scale, scale, line_h, title_h)


def reconstruction_grid(model: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                        title: str | None = None) -> torch.Tensor:
    """(N, 3, H, W) normalised images + masking noise -> uint8 (height, width, 3) image: the
    title (e.g. ``"step 1000"``), column labels with counts, and one row per image separated by
    a rule. Every rank of a ZeRO-3 run must call this (the forward gathers sharded parameters)."""
    cells, details = reconstruction_columns(model, imgs, noise, mean, std)
    font = _font()
    n, _, h, w, _ = cells.shape
    lay = grid_layout(n, h, w, list(COLUMNS) + details, title, font)
    canvas = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=INK, font=_font(TITLE_SIZE))
    for col, (name, detail) in enumerate(zip(COLUMNS, details)):
        _, left = lay.cell_box(0, col)
        for line, text in enumerate((name, detail)):
            x = left + (lay.cell_w - _text_size(font, text)[0]) // 2
            draw.text((x, MARGIN + lay.title_h + line * lay.line_h), text, fill=INK, font=font)
    big = cells.repeat_interleave(lay.scale, dim=2).repeat_interleave(lay.scale, dim=3).numpy()
    for row in range(n):
        for col in range(len(COLUMNS)):
            top, left = lay.cell_box(row, col)
            canvas.paste(Image.fromarray(np.ascontiguousarray(big[row, col])), (left, top))
        if row:  # a rule through the middle of the gap above each row after the first
            y = lay.cell_box(row, 0)[0] - ROW_GAP // 2 - 1
            draw.line([(MARGIN, y), (lay.width - MARGIN - 1, y)], fill=RULE, width=1)
    return torch.from_numpy(np.asarray(canvas).copy())
