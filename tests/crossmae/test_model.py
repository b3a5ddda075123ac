import pytest
import torch

from crossmae import create_model, patchify, unpatchify
from crossmae.model import patch_targets
from tests.conftest import smooth_images

CROSS = "crossmae_vit_micro_patch4_dec64d2b"
MAE = "mae_vit_micro_patch4_dec64d2b"


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 32, 32)
    p = patchify(x, 4)
    assert p.shape == (2, 64, 48)
    assert torch.equal(unpatchify(p, 4), x)
    # patch 1 is the second patch of the first row: columns 4..7, pixels (row, col, channel)
    assert torch.equal(p[0, 1].reshape(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))


@pytest.mark.parametrize("name,pred_ratio,expected_q", [(CROSS, 0.25, 16), (CROSS, 0.75, 48), (MAE, 0.75, 48)])
def test_output_shapes(name, pred_ratio, expected_q):
    model = create_model(name, pred_ratio=pred_ratio)
    out = model(smooth_images(2))
    assert out.pred.shape == (2, expected_q, 48)
    assert out.ids_query.shape == (2, expected_q)
    assert out.loss.ndim == 0 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_state_dict_names_match_timm_and_released_layout():
    keys = set(create_model(CROSS).state_dict())
    for k in ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.pos_embed",
              "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.proj.bias",
              "encoder.blocks.0.mlp.fc1.weight", "encoder.blocks.3.mlp.fc2.bias", "decoder.mask_token",
              "decoder.decoder_pos_embed", "decoder.decoder_blocks.1.cross_attn.q.weight",
              "decoder.decoder_blocks.1.cross_attn.kv.weight", "decoder.decoder_blocks.1.cross_attn.proj.weight",
              "decoder.feature_fusion.weight", "decoder.fused_norms.1.weight", "decoder.decoder_norm.weight",
              "decoder.decoder_pred.weight"]:
        assert k in keys, k
    assert not any(k.startswith("encoder.norm.") for k in keys), "fusion encoders have no final norm"
    assert not any("self_attn" in k for k in keys)
    no_fusion = set(create_model(CROSS, fuse_features=False).state_dict())
    assert "encoder.norm.weight" in no_fusion and not any("fus" in k for k in no_fusion)


def test_position_embeddings_are_fixed_sincos_with_zero_cls():
    model = create_model(CROSS)
    pe = model.encoder.pos_embed
    assert not pe.requires_grad and torch.all(pe[0, 0] == 0)
    # channel 0 is sin(column * 1) for the first half (column coordinate), row-major patches
    assert torch.allclose(pe[0, 1:9, 0], torch.sin(torch.arange(8.0)), atol=1e-6)
    assert torch.allclose(pe[0, 1::8, 32], torch.sin(torch.arange(8.0)), atol=1e-6)  # second half: row
    assert model.decoder.decoder_pos_embed.shape == (1, 65, 64)


def test_fusion_mixes_input_and_every_block():
    model = create_model(CROSS)
    assert model.decoder.feature_fusion.weight.shape == (2, 5)  # decoder depth x (1 input + 4 blocks)
    assert create_model(CROSS, fuse_use_input=False).decoder.feature_fusion.weight.shape == (2, 4)
    out = model(smooth_images(2))
    out.loss.backward()
    assert model.decoder.feature_fusion.weight.grad.abs().sum() > 0


