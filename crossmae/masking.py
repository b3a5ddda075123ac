"""Per-sample random masking with a prediction subset (CrossMAE's prediction ratio).

For every sample, patches are ranked by ``argsort(noise)``:

    [ visible: L(1-p) | masked, not predicted: L(p-gamma) | predicted: the rest ]

``mask_ratio`` is p, the share of patches hidden from the encoder. ``pred_ratio`` is the
paper's prediction ratio gamma (``kept_mask_ratio`` in the released code): the share of
ALL patches the decoder reconstructs, gamma <= p. Because noise is i.i.d., the predicted
patches are a uniform random subset of the masked ones. Passing the same noise
reproduces a masking exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def split_counts(num_patches: int, mask_ratio: float, pred_ratio: float) -> tuple[int, int, int]:
    """(visible, masked-not-predicted, predicted) counts, rounded like the released code:
    ``int(L*(1-p))``, ``int(L*(p-gamma))``, the rest."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not 0.0 < pred_ratio <= mask_ratio + 1e-9:
        raise ValueError(f"pred_ratio must be in (0, mask_ratio={mask_ratio}], got {pred_ratio}")
    # exactly the released code's floors, float error included: no epsilon. L=196, p=0.7,
    # gamma=0.2: 0.7 - 0.2 = 0.49999999999999994, so 97 skipped and 41 (not 40) predicted
    num_visible = int(num_patches * (1 - mask_ratio))
    num_skipped = int(num_patches * (mask_ratio - pred_ratio))
    num_pred = num_patches - num_visible - num_skipped
    if num_visible < 1 or num_pred < 1:
        raise ValueError(
            f"{num_patches} patches with mask_ratio={mask_ratio}, pred_ratio={pred_ratio} leave "
            f"{num_visible} visible and {num_pred} predicted; both must be >= 1"
        )
    return num_visible, num_skipped, num_pred


@dataclass(frozen=True)
class PatchMasking:
    """Index sets of one masking draw. All ids index patches (0..L-1, no cls slot)."""

    ids_shuffle: torch.Tensor  # (N, L) patch ids in rank order
    ids_restore: torch.Tensor  # (N, L) rank of each patch (inverse permutation)
    num_visible: int
    num_pred: int

    @property
    def num_patches(self) -> int:
        return self.ids_shuffle.shape[1]

    @property
    def ids_visible(self) -> torch.Tensor:
        return self.ids_shuffle[:, : self.num_visible]

    @property
    def ids_masked(self) -> torch.Tensor:
        """Every patch hidden from the encoder (what full decoding queries)."""
        return self.ids_shuffle[:, self.num_visible :]

    @property
    def ids_pred(self) -> torch.Tensor:
        """The predicted subset of the masked patches (what training queries)."""
        return self.ids_shuffle[:, self.num_patches - self.num_pred :]

    def binary(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) float mask with 1 at the given patch ids, 0 elsewhere."""
        out = torch.zeros(self.ids_shuffle.shape, device=ids.device)
        return out.scatter_(1, ids, 1.0)


def random_masking(
    noise: torch.Tensor, mask_ratio: float, pred_ratio: float | None = None
) -> PatchMasking:
    """Masking from noise of shape (N, L); ``pred_ratio=None`` predicts every masked patch."""
    if noise.ndim != 2:
        raise ValueError(f"noise must be (N, L), got shape {tuple(noise.shape)}")
    pred_ratio = mask_ratio if pred_ratio is None else pred_ratio
    num_visible, _, num_pred = split_counts(noise.shape[1], mask_ratio, pred_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return PatchMasking(ids_shuffle, ids_restore, num_visible, num_pred)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (N, L, D), ids: (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
