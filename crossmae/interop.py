"""Checkpoint interop: the ONE way encoders leave this library (timm-compatible export)
and the one way released CrossMAE / MAE checkpoints enter it.

Key mapping between this library and the released checkpoints (github TonyLianLong/CrossMAE,
facebookresearch/mae), the only renames anywhere in the project:

    released                          this library
    patch_embed.* cls_token pos_embed encoder.<same>
    blocks.* norm.*                   encoder.<same>
    mask_token decoder_pos_embed      decoder.<same>
    decoder_embed.* (MAE)             decoder.<same>
    decoder_blocks.* decoder_norm.*   decoder.<same>
    decoder_pred.*                    decoder.<same>
    wfm.linear.weight                 decoder.feature_fusion.weight   (inter-block attention)
    dec_norms.{i}.*                   decoder.fused_norms.{i}.*

Exported encoders carry no decoder, mask-token or fusion keys: timm treats any state dict
holding ``mask_token`` as a DINOv2 checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from typing import IO, Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .model import MaskedAutoencoder, ModelConfig
from .presets import DECODER_WIDTH, ENCODERS

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
DECODER_PREFIXES = ("mask_token", "decoder_pos_embed", "decoder_embed.", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
RELEASED_KEY_MAP = (  # (released prefix, this library's prefix), first match wins
    ("wfm.linear.", "decoder.feature_fusion."),
    ("dec_norms.", "decoder.fused_norms."),
    *((p, "encoder." + p) for p in ENCODER_PREFIXES),
    *((p, "decoder." + p) for p in DECODER_PREFIXES),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one clear message)."""


