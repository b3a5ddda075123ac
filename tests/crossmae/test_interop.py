import argparse
import io
import json
import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from crossmae import (CheckpointError, config_from_released, create_model, create_timm_encoder, export_encoder,
                      import_released, load_into, read_checkpoint)
from crossmae.interop import library_to_released, tensors_sha256
from tests.conftest import smooth_images

CROSS = "crossmae_vit_micro_patch4_dec64d2b"
MAE = "mae_vit_micro_patch4_dec64d2b"


def _write_export(tmp_path, model):
    tensors, config = export_encoder(model)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tensors, config


@pytest.mark.parametrize("name", [CROSS, MAE])
def test_export_loads_into_timm_with_identical_features(tmp_path, name):
    model = create_model(name).eval()
    tensors, config = _write_export(tmp_path, model)
    assert not any(k.startswith(("decoder", "mask_token", "feature_fusion", "fused_norms")) for k in tensors)
    assert ("norm.weight" in tensors) == (name == MAE)
    cfg = json.loads((tmp_path / "config.json").read_text())
    # timm's own loader, strict: the export maps onto VisionTransformer with no renaming
    vit = timm.create_model(cfg["architecture"], pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")),
                            **cfg["model_args"]).eval()
    x = smooth_images(3)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), model.encoder(x), atol=1e-5)
        pooled = vit(x)
    assert pooled.shape == (3, 64)
    assert torch.allclose(pooled, model.encoder(x)[:, 1:].mean(1), atol=1e-5)


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
