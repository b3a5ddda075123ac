"""CrossMAE and the MAE baseline: one config, one model class, read in data-flow order:
patchify -> masking -> encoder -> decoder -> loss."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
from torch import nn

from .decoders import CrossDecoder, MAEDecoder
from .encoder import ViTEncoder
from .masking import PatchMasking, gather_tokens, random_masking, split_counts


@dataclass
class ModelConfig:
    """Architecture and masking of a masked autoencoder. ``decoder='cross'`` is CrossMAE."""

    decoder: Literal["cross", "mae"] = "cross"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 12
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75  # p: share of patches hidden from the encoder
    pred_ratio: float = 0.25  # the paper's gamma: share of ALL patches reconstructed (<= p)
    fuse_features: bool = True  # inter-block attention (CrossMAE only)
    fuse_use_input: bool = True  # the embedded input is one of the fused maps (13 maps for ViT-B)
    decoder_self_attn: bool = False  # ablation: self-attention among queries (CrossMAE only)
    norm_pix_loss: bool = True
    recompute_kv: bool = False  # CrossMAE: recompute fusion + K/V in backward (~9% less activation memory)

    def __post_init__(self):
        if self.decoder not in ("cross", "mae"):
            raise ValueError(f"decoder must be 'cross' or 'mae', got {self.decoder!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder == "mae" and abs(self.pred_ratio - self.mask_ratio) > 1e-9:
            raise ValueError("the MAE decoder reconstructs every masked patch: set pred_ratio = mask_ratio")
        if self.decoder == "mae" and (self.decoder_self_attn or self.fuse_features):
            raise ValueError("fuse_features and decoder_self_attn are CrossMAE options; set them False for MAE")
        split_counts(self.num_patches, self.mask_ratio, self.pred_ratio)  # validates the ratios

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def encoder_final_norm(self) -> bool:
        return not (self.decoder == "cross" and self.fuse_features)

    @property
    def num_feature_maps(self) -> int:
        return self.depth + (1 if self.fuse_use_input else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class AutoencoderOutput:
    loss: torch.Tensor  # scalar, float32
    pred: torch.Tensor  # (N, Q, patch_dim) predictions at ids_query, in that order
    ids_query: torch.Tensor  # (N, Q) the patches that were decoded
    masking: PatchMasking


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches row-major, pixels (p, p, C) inside a patch."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 3) -> torch.Tensor:
    n, num_patches, _ = x.shape
    g = int(round(num_patches**0.5))
    p = patch_size
    x = x.reshape(n, g, g, p, p, in_chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, in_chans, g * p, g * p)


def patch_targets(imgs: torch.Tensor, patch_size: int, ids: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Pixel targets at the given patch ids, float32, optionally normalised per patch."""
    target = gather_tokens(patchify(imgs.float(), patch_size), ids)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the decoded patches only, computed in float32."""
    return ((pred.float() - target) ** 2).mean()


class MaskedAutoencoder(nn.Module):
    """CrossMAE (``config.decoder == 'cross'``) or MAE (``'mae'``) sharing one ViT encoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ViTEncoder(
            c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio,
            final_norm=c.encoder_final_norm,
        )
        if c.decoder == "cross":
            self.decoder = CrossDecoder(
                c.num_patches, c.patch_dim, c.embed_dim, c.num_feature_maps, c.decoder_embed_dim,
                c.decoder_depth, c.decoder_num_heads, c.mlp_ratio, c.fuse_features, c.decoder_self_attn,
            )
            self.decoder.recompute_kv = c.recompute_kv
        else:
            self.decoder = MAEDecoder(
                c.num_patches, c.patch_dim, c.embed_dim, c.decoder_embed_dim, c.decoder_depth,
                c.decoder_num_heads, c.mlp_ratio,
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's init: xavier-uniform Linear (zero bias), LayerNorm (1, 0), sin-cos positions,
        patch embedding like a Linear, cls and mask tokens N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.encoder.reset_parameters()
        self.decoder.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enable

    def make_masking(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> PatchMasking:
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.config.num_patches, device=imgs.device)
        pred_ratio = self.config.pred_ratio if self.config.decoder == "cross" else self.config.mask_ratio
        return random_masking(noise, self.config.mask_ratio, pred_ratio)

    def forward(
        self, imgs: torch.Tensor, noise: torch.Tensor | None = None, query: Literal["pred", "masked"] = "pred"
    ) -> AutoencoderOutput:
        """Mask, encode the visible patches, decode the queried ones, score them.

        ``noise`` (N, L) reproduces a masking exactly. ``query='pred'`` decodes the
        predicted subset (training); ``'masked'`` decodes every masked patch in one pass
        (full decoding, e.g. for visualisation after gamma=0.25 training).
        """
        c = self.config
        masking = self.make_masking(imgs, noise)
        ids_query = masking.ids_pred if query == "pred" else masking.ids_masked
        cross = c.decoder == "cross"
        features = self.encoder(imgs, masking.ids_visible, return_all=cross and c.fuse_features)
        if cross:
            if c.fuse_features and not c.fuse_use_input:
                features = features[1:]
            pred = self.decoder(features, ids_query)
        else:
            pred = self.decoder(features, ids_query, masking.ids_restore)
        target = patch_targets(imgs, c.patch_size, ids_query, c.norm_pix_loss)
        return AutoencoderOutput(reconstruction_loss(pred, target), pred, ids_query, masking)