def _rename(key: str, pairs) -> str | None:
    """Prefixes ending in '.' match module subtrees; others match one parameter exactly."""
    for src, dst in pairs:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def released_to_library(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for k, v in state.items():
        new = _rename(k, RELEASED_KEY_MAP)
        (unknown.append(k) if new is None else out.__setitem__(new, v))
    if unknown:
        raise CheckpointError(f"unrecognised keys in released checkpoint: {', '.join(sorted(unknown)[:8])}")
    return out


def library_to_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = [(dst, src) for src, dst in RELEASED_KEY_MAP]
    out = {}
    for k, v in state.items():
        new = _rename(k, inverse)
        if new is None:
            raise CheckpointError(f"key {k!r} has no released-format name")
        out[new] = v
    return out


def read_checkpoint(f: str | IO[bytes]) -> dict[str, torch.Tensor]:
    """The model state dict of a ``.pth`` file (under ``model`` or at top level).

    Loads with ``weights_only=True``; the only class allowed beyond tensors and containers is
    ``argparse.Namespace``, which the released checkpoints store under ``args``. A pickle
    that asks for anything else is refused.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; report one line
        # torch's message opens with advice to retry with weights_only=False: skip to the cause
        noise = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(noise)]
        raise CheckpointError(f"refused or unreadable checkpoint: {lines[0] if lines else type(e).__name__}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint holds no state dict of tensors (expected a dict, or one under 'model')")
    return state


def _heads_for(width: int, table: dict[int, int]) -> int:
    """Head counts are not stored in weights: take them from the preset of that width."""
    if width not in table:
        raise CheckpointError(f"no preset has width {width}; pass num_heads / decoder_num_heads explicitly")
    return table[width]


def config_from_released(state: dict[str, torch.Tensor], **overrides) -> ModelConfig:
    """Infer the architecture of a released state dict (library or released key names)."""
    s = released_to_library(state) if "blocks.0.norm1.weight" in state else state
    embed_dim = s["encoder.pos_embed"].shape[-1]
    patch = s["encoder.patch_embed.proj.weight"].shape[-1]
    in_chans = s["encoder.patch_embed.proj.weight"].shape[1]
    grid = int(round((s["encoder.pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max(int(k.split(".")[2]) for k in s if k.startswith("encoder.blocks."))
    heads = overrides.get("num_heads") or _heads_for(embed_dim, {w: h for _, _, w, _, h in ENCODERS.values()})
    cfg: dict[str, Any] = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
                               depth=depth, num_heads=heads)
    if "decoder.mask_token" in s:
        dec_dim = s["decoder.mask_token"].shape[-1]
        cfg.update(decoder_embed_dim=dec_dim,
                   decoder_num_heads=overrides.get("decoder_num_heads") or _heads_for(dec_dim, dict(DECODER_WIDTH.values())),
                   decoder_depth=1 + max(int(k.split(".")[2]) for k in s if k.startswith("decoder.decoder_blocks.")))
        if "decoder.decoder_embed.weight" in s:
            cfg.update(decoder="mae", pred_ratio=0.75, fuse_features=False)
        else:
            fusion = s.get("decoder.feature_fusion.weight")
            cfg.update(decoder="cross", fuse_features=fusion is not None,
                       fuse_use_input=fusion is None or fusion.shape[1] == depth + 1,
                       decoder_self_attn="decoder.decoder_blocks.0.self_attn.qkv.weight" in s)
    else:  # encoder-only file (e.g. MAE's mae_pretrain_vit_*.pth): a final norm means MAE-style
        has_norm = "encoder.norm.weight" in s
        size = next((k for k, v in ENCODERS.items() if v[2] == embed_dim and v[3] == depth), "base")
        dec_dim, dec_heads = DECODER_WIDTH[size]
        cfg.update(decoder="mae" if has_norm else "cross", fuse_features=not has_norm,
                   pred_ratio=0.75 if has_norm else 0.25, decoder_embed_dim=dec_dim, decoder_num_heads=dec_heads,
                   decoder_depth=8 if has_norm else 12)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def load_into(model: MaskedAutoencoder, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a library-keyed or released-keyed state dict strictly.

    An encoder-only state dict loads the encoder strictly and leaves the decoder at its
    initialisation; the returned list names the parameters left untouched.
    """
    s = released_to_library(state) if not any(k.startswith(("encoder.", "decoder.")) for k in state) else state
    own = model.state_dict()
    encoder_only = not any(k.startswith("decoder.") for k in s)
    expected = {k for k in own if k.startswith("encoder.")} if encoder_only else set(own)
    missing, unexpected = sorted(expected - set(s)), sorted(set(s) - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [k for k in s if s[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"shape mismatch for {bad[0]}: checkpoint {tuple(s[bad[0]].shape)} "
                              f"vs model {tuple(own[bad[0]].shape)}")
    model.load_state_dict(s, strict=not encoder_only)
    return sorted(set(own) - set(s))


def import_released(f: str | IO[bytes], **overrides) -> MaskedAutoencoder:
    """Build the model a released ``.pth`` describes and load it strictly."""
    state = read_checkpoint(f)
    model = MaskedAutoencoder(config_from_released(state, **overrides))
    load_into(model, state)
    return model


# ---------------------------------------------------------------- export (timm format)
def encoder_state_dict(state: dict[str, torch.Tensor] | MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """Encoder-only, timm-named tensors (contiguous fp32 clones) from a model or its state."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    out = {k[len("encoder."):]: v.detach().float().contiguous().clone() for k, v in state.items()
           if k.startswith("encoder.")}
    if not out:
        raise CheckpointError("state dict has no encoder.* keys")
    return out


def timm_config(config: ModelConfig, **pretrained_cfg) -> dict:
    """timm's ``config.json`` for the exported encoder: ``create_model(architecture,
    pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)`` rebuilds it exactly
    (global average pooling; no final norm for fusion encoders, as in CrossMAE)."""
    c = config
    model_args = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
                      depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True,
                      class_token=True, global_pool="avg", fc_norm=False, final_norm=c.encoder_final_norm,
                      num_classes=0)
    cfg = dict(
        tag="crossmae" if c.decoder == "cross" else "mae", custom_load=False,
        input_size=[c.in_chans, c.img_size, c.img_size], fixed_input_size=True, interpolation="bicubic",
        crop_pct=0.875, crop_mode="center", mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD),
        num_classes=0, pool_size=None, first_conv="patch_embed.proj", classifier="head",
    )
    cfg.update(pretrained_cfg)
    return dict(architecture="vit_base_patch16_224", num_classes=0, num_features=c.embed_dim,
                global_pool="avg", model_args=model_args, pretrained_cfg=cfg)


def export_encoder(model: MaskedAutoencoder) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for model.safetensors, dict for config.json). Writing them is the caller's job."""
    return encoder_state_dict(model), timm_config(model.config)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict, independent of file layout (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(json.dumps([k, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def create_timm_encoder(config: dict, tensors: dict[str, torch.Tensor], **overrides):
    """(timm VisionTransformer, missing keys) from an export.

    ``overrides`` (e.g. ``num_classes=1000, fc_norm=True, final_norm=True, drop_path_rate=0.1``
    for MAE-protocol fine-tuning) may add layers; only those new layers (``head.*``,
    ``fc_norm.*``) may be missing. With ``fc_norm`` an encoder's own final ``norm`` is dropped,
    as MAE's fine-tuning does. Anything else that does not fit is an error.
    """
    import timm

    model = timm.create_model(config["architecture"], pretrained=False, **{**config["model_args"], **overrides})
    own = model.state_dict()
    if overrides.get("fc_norm"):
        tensors = {k: v for k, v in tensors.items() if not (k.startswith("norm.") and k not in own)}
    result = model.load_state_dict(tensors, strict=False)
    bad_missing = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
    if bad_missing or result.unexpected_keys:
        raise CheckpointError(f"export does not fit timm model: missing {bad_missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    return model, sorted(result.missing_keys)
