"""ViT encoder whose parameter names match timm's ``VisionTransformer``.

Built from timm's own ``PatchEmbed`` and ``Block`` (pre-norm, qkv bias, GELU MLP,
attention through ``F.scaled_dot_product_attention``), so its state dict loads into
``timm.create_model('vit_*', ...)`` without renaming: ``patch_embed.proj``, ``cls_token``,
``pos_embed`` (fixed 2D sin-cos, zero cls slot), ``blocks.{i}.*`` and, when the encoder
has one, ``norm``.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .masking import gather_tokens
from .pos_embed import sincos_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class ViTEncoder(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        final_norm: bool = True,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        )
        # CrossMAE with feature fusion has no final norm (each decoder block normalises its
        # own fused map); the module is then absent so the state dict has no `norm.*` keys.
        self.norm = LayerNorm(embed_dim) if final_norm else None
        self.grad_checkpointing = False

    def reset_parameters(self) -> None:
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data  # like a Linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, imgs: torch.Tensor, ids_visible: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens + position, optionally reduced to the visible ids, with cls in front."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if ids_visible is not None:
            x = gather_tokens(x, ids_visible)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training:
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward(
        self, imgs: torch.Tensor, ids_visible: torch.Tensor | None = None, return_all: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Token features (N, 1+K, D) of the visible patches (all patches if ids is None).

        With ``return_all`` returns the list [embedded input, block_1 out, ..., block_depth out]
        (each with cls), the feature maps CrossMAE's inter-block attention mixes.
        """
        x = self.embed(imgs, ids_visible)
        feats = [x]
        for blk in self.blocks:
            x = self._block(blk, x)
            feats.append(x)
        if return_all:
            return feats
        return self.norm(x) if self.norm is not None else x
