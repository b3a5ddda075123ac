"""Named configurations, MAE-style: ``<method>_vit_<size>_patch<P>_dec<width>d<depth>b``.

Decoder widths follow the paper: ViT-S uses 256 wide / 8 heads, ViT-B/L/H 512 / 16 heads;
decoder depth 12 for CrossMAE (the paper's main setting) and 8 for MAE (MAE's default).
CrossMAE presets default to gamma = 0.25 (pred_ratio); pass ``pred_ratio=0.75`` for the
paper's best-accuracy setting.
"""
from __future__ import annotations

from typing import Callable

from .model import MaskedAutoencoder, ModelConfig

# name -> (img, patch, width, depth, heads)
ENCODERS = {
    "tiny": (224, 16, 192, 12, 3),
    "small": (224, 16, 384, 12, 6),
    "base": (224, 16, 768, 12, 12),
    "large": (224, 16, 1024, 24, 16),
    "huge": (224, 14, 1280, 32, 16),
    "micro": (32, 4, 64, 4, 4),  # tests and CPU demos: 32x32 images, 64 patches
}
DECODER_WIDTH = {"tiny": (256, 8), "small": (256, 8), "base": (512, 16), "large": (512, 16),
                 "huge": (512, 16), "micro": (64, 4)}
DECODER_DEPTH = {"cross": 12, "mae": 8}
MICRO_DECODER_DEPTH = 2

_REGISTRY: dict[str, Callable[..., ModelConfig]] = {}


def _register(method: str, size: str) -> None:
    img, patch, width, depth, heads = ENCODERS[size]
    dec_width, dec_heads = DECODER_WIDTH[size]
    dec_depth = MICRO_DECODER_DEPTH if size == "micro" else DECODER_DEPTH[method]
    name = f"{'crossmae' if method == 'cross' else 'mae'}_vit_{size}_patch{patch}_dec{dec_width}d{dec_depth}b"

    def make_config(**overrides) -> ModelConfig:
        base = dict(decoder=method, img_size=img, patch_size=patch, embed_dim=width, depth=depth,
                    num_heads=heads, decoder_embed_dim=dec_width, decoder_depth=dec_depth,
                    decoder_num_heads=dec_heads)
        if method == "mae":
            base.update(pred_ratio=overrides.get("mask_ratio", 0.75), fuse_features=False)
        return ModelConfig(**{**base, **overrides})

    make_config.__name__ = name
    _REGISTRY[name] = make_config


for _method in ("cross", "mae"):
    for _size in ENCODERS:
        _register(_method, _size)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides) -> ModelConfig:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name](**overrides)


def create_model(name: str, **overrides) -> MaskedAutoencoder:
    """``create_model('crossmae_vit_base_patch16_dec512d12b', pred_ratio=0.75)``."""
    return MaskedAutoencoder(model_config(name, **overrides))
