"""Fixed 2D sine-cosine position embeddings (MAE / CrossMAE convention).

The first half of the channels encodes the column (x) coordinate, the second half the
row (y) coordinate; each half is [sin(pos * w_k), cos(pos * w_k)] with
w_k = 1 / 10000 ** (k / (D/4)). A zero vector is prepended for the cls slot, so the
tables are interchangeable with the released MAE and CrossMAE checkpoints.
"""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) embedding, float64 for exactness before the cast."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(grid_size**2 [+1], dim) float32 table for a square patch grid, row-major patches."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding dim must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