def test_prediction_depends_only_on_visible_pixels():
    model = create_model(CROSS).eval()
    imgs, noise = smooth_images(2), torch.rand(2, 64)
    out = model(imgs, noise)
    hidden = out.masking.ids_masked[0, 0].item()
    changed = imgs.clone()
    r, c = divmod(hidden, 8)
    changed[0, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 5.0
    assert torch.equal(model(changed, noise).pred, out.pred)
    visible = out.masking.ids_visible[0, 0].item()
    r, c = divmod(visible, 8)
    changed = imgs.clone()
    changed[0, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 5.0
    assert not torch.allclose(model(changed, noise).pred[0], out.pred[0])


@pytest.mark.parametrize("self_attn", [False, True])
def test_decoder_queries_are_independent(self_attn):
    model = create_model(CROSS, decoder_self_attn=self_attn).eval()
    dec = model.decoder
    feats = model.encoder(smooth_images(2), torch.arange(16).expand(2, -1), return_all=True)
    ids = torch.arange(16, 40).expand(2, -1)
    x = dec.queries(ids)
    contexts = dec.contexts(feats)

    def run(q):
        for blk, ctx in zip(dec.decoder_blocks, contexts):
            q = blk(q, ctx)
        return q

    base = run(x)
    x2 = x.clone()
    x2[:, 5] += torch.randn_like(x2[:, 5])
    moved = run(x2)
    others = [i for i in range(24) if i != 5]
    assert not torch.allclose(moved[:, 5], base[:, 5])
    if self_attn:
        assert not torch.allclose(moved[:, others], base[:, others], atol=1e-5)
    else:
        assert torch.allclose(moved[:, others], base[:, others], atol=1e-6)


def test_full_decoding_returns_every_masked_patch_and_agrees_with_training_pass():
    model = create_model(CROSS).eval()  # trained (here: initialised) with gamma=0.25
    imgs, noise = smooth_images(3), torch.rand(3, 64)
    train = model(imgs, noise)
    full = model(imgs, noise, query="masked")
    assert full.pred.shape == (3, 48, 48)
    for i in range(3):
        assert set(full.ids_query[i].tolist()) == set(range(64)) - set(train.masking.ids_visible[i].tolist())
    # queries are independent, so the predicted subset decodes identically inside the full pass
    assert torch.allclose(full.pred[:, -16:], train.pred, atol=1e-5)


def test_loss_touches_predicted_patches_only():
    model = create_model(CROSS)
    imgs = smooth_images(2).requires_grad_(True)
    out = model(imgs.detach(), torch.rand(2, 64))
    target = patch_targets(imgs, 4, out.ids_query, norm_pix=True)
    ((out.pred.detach() - target) ** 2).mean().backward()
    grad = patchify(imgs.grad, 4).abs().sum(-1)  # (N, L)
    predicted = out.masking.binary(out.ids_query).bool()
    assert torch.all(grad[predicted] > 0)
    assert torch.all(grad[~predicted] == 0)


def test_norm_pix_targets_are_per_patch_standardised():
    imgs = smooth_images(2) * 3 + 1
    ids = torch.arange(64).expand(2, -1)
    t = patch_targets(imgs, 4, ids, norm_pix=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 64), atol=1e-4)
    assert torch.allclose(t.var(-1), torch.ones(2, 64), atol=1e-2)
    assert torch.equal(patch_targets(imgs, 4, ids, norm_pix=False), patchify(imgs, 4))


def test_loss_is_float32_under_bf16_autocast():
    model = create_model(CROSS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(smooth_images(2))
    assert out.pred.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_gradient_checkpointing_gives_same_gradients():
    imgs, noise = smooth_images(2), torch.rand(2, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model(CROSS)
        model.set_grad_checkpointing(ckpt)
        model(imgs, noise).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("name", [CROSS, MAE])
def test_predictions_do_not_depend_on_the_order_of_visible_tokens(name):
    """Reordering the visible set (same patches, other ranks) must not change any prediction:
    the MAE decoder has to un-shuffle tokens back to their image positions."""
    model = create_model(name).eval()
    imgs, noise = smooth_images(2), torch.rand(2, 64)
    out = model(imgs, noise)
    vis = out.masking.ids_visible[0]
    reordered = noise.clone()
    reordered[0, vis] = noise[0, vis.flip(0)]  # reverse the ranks inside the visible set
    out2 = model(imgs, reordered)
    assert not torch.equal(out2.masking.ids_visible[0], vis)
    assert torch.equal(out2.ids_query, out.ids_query)
    assert torch.allclose(out2.pred, out.pred, atol=1e-5)


@pytest.mark.parametrize("name", [CROSS, MAE])
def test_loss_falls_on_a_fixed_batch(name):
    model = create_model(name)
    imgs, noise = smooth_images(8), torch.rand(8, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    first = None
    for _ in range(40):
        loss = model(imgs, noise).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first, (first, loss.item())


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="pred_ratio"):
        create_model(MAE, pred_ratio=0.25)
    with pytest.raises(ValueError, match="multiple"):
        create_model(CROSS, img_size=30)
    with pytest.raises(ValueError, match="unknown model preset"):
        create_model("crossmae_vit_gigantic")
