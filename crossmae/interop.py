"""Checkpoint import: the one way released CrossMAE / MAE checkpoints enter this library
(encoders leave it through crossmae/timm_export.py).

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
"""
from __future__ import annotations

import argparse
from typing import IO, Any

import torch

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


def _load_weights_only(f: str | IO[bytes]) -> Any:
    """``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` and nothing else."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; report one line
        # torch's message opens with advice to retry with weights_only=False: skip to the cause
        noise = ("Weights only load failed", "Check the documentation", "Please file an issue", "In PyTorch 2.6")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(noise)]
        raise CheckpointError(f"refused or unreadable checkpoint: {lines[0] if lines else type(e).__name__}") from None


def _state_of(obj: Any) -> dict[str, torch.Tensor]:
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint holds no state dict of tensors (expected a dict, or one under 'model')")
    return state


def read_checkpoint(f: str | IO[bytes]) -> dict[str, torch.Tensor]:
    """The model state dict of a ``.pth`` file (under ``model`` or at top level).

    Loads with ``weights_only=True``; the only class allowed beyond tensors and containers is
    ``argparse.Namespace``, which the released checkpoints store under ``args``. A pickle
    that asks for anything else is refused.
    """
    return _state_of(_load_weights_only(f))


# released training arguments -> ModelConfig fields (main_pretrain.py's flag names)
RELEASED_ARGS = (("mask_ratio", "mask_ratio"), ("kept_mask_ratio", "pred_ratio"), ("norm_pix_loss", "norm_pix_loss"))


def masking_from_args(args: Any, decoder: str) -> dict[str, Any]:
    """mask_ratio / pred_ratio (gamma, ``kept_mask_ratio``) / norm_pix_loss from a released
    checkpoint's pickled ``args`` (an argparse.Namespace); {} when absent. An MAE decoder
    predicts every masked patch, so its gamma is p, never kept_mask_ratio."""
    given = vars(args) if isinstance(args, argparse.Namespace) else {}
    out: dict[str, Any] = {}
    for arg, field in RELEASED_ARGS:
        value = given.get(arg)
        if field == "norm_pix_loss" and isinstance(value, bool):
            out[field] = value
        elif field != "norm_pix_loss" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[field] = float(value)
    if decoder == "mae":  # gamma = p whatever the args say (import_released sets it)
        out.pop("pred_ratio", None)
    return out


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
    """Build the model a released ``.pth`` describes and load it strictly.

    The architecture comes from the weights; mask_ratio, pred_ratio (gamma) and norm_pix_loss
    from the pickled training ``args`` when the file has them (a gamma = 0.75 checkpoint imports
    with gamma = 0.75); ``overrides`` win over both."""
    obj = _load_weights_only(f)
    state = _state_of(obj)
    masking = {field for _, field in RELEASED_ARGS}
    decoder = config_from_released(state, **{k: v for k, v in overrides.items() if k not in masking}).decoder
    from_args = masking_from_args(obj.get("args") if isinstance(obj, dict) else None, decoder)
    merged = {**from_args, **overrides}
    if decoder == "mae" and "pred_ratio" not in overrides and "mask_ratio" in merged:
        merged["pred_ratio"] = merged["mask_ratio"]  # MAE predicts every masked patch
    try:
        config = config_from_released(state, **merged)
    except ValueError as e:  # e.g. the caller's mask_ratio below the file's kept_mask_ratio
        raise CheckpointError(f"{e} (from the checkpoint's args: {from_args})") from None
    model = MaskedAutoencoder(config)
    load_into(model, state)
    return model
