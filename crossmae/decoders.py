"""Decoders: CrossMAE's cross-attention decoder and the original MAE decoder.

Both take the encoder's output and the patch ids to reconstruct (``ids_query``, (N, Q))
and return pixel predictions (N, Q, patch_size**2 * in_chans) in the order of the ids.
Parameter names follow the released checkpoints (``decoder_blocks.{i}.cross_attn.q`` ...)
so importing them is a prefix change (see ``interop.RELEASED_KEY_MAP``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block

from .encoder import LayerNorm
from .masking import gather_tokens
from .pos_embed import sincos_2d


class CrossAttention(nn.Module):
    """Queries (N, Q, dim) attend to context (N, T, context_dim); no query-query mixing."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)  # keys/values straight from encoder width
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, q_len, dim = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, q_len, h, dim // h).transpose(1, 2)
        k, v = self.kv(context).reshape(n, -1, 2, h, dim // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPUs
        return self.proj(out.transpose(1, 2).reshape(n, q_len, dim))


class CrossDecoderBlock(nn.Module):
    """x = x + CrossAttn(LN(x), context); x = x + MLP(LN(x)).

    ``self_attn=True`` is the paper's ablation: x = x + SelfAttn(LN(x)) first, which makes
    queries depend on each other (and costs quadratic time in the number of queries).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float = 4.0, self_attn: bool = False):
        super().__init__()
        if self_attn:
            self.norm0 = LayerNorm(dim)
            self.self_attn = Attention(dim, num_heads, qkv_bias=True)
        self.has_self_attn = self_attn
        self.norm1 = LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.has_self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class CrossDecoder(nn.Module):
    """CrossMAE decoder: mask-token queries at the requested positions cross-attend to the
    visible patches' encoder features.

    Inter-block attention (``fuse_features``): every decoder block i reads its own learned
    linear combination of the k encoder feature maps (embedded input + each block's output),
    ``fused_i = sum_j W[i, j] * map_j`` (no softmax), then ``fused_norms[i]``. Without it,
    every block reads the encoder's final-norm output.
    """

    def __init__(
        self,
        num_patches: int,
        patch_dim: int,
        encoder_dim: int,
        num_feature_maps: int,
        dim: int = 512,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        fuse_features: bool = True,
        self_attn: bool = False,
    ):
        super().__init__()
        self.fuse_features = fuse_features
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        if fuse_features:
            self.feature_fusion = nn.Linear(num_feature_maps, depth, bias=False)
            self.fused_norms = nn.ModuleList(LayerNorm(encoder_dim) for _ in range(depth))
        self.decoder_blocks = nn.ModuleList(
            CrossDecoderBlock(dim, encoder_dim, num_heads, mlp_ratio, self_attn) for _ in range(depth)
        )
        self.decoder_norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self.grad_checkpointing = False

    def reset_parameters(self) -> None:
        grid = int(round((self.decoder_pos_embed.shape[1] - 1) ** 0.5))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)

    def queries(self, ids_query: torch.Tensor) -> torch.Tensor:
        """Learned mask token + fixed position embedding of each queried patch: (N, Q, dim)."""
        pos = self.decoder_pos_embed[:, 1:].expand(ids_query.shape[0], -1, -1)
        return self.mask_token + gather_tokens(pos, ids_query)

    def contexts(self, encoder_out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The keys/values input of each decoder block."""
        if not self.fuse_features:
            return [encoder_out] * len(self.decoder_blocks)
        stacked = torch.stack(encoder_out, dim=-1)  # (N, T, C, k)
        fused = self.feature_fusion(stacked)  # (N, T, C, depth)
        return [norm(fused[..., i]) for i, norm in enumerate(self.fused_norms)]

    def forward(self, encoder_out, ids_query: torch.Tensor) -> torch.Tensor:
        x = self.queries(ids_query)
        for blk, context in zip(self.decoder_blocks, self.contexts(encoder_out)):
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, context, use_reentrant=False)
            else:
                x = blk(x, context)
        return self.decoder_pred(self.decoder_norm(x))


class MAEDecoder(nn.Module):
    """The original MAE decoder (He et al. 2021): embed visible tokens to decoder width, fill
    in mask tokens, un-shuffle, add position, self-attention over ALL tokens, predict."""

    def __init__(
        self,
        num_patches: int,
        patch_dim: int,
        encoder_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
        )
        self.decoder_norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self.grad_checkpointing = False

    reset_parameters = CrossDecoder.reset_parameters

    def forward(self, encoder_out: torch.Tensor, ids_query: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(encoder_out)
        n, t, d = x.shape
        num_patches = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(n, num_patches + 1 - t, d)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # in rank order
        patches = gather_tokens(patches, ids_restore)  # back to image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return gather_tokens(x, ids_query)
