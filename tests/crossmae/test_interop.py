import argparse
import io
import json
import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

from crossmae import (CheckpointError, config_from_released, create_model, create_timm_encoder, export_encoder,
                      import_released, list_models, load_into, model_config, read_checkpoint, timm_config)
from crossmae.interop import library_to_released
from crossmae.timm_export import GENERIC_TIMM_VIT, load_timm, tensors_sha256
from tests.conftest import smooth_images

CROSS = "crossmae_vit_micro_patch4_dec64d2b"
MAE = "mae_vit_micro_patch4_dec64d2b"


def _write_export(tmp_path, model):
    tensors, config = export_encoder(model)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tensors, config


def _timm_local_dir(export_dir):
    """The README's second recipe: timm's own local-dir source."""
    return timm.create_model(f"local-dir:{export_dir}", pretrained=True)


@pytest.mark.parametrize("name", [CROSS, MAE])
@pytest.mark.parametrize("recipe", [load_timm, _timm_local_dir])
def test_export_loads_into_timm_with_identical_features(tmp_path, name, recipe):
    model = create_model(name).eval()
    tensors, _ = _write_export(tmp_path, model)
    assert not any(k.startswith(("decoder", "mask_token", "feature_fusion", "fused_norms")) for k in tensors)
    assert ("norm.weight" in tensors) == (name == MAE)
    vit = recipe(tmp_path).eval()  # timm's own loader, strict (next test), no renaming
    x = smooth_images(3)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), model.encoder(x), atol=1e-5)
        pooled = vit(x)
    assert pooled.shape == (3, 64)
    assert torch.allclose(pooled, model.encoder(x)[:, 1:].mean(1), atol=1e-5)
    # the export's preprocessing, not the registry's ViT-B defaults (mean/std 0.5, 224 px, crop 0.9):
    # the project's eval transform is ImageNet mean/std, bicubic, resize to size/0.875, center crop
    data = resolve_data_config({}, model=vit)
    assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 0.875
    assert data["interpolation"] == "bicubic" and data["crop_mode"] == "center"
    assert tuple(data["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(data["std"]) == IMAGENET_DEFAULT_STD


@pytest.mark.parametrize("recipe", [load_timm, _timm_local_dir])
@pytest.mark.parametrize("damage", ["deleted key", "extra key", "wrong shape"])
def test_documented_timm_recipes_are_strict(tmp_path, recipe, damage):
    """The earlier recipe (overlaying only `file`) loaded all three: timm turned strict loading
    off because the registry's 1000 classes differ from the export's 0."""
    tensors, config = export_encoder(create_model(CROSS))
    if damage == "deleted key":
        del tensors["blocks.0.attn.qkv.bias"]
    elif damage == "extra key":
        tensors["blocks.0.attn.extra"] = torch.zeros(1)
    else:
        tensors["cls_token"] = torch.zeros(1, 1, 32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = CheckpointError if recipe is load_timm else RuntimeError
    with pytest.raises(expected, match={"deleted key": "Missing key.*blocks.0.attn.qkv.bias",
                                        "extra key": "Unexpected key.*blocks.0.attn.extra",
                                        "wrong shape": "size mismatch for cls_token"}[damage]):
        recipe(tmp_path)


def test_a_recipe_without_the_export_file_fails_instead_of_loading_registry_weights(tmp_path):
    _, cfg = _write_export(tmp_path, create_model(CROSS))
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=cfg["pretrained_cfg"],
                          **cfg["model_args"])
    with pytest.raises(CheckpointError, match="not an export"):
        load_timm(tmp_path / "nowhere")


@pytest.mark.parametrize("size,expected", [("tiny", "vit_tiny_patch16_224"), ("small", "vit_small_patch16_224"),
                                           ("base", "vit_base_patch16_224"), ("large", "vit_large_patch16_224"),
                                           ("huge", "vit_huge_patch14_224"), ("micro", GENERIC_TIMM_VIT)])
def test_config_names_the_timm_variant_of_each_size(size, expected):
    config = model_config(next(n for n in list_models() if n.startswith(f"crossmae_vit_{size}_")))
    cfg = timm_config(config)
    assert cfg["architecture"] == expected
    if size != "micro":  # timm's own variant has the encoder's shape (built on the meta device: no memory)
        with torch.device("meta"):
            vit = timm.create_model(expected, pretrained=False)
        assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, vit.patch_embed.patch_size[0]) == \
            (config.embed_dim, config.depth, config.num_heads, config.patch_size)
    assert timm_config(model_config("crossmae_vit_base_patch16_dec512d12b", img_size=384))["architecture"] == \
        "vit_base_patch16_384"


@pytest.mark.parametrize("name", [CROSS, MAE])
def test_export_for_finetuning_misses_exactly_the_new_head(name):
    model = create_model(name)
    tensors, config = export_encoder(model)
    vit, missing = create_timm_encoder(config, tensors, num_classes=10, fc_norm=True, final_norm=True,
                                       drop_path_rate=0.1)
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert torch.equal(vit.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="does not fit"):
        create_timm_encoder(config, tensors, depth=5)


def test_export_hash_is_stable_and_sensitive():
    model = create_model(CROSS)
    a, _ = export_encoder(model)
    assert tensors_sha256(a) == tensors_sha256(export_encoder(model)[0])
    a["blocks.0.attn.qkv.weight"][0, 0] += 1e-3
    assert tensors_sha256(a) != tensors_sha256(export_encoder(model)[0])


def test_released_key_names_are_the_published_ones():
    names = set(library_to_released(create_model(CROSS, decoder_self_attn=True).state_dict()))
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "mask_token",
              "decoder_pos_embed", "decoder_blocks.0.norm1.weight", "decoder_blocks.0.cross_attn.q.weight",
              "decoder_blocks.0.cross_attn.kv.weight", "decoder_blocks.0.cross_attn.proj.weight",
              "decoder_blocks.0.norm2.weight", "decoder_blocks.0.mlp.fc1.weight", "decoder_blocks.0.mlp.fc2.weight",
              "decoder_blocks.0.norm0.weight", "decoder_blocks.0.self_attn.qkv.weight",
              "decoder_blocks.0.self_attn.proj.weight", "decoder_norm.weight", "decoder_pred.weight",
              "wfm.linear.weight", "dec_norms.1.weight"]:
        assert k in names, k
    mae = set(library_to_released(create_model(MAE).state_dict()))
    assert {"decoder_embed.weight", "norm.weight", "decoder_blocks.0.attn.qkv.weight"} <= mae


