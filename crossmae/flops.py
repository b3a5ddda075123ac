"""Analytical FLOPs per image (2 x multiply-accumulates of linear layers and attention
matmuls; norms, softmax, activations and the loss are left out as negligible)."""
from __future__ import annotations

from .masking import split_counts
from .model import ModelConfig


def _block(tokens: int, dim: int, mlp_ratio: float) -> int:
    """MACs of one self-attention transformer block over `tokens` tokens."""
    linear = tokens * dim * (3 * dim + dim + 2 * int(dim * mlp_ratio))
    attention = 2 * tokens * tokens * dim  # QK^T and AV
    return linear + attention


def flops_per_image(config: ModelConfig, query: str = "pred") -> dict[str, int]:
    """{'encoder', 'decoder', 'total'} FLOPs of one forward pass for one image.

    ``query='pred'`` counts the trained decoder (gamma subset); ``'masked'`` full decoding.
    """
    c = config
    num_visible, _, num_pred = split_counts(c.num_patches, c.mask_ratio, c.pred_ratio)
    enc_tokens = 1 + num_visible
    encoder = c.num_patches * c.patch_dim * c.embed_dim  # patch embedding runs on all patches
    encoder += c.depth * _block(enc_tokens, c.embed_dim, c.mlp_ratio)

    d, hidden = c.decoder_embed_dim, int(c.decoder_embed_dim * c.mlp_ratio)
    if c.decoder == "mae":
        tokens = 1 + c.num_patches
        decoder = enc_tokens * c.embed_dim * d  # decoder_embed
        decoder += c.decoder_depth * _block(tokens, d, c.mlp_ratio)
        decoder += tokens * d * c.patch_dim
    else:
        queries = num_pred if query == "pred" else c.num_patches - num_visible
        per_block = queries * d * (d + d + 2 * hidden)  # q, proj, mlp
        per_block += enc_tokens * c.embed_dim * 2 * d  # k, v from encoder width
        per_block += 2 * queries * enc_tokens * d  # QK^T, AV
        if c.decoder_self_attn:
            per_block += queries * d * 4 * d + 2 * queries * queries * d
        decoder = c.decoder_depth * per_block + queries * d * c.patch_dim
        if c.fuse_features:
            decoder += enc_tokens * c.embed_dim * c.num_feature_maps * c.decoder_depth
    out = {"encoder": 2 * encoder, "decoder": 2 * decoder}
    out["total"] = out["encoder"] + out["decoder"]
    return out
