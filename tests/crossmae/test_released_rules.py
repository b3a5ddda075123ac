"""The model against the released code's own rules: TonyLianLong/CrossMAE models_cross.py
(random_masking, forward_loss, initialize_weights, WeightedFeatureMaps) and facebookresearch/mae
models_mae.py and util/pos_embed.py. Each rule is re-implemented here from its definition in the
released code, not from this project's code, and compared on the same inputs."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from crossmae import create_model
from crossmae.masking import random_masking

CROSS, MAE = "crossmae_vit_micro_patch4_dec64d2b", "mae_vit_micro_patch4_dec64d2b"


# --- the released rules ---------------------------------------------------------------------

def released_masking(noise: torch.Tensor, mask_ratio: float, kept_mask_ratio: float):
    """models_cross.random_masking: argsort(noise); the first int(L*(1-p)) ranks are kept, the mask
    (1 = predicted) starts at rank len_keep + int(L*(p - kmr)). Returns (ids_keep, mask)."""
    n, length = noise.shape
    len_keep = int(length * (1 - mask_ratio))
    len_masked = int(length * (mask_ratio - kept_mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :len_keep + len_masked] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore)


def released_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    n, _, h, _ = imgs.shape
    x = imgs.reshape(n, 3, h // p, p, h // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) ** 2, p * p * 3)


def released_cross_loss(imgs, pred_image_order, mask, p: int, norm_pix_loss: bool):
    """models_cross.forward_loss: targets at mask == 1 in image order (masked_select), per-patch
    normalisation with the unbiased variance and eps 1e-6, mean over everything predicted."""
    target = released_patchify(imgs, p)
    target = target.masked_select(mask.bool().unsqueeze(-1)).reshape(target.shape[0], -1, target.shape[-1])
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    return ((pred_image_order - target) ** 2).mean()


def released_mae_loss(imgs, pred_all, mask, p: int, norm_pix_loss: bool):
    """models_mae.forward_loss: per-patch mean squared error, averaged over the removed patches."""
    target = released_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred_all - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def mae_2d_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """util/pos_embed.get_2d_sincos_pos_embed(cls_token=True), float32 like the original."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.
        omega = 1. / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))  # w first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def in_image_order(pred: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """This project's predictions follow ids_query; the released decoder's follow the image."""
    order = torch.argsort(ids, dim=1)
    return torch.gather(pred, 1, order.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))


# --- masking --------------------------------------------------------------------------------

RATIOS = [(p, g) for p in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95) for g in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3,
                                                                               0.4, 0.5, 0.6, 0.75, 0.9) if g <= p]


@pytest.mark.parametrize("num_patches", [16, 49, 64, 144, 196, 256, 576, 784])
def test_masking_selects_the_released_visible_and_predicted_sets(num_patches):
    """Same noise, same sets: visible = the released ids_keep, predicted = where the released
    mask is 1, masked-not-predicted = the rest; for every (p, gamma) the released code runs."""
    checked = 0
    for mask_ratio, pred_ratio in RATIOS:
        noise = torch.rand(3, num_patches)
        ids_keep, mask = released_masking(noise, mask_ratio, pred_ratio)
        if ids_keep.shape[1] < 1 or mask.sum(1).min() < 1:
            with pytest.raises(ValueError):  # the released code would encode or predict nothing
                random_masking(noise, mask_ratio, pred_ratio)
            continue
        m = random_masking(noise, mask_ratio, pred_ratio)
        counts = (m.num_visible, num_patches - m.num_visible - m.num_pred, m.num_pred)
        assert counts == (ids_keep.shape[1], num_patches - ids_keep.shape[1] - int(mask[0].sum()),
                          int(mask[0].sum())), (mask_ratio, pred_ratio)
        assert torch.equal(torch.sort(m.ids_visible, 1).values, torch.sort(ids_keep, 1).values)
        assert torch.equal(m.binary(m.ids_pred), mask)
        checked += 1
    assert checked >= len(RATIOS) // 2  # the grid is not mostly refusals


def test_mae_masking_predicts_every_masked_patch_like_the_released_mae():
    noise = torch.rand(4, 196)
    ids_keep, mask = released_masking(noise, 0.75, 0.75)  # models_mae: mask[:, :len_keep] = 0
    m = random_masking(noise, 0.75)
    assert torch.equal(torch.sort(m.ids_visible, 1).values, torch.sort(ids_keep, 1).values)
    assert torch.equal(m.binary(m.ids_pred), mask) and torch.equal(m.binary(m.ids_masked), mask)