@pytest.mark.parametrize("name,overrides", [(CROSS, {}), (CROSS, {"decoder_self_attn": True}),
                                            (CROSS, {"fuse_features": False}), (MAE, {})])
def test_released_checkpoint_imports_strictly_and_reproduces_outputs(tmp_path, name, overrides):
    model = create_model(name, **overrides).eval()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": library_to_released(model.state_dict()), "epoch": 799,
                "args": argparse.Namespace(model=name, mask_ratio=0.75, blr=1.5e-4)}, path)
    loaded = import_released(str(path), pred_ratio=model.config.pred_ratio).eval()
    assert loaded.config == model.config
    imgs, noise = smooth_images(2), torch.rand(2, 64)
    assert torch.equal(loaded(imgs, noise).pred, model(imgs, noise).pred)


def _released_file(path, model, **args):
    torch.save({"model": library_to_released(model.state_dict()), "epoch": 799,
                "args": argparse.Namespace(model="mae_vit_micro", blr=1.5e-4, **args)}, path)
    return str(path)


def test_import_takes_masking_and_loss_from_the_released_args(tmp_path):
    """A gamma = 0.75 CrossMAE file imports with gamma 0.75 (not the preset's 0.25), and
    mask_ratio / norm_pix_loss as trained; the caller's overrides still win."""
    model = create_model(CROSS, pred_ratio=0.75, norm_pix_loss=False).eval()
    path = _released_file(tmp_path / "checkpoint-799.pth", model, mask_ratio=0.75, kept_mask_ratio=0.75,
                          norm_pix_loss=False, cross_mae=True)
    loaded = import_released(path)
    assert (loaded.config.mask_ratio, loaded.config.pred_ratio, loaded.config.norm_pix_loss) == (0.75, 0.75, False)
    assert loaded.config == model.config
    assert import_released(path, pred_ratio=0.25).config.pred_ratio == 0.25
    other = import_released(_released_file(tmp_path / "p6.pth", model, mask_ratio=0.6, kept_mask_ratio=0.15,
                                           norm_pix_loss=True))
    assert (other.config.mask_ratio, other.config.pred_ratio, other.config.norm_pix_loss) == (0.6, 0.15, True)
    # MAE's args have no kept_mask_ratio; its decoder predicts every masked patch
    mae = import_released(_released_file(tmp_path / "mae.pth", create_model(MAE), mask_ratio=0.6, norm_pix_loss=True))
    assert (mae.config.decoder, mae.config.mask_ratio, mae.config.pred_ratio) == ("mae", 0.6, 0.6)
    with pytest.raises(CheckpointError, match="pred_ratio"):
        import_released(path, mask_ratio=0.5)  # below the file's kept_mask_ratio 0.75


def test_encoder_only_release_loads_encoder_and_reports_the_rest():
    """MAE's mae_pretrain_vit_*.pth hold the encoder only (with its final norm)."""
    source = create_model(MAE)
    released = {k: v for k, v in library_to_released(source.state_dict()).items()
                if not k.startswith(("decoder", "mask_token"))}
    buf = io.BytesIO()
    torch.save({"model": released}, buf)
    buf.seek(0)
    state = read_checkpoint(buf)
    cfg = config_from_released(state, decoder_embed_dim=64, decoder_num_heads=4, decoder_depth=2)
    assert cfg.decoder == "mae" and cfg.depth == 4 and cfg.embed_dim == 64 and cfg.patch_size == 4
    target = create_model(MAE)
    untouched = load_into(target, state)
    assert untouched and all(k.startswith("decoder.") for k in untouched)
    assert torch.equal(target.encoder.blocks[2].mlp.fc1.weight, source.encoder.blocks[2].mlp.fc1.weight)


def test_mismatched_checkpoint_gives_one_clear_error():
    state = library_to_released(create_model(CROSS).state_dict())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_into(create_model(CROSS, fuse_features=False), state)
    state["something_else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unrecognised keys.*something_else"):
        load_into(create_model(CROSS), state)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"cls_token": torch.zeros(1)}, "args": _Evil()}, f)
    # the same file is dangerous: plain unpickling would run the payload
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        read_checkpoint(str(path))
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    with pytest.raises(CheckpointError, match="no state dict"):
        buf = io.BytesIO()
        torch.save({"model": [1, 2]}, buf)
        buf.seek(0)
        read_checkpoint(buf)
