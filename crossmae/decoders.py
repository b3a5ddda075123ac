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
    """Queries (N, Q, dim) attend to context (N, T, context_dim); no query-query mixing.

    ``kv`` (N, T, 2*dim), when given, is ``self.kv(context)`` computed beforehand (the
    decoder projects every block's keys/values in one batched GEMM, see ``CrossDecoder``).
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)  # keys/values straight from encoder width
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv: torch.Tensor | None = None):
        n, q_len, dim = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, q_len, h, dim // h).transpose(1, 2)
        kv = self.kv(context) if kv is None else kv
        k, v = kv.reshape(n, -1, 2, h, dim // h).permute(2, 0, 3, 1, 4)
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv: torch.Tensor | None = None):
        if self.has_self_attn:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), context, kv)
        return x + self.mlp(self.norm2(x))


class FeatureFusion(nn.Linear):
    """Inter-block attention's mixing weights W (depth, k), no bias: fused_i = sum_j W[i, j] * map_j.

    Stored as ``nn.Linear(k, depth)`` (the released ``wfm.linear``, same name and shape) but
    applied as ONE (depth x k) @ (k x N*T*C) GEMM on the maps stacked along a new LEADING dim,
    so each fused map is a contiguous slab. Stacking on the last dim instead (Linear over k,
    then ``fused[..., i]``) cost a quarter of CrossMAE's H200 step: a strided cat (7.6 ms), a
    k=13 GEMM on a slow kernel and 12 strided copies (issue 12).
    """

    def __init__(self, num_feature_maps: int, depth: int):
        super().__init__(num_feature_maps, depth, bias=False)

    def forward(self, maps: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """k maps of shape S (a list, or stacked (k, *S)) -> the depth fused maps (depth, *S)."""
        stacked = maps if isinstance(maps, torch.Tensor) else torch.stack(list(maps))
        fused = torch.mm(self.weight, stacked.reshape(stacked.shape[0], -1))
        return fused.view(self.out_features, *stacked.shape[1:])


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
            self.feature_fusion = FeatureFusion(num_feature_maps, depth)
            self.fused_norms = nn.ModuleList(LayerNorm(encoder_dim) for _ in range(depth))
        self.decoder_blocks = nn.ModuleList(
            CrossDecoderBlock(dim, encoder_dim, num_heads, mlp_ratio, self_attn) for _ in range(depth)
        )
        self.decoder_norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self.grad_checkpointing = False
        # Recompute fusion, norms and K/V in backward instead of saving their inputs: at ViT-B
        # batch 256 bf16 that saves ~0.9 GiB on a GPU (13 maps bf16 + fused fp32 + contexts bf16;
        # 0.70 GiB measured under CPU autocast, benchmarks/model_step.py) for one more fusion
        # GEMM, 12 norms and the K/V GEMM (~240 GFLOPs) per step. Off by default.
        self.recompute_kv = False

    def reset_parameters(self) -> None:
        grid = int(round((self.decoder_pos_embed.shape[1] - 1) ** 0.5))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)

    def queries(self, ids_query: torch.Tensor) -> torch.Tensor:
        """Learned mask token + fixed position embedding of each queried patch: (N, Q, dim)."""
        pos = self.decoder_pos_embed[:, 1:].expand(ids_query.shape[0], -1, -1)
        return self.mask_token + gather_tokens(pos, ids_query)

    def contexts(self, encoder_out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """The keys/values input of each decoder block: LayerNorm_i(fused_i), or the encoder output."""
        if not self.fuse_features:
            return [encoder_out] * len(self.decoder_blocks)
        fused = self.feature_fusion(encoder_out)  # (depth, N, T, C), each slab contiguous
        # unbind, not fused[i]: its backward is one stack, where each of 12 selects would fill a
        # zeroed full-size gradient and add it up (10% of a CPU decoder step). One LayerNorm
        # module call per block: exact, ZeRO-3 gathers each norm's weights, and a single
        # layer_norm + stacked affine would keep one more (depth, N, T, C) fp32 tensor for backward.
        return [norm(f) for norm, f in zip(self.fused_norms, fused.unbind(0))]

    def project_kv(self, contexts: list[torch.Tensor]) -> torch.Tensor:
        """Every block's keys/values (depth, N, T, 2*dim) in one batched GEMM: they depend on the
        contexts only, not on the queries. Same result as each block's ``cross_attn.kv``.
        (Under DeepSpeed ZeRO-3 the blocks' kv weights read here are gathered by its parameter
        getter as external parameters of this module; checked with partitioned weights.)"""
        kv_layers = [blk.cross_attn.kv for blk in self.decoder_blocks]
        weight = torch.stack([m.weight for m in kv_layers])  # (depth, 2*dim, C)
        bias = torch.stack([m.bias for m in kv_layers])  # (depth, 2*dim)
        depth, two_dim, width = weight.shape
        n, t, _ = contexts[0].shape
        if not self.fuse_features:  # one shared context: one GEMM against all blocks' weights
            kv = F.linear(contexts[0], weight.reshape(depth * two_dim, width), bias.reshape(-1))
            return kv.view(n, t, depth, two_dim).permute(2, 0, 1, 3)
        ctx = torch.stack(contexts).view(depth, n * t, width)
        kv = torch.baddbmm(bias.unsqueeze(1), ctx, weight.transpose(1, 2))
        return kv.view(depth, n, t, two_dim)

    def _contexts_kv(self, encoder_out) -> torch.Tensor:
        return self.project_kv(self.contexts(encoder_out))

    def forward(self, encoder_out, ids_query: torch.Tensor) -> torch.Tensor:
        x = self.queries(ids_query)
        if self.grad_checkpointing and self.training:
            # K/V recomputed inside each checkpointed block: only the contexts stay saved, as
            # before (precomputed K/V for all blocks would add depth x N x T x 2*dim).
            for blk, context in zip(self.decoder_blocks, self.contexts(encoder_out)):
                x = checkpoint(blk, x, context, use_reentrant=False)
        else:
            # the contexts list is a temporary: after the batched projection only its stacked
            # copy (saved by baddbmm) stays, where the per-block path kept all 12 contexts alive
            if self.recompute_kv and self.training:
                kv = checkpoint(self._contexts_kv, encoder_out, use_reentrant=False)
            else:
                kv = self._contexts_kv(encoder_out)
            for blk, kv_i in zip(self.decoder_blocks, kv.unbind(0)):
                x = blk(x, kv=kv_i)
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
