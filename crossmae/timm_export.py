"""Encoder export: the ONE way encoders leave this library, as timm-compatible files
(``model.safetensors`` with timm key names + ``config.json``), and the strict ways back in.

Exported encoders carry no decoder, mask-token or fusion keys: timm treats any state dict
holding ``mask_token`` as a DINOv2 checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .interop import CheckpointError
from .model import MaskedAutoencoder, ModelConfig


def encoder_state_dict(state: dict[str, torch.Tensor] | MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """Encoder-only, timm-named tensors (contiguous fp32 clones) from a model or its state."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    out = {k[len("encoder."):]: v.detach().float().contiguous().clone() for k, v in state.items()
           if k.startswith("encoder.")}
    if not out:
        raise CheckpointError("state dict has no encoder.* keys")
    return out


# (patch, width, depth, heads) -> timm's name for that ViT; "_<img_size>" is appended
TIMM_VIT_VARIANTS = {(16, 192, 12, 3): "vit_tiny_patch16", (16, 384, 12, 6): "vit_small_patch16",
                     (16, 768, 12, 12): "vit_base_patch16", (16, 1024, 24, 16): "vit_large_patch16",
                     (14, 1280, 32, 16): "vit_huge_patch14"}
# Encoders no timm variant matches (e.g. micro: 64 wide, patch 4, 32 px) name a plain ViT entry
# point: model_args set every architecture field and the export's pretrained_cfg every
# preprocessing field, so the registry defaults of this name are never used.
GENERIC_TIMM_VIT = "vit_base_patch16_224"


def timm_architecture(config: ModelConfig) -> str:
    """timm's variant name for this encoder (``vit_small_patch16_224`` for ViT-S/16 at 224 px)."""
    import timm

    c = config
    base = TIMM_VIT_VARIANTS.get((c.patch_size, c.embed_dim, c.depth, c.num_heads))
    name = f"{base}_{c.img_size}"
    return name if base and c.mlp_ratio == 4.0 and c.in_chans == 3 and timm.is_model(name) else GENERIC_TIMM_VIT


def timm_config(config: ModelConfig, **pretrained_cfg) -> dict:
    """timm's ``config.json`` for the exported encoder (global average pooling; no final norm
    for fusion encoders, as in CrossMAE). :func:`load_timm` is the way to load it: strict, and
    carrying this pretrained_cfg, which holds the project's eval preprocessing (ImageNet
    mean/std, bicubic, resize to img_size/0.875 and center crop, as pipelines/data/transforms.py)."""
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
        # no weight source but the export's own file: a recipe that forgets `file` fails instead
        # of fetching the registry's ImageNet weights for this architecture name
        url=None, hf_hub_id=None,
    )
    cfg.update(pretrained_cfg)
    return dict(architecture=timm_architecture(c), num_classes=0, num_features=c.embed_dim,
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

    model = timm.create_model(config["architecture"], pretrained=False,
                              pretrained_cfg_overlay=config.get("pretrained_cfg"),
                              **{**config["model_args"], **overrides})
    own = model.state_dict()
    if overrides.get("fc_norm"):
        tensors = {k: v for k, v in tensors.items() if not (k.startswith("norm.") and k not in own)}
    result = model.load_state_dict(tensors, strict=False)
    bad_missing = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
    if bad_missing or result.unexpected_keys:
        raise CheckpointError(f"export does not fit timm model: missing {bad_missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    return model, sorted(result.missing_keys)


def load_export_tensors(export: str, data: bytes, record: dict | None) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(tensors, sha256 of ``data``, verified) of an export's ``model.safetensors`` whose bytes the
    caller read once; ``record`` is its export.json (None: there is none).

    Verified against ``files["model.safetensors"]`` (sha256 and size of the file, what
    crossmae-export records), else against ``weights_sha256`` (the tensors' content hash); a
    mismatch is a CheckpointError naming the export and the file. A file overwritten in place
    with the same size still parses (the safetensors header is intact) and gave NaN features and
    a k-NN top-1 of 8%, so parsing is no check. verified=False: nothing is recorded to check
    against (an export not written by crossmae-export); the caller says so.
    """
    from safetensors.torch import load

    digest = hashlib.sha256(data).hexdigest()
    record = record if isinstance(record, dict) else {}
    meta = (record.get("files") or {}).get("model.safetensors") if isinstance(record.get("files"), dict) else None
    if isinstance(meta, dict) and meta.get("sha256"):
        if digest != meta["sha256"] or len(data) != meta.get("bytes", len(data)):
            raise CheckpointError(
                f"{export}: model.safetensors does not match its export.json (read {len(data)} bytes, sha256 "
                f"{digest[:16]}; recorded {meta.get('bytes')} bytes, sha256 {str(meta['sha256'])[:16]}): the file "
                "is damaged or was replaced; export the checkpoint again")
        return load(data), digest, True
    tensors = load(data)
    if record.get("weights_sha256"):
        if tensors_sha256(tensors) != record["weights_sha256"]:
            raise CheckpointError(f"{export}: model.safetensors does not hold the weights its export.json records "
                                  f"(weights_sha256 {str(record['weights_sha256'])[:16]}): damaged or replaced; "
                                  "export the checkpoint again")
        return tensors, digest, True
    return tensors, digest, False


def load_timm(export_dir: str | os.PathLike):
    """An export directory (``model.safetensors`` + ``config.json``) as a timm model, the
    documented recipe: STRICT (a missing or extra key is an error), with the export's
    pretrained_cfg, so ``timm.data.resolve_data_config(model=...)`` gives the project's eval
    preprocessing; where export.json is beside them, model.safetensors is first verified against
    it (:func:`load_export_tensors`: a damaged file is a CheckpointError naming it). The weights
    are loaded from the bytes that were hashed (read once), with torch's strict load_state_dict,
    which is what timm's own loader ends in; the model is the same as
    ``timm.create_model("local-dir:" + export_dir, pretrained=True)`` (timm 1.0.31), which does
    not verify.

    Overlaying only ``file`` (this project's earlier recipe) keeps the registry's pretrained_cfg:
    its 1000 classes differ from the export's 0, so timm loads non-strictly, and its data config
    (mean/std 0.5, crop 0.9) is not the export's. New heads: :func:`create_timm_encoder`.
    """
    import timm

    path = Path(export_dir)
    try:
        cfg = json.loads((path / "config.json").read_text())
        arch, pretrained_cfg, model_args = cfg["architecture"], cfg["pretrained_cfg"], cfg["model_args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not an export ({type(e).__name__}: {e})") from None
    record = None
    try:
        if (path / "export.json").exists():
            record = json.loads((path / "export.json").read_text())
        data = (path / "model.safetensors").read_bytes()  # read once: hashed and loaded from these bytes
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the export ({type(e).__name__}: {e})") from None
    tensors, _, _ = load_export_tensors(str(path), data, record)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **model_args)
    try:
        model.load_state_dict(tensors, strict=True)  # what timm's pretrained=True does with `file`, from verified bytes
    except RuntimeError as e:  # missing / unexpected keys, shapes
        raise CheckpointError(f"{path} does not load strictly into timm's {arch}: "
                              f"{' '.join(str(e).split())}") from None
    return model