# --- loss -----------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("pred_ratio", [0.25, 0.75])
def test_loss_is_the_released_forward_loss(norm_pix, pred_ratio):
    torch.manual_seed(0)
    model = create_model(CROSS, norm_pix_loss=norm_pix, pred_ratio=pred_ratio)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    out = model(imgs, noise)
    _, mask = released_masking(noise, 0.75, pred_ratio)
    expected = released_cross_loss(imgs, in_image_order(out.pred, out.ids_query), mask, 4, norm_pix)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_is_the_released_mae_forward_loss(norm_pix):
    torch.manual_seed(0)
    model = create_model(MAE, norm_pix_loss=norm_pix)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    out = model(imgs, noise)
    _, mask = released_masking(noise, 0.75, 0.75)
    full = torch.zeros(2, 64, out.pred.shape[-1]).scatter(1, out.ids_query.unsqueeze(-1).expand_as(out.pred), out.pred)
    expected = released_mae_loss(imgs, full, mask, 4, norm_pix)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- initialisation -------------------------------------------------------------------------

def xavier_bound(fan_out: int, fan_in: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return create_model("crossmae_vit_small_patch16_dec256d12b")


def test_patch_embedding_is_initialised_like_a_linear_and_its_bias_like_a_conv(small):
    """initialize_weights: xavier_uniform_ on the (D, C*p*p) view of the conv weight; the conv
    bias keeps torch's Conv2d default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    proj = small.encoder.patch_embed.proj
    w = proj.weight.detach().reshape(proj.weight.shape[0], -1)  # (384, 768)
    bound = xavier_bound(*w.shape)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    b = proj.bias.detach()
    assert b.abs().max() <= 1 / math.sqrt(w.shape[1]) and b.abs().max() > 0


def test_tokens_are_normal_002(small):
    for token in (small.encoder.cls_token, small.decoder.mask_token):  # 384 and 256 values
        assert abs(token.mean().item()) < 0.004 and token.std().item() == pytest.approx(0.02, rel=0.15)


def test_every_linear_is_xavier_uniform_with_zero_bias_and_layernorms_are_one_zero(small):
    """_init_weights over every module, the fusion weight included: the released
    WeightedFeatureMaps draws N(0, 1/sqrt(k)) and self.apply(_init_weights) then overwrites it
    with xavier_uniform_ (a normal would exceed the xavier bound on ~8% of its 156 entries)."""
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    assert small.decoder.feature_fusion in linears
    for m in linears:
        w = m.weight.detach()
        bound = xavier_bound(*w.shape)
        assert w.abs().max() <= bound, m
        if w.numel() >= 50_000:
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02), m
        assert m.bias is None or torch.all(m.bias == 0), m
    norms = [m for m in small.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 12 * 2 + 12 + 12 * 2 + 1  # encoder blocks, fused-map norms, decoder blocks, decoder_norm
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6


@pytest.mark.parametrize("preset", ["crossmae_vit_small_patch16_dec256d12b", "crossmae_vit_base_patch16_dec512d12b",
                                    "crossmae_vit_huge_patch14_dec512d12b", CROSS])
def test_position_tables_are_the_released_fixed_sincos(preset):
    from crossmae import model_config
    from crossmae.pos_embed import sincos_2d

    c = model_config(preset)
    grid = c.img_size // c.patch_size
    for dim in (c.embed_dim, c.decoder_embed_dim):
        ours = sincos_2d(dim, grid).numpy()
        assert ours.shape == (grid * grid + 1, dim)
        np.testing.assert_allclose(ours, mae_2d_sincos(dim, grid), atol=2e-6)  # MAE computes in float32
    if preset in (CROSS, "crossmae_vit_small_patch16_dec256d12b"):
        model = create_model(preset)
        for table in (model.encoder.pos_embed, model.decoder.decoder_pos_embed):
            assert not table.requires_grad  # fixed: not trained, not in any optimizer group
            np.testing.assert_allclose(table[0].numpy(), mae_2d_sincos(table.shape[-1], grid), atol=2e-6)
