"""CrossMAE model library: encoder, CrossMAE and MAE decoders, masking, loss, presets,
FLOPs, checkpoint import and timm export. No distributed code and no storage I/O live here."""
from .flops import flops_per_image
from .interop import CheckpointError, config_from_released, import_released, load_into, read_checkpoint
from .masking import PatchMasking, random_masking
from .model import AutoencoderOutput, MaskedAutoencoder, ModelConfig, patchify, unpatchify
from .presets import create_model, list_models, model_config
from .timm_export import create_timm_encoder, export_encoder, load_timm, timm_config

__all__ = [
    "AutoencoderOutput", "CheckpointError", "MaskedAutoencoder", "ModelConfig", "PatchMasking",
    "config_from_released", "create_model", "create_timm_encoder", "export_encoder", "flops_per_image",
    "import_released", "list_models", "load_into", "load_timm", "model_config", "patchify", "random_masking",
    "read_checkpoint", "timm_config", "unpatchify",
]
