import pytest
import torch

from crossmae.masking import random_masking, split_counts


@pytest.mark.parametrize("num_patches", [64, 196])
@pytest.mark.parametrize("mask_ratio,pred_ratio", [(0.75, 0.25), (0.75, 0.75), (0.75, 0.15), (0.5, 0.25), (0.9, 0.1)])
def test_mask_counts_and_disjoint_sets(num_patches, mask_ratio, pred_ratio):
    m = random_masking(torch.rand(4, num_patches), mask_ratio, pred_ratio)
    visible, skipped, pred = split_counts(num_patches, mask_ratio, pred_ratio)
    assert visible == int(num_patches * (1 - mask_ratio))
    # released-code rounding: both floors leave the remainder (< 2 patches) to the predicted set
    assert 0 <= pred - num_patches * pred_ratio < 2
    assert visible + skipped + pred == num_patches
    assert m.ids_visible.shape == (4, visible) and m.ids_pred.shape == (4, pred)
    assert m.ids_masked.shape == (4, num_patches - visible)
    for i in range(4):
        vis, masked, predicted = (set(t[i].tolist()) for t in (m.ids_visible, m.ids_masked, m.ids_pred))
        assert not vis & masked and not vis & predicted
        assert predicted <= masked
        assert vis | masked == set(range(num_patches))
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(num_patches).expand(4, -1))


def test_same_noise_gives_same_masks_and_order_follows_noise():
    noise = torch.rand(3, 64)
    a, b = random_masking(noise, 0.75, 0.25), random_masking(noise.clone(), 0.75, 0.25)
    assert torch.equal(a.ids_shuffle, b.ids_shuffle)
    # the first L(1-p) ranks of argsort(noise) are visible: the 16 smallest noise values
    assert set(a.ids_visible[0].tolist()) == set(noise[0].topk(16, largest=False).indices.tolist())
    assert set(a.ids_pred[0].tolist()) == set(noise[0].topk(16).indices.tolist())
    assert not torch.equal(a.ids_shuffle, random_masking(torch.rand(3, 64), 0.75, 0.25).ids_shuffle)


def test_predicted_patches_are_a_uniform_subset_of_masked():
    m = random_masking(torch.rand(20000, 16), 0.75, 0.25)  # 4 visible, 8 skipped, 4 predicted
    freq = m.binary(m.ids_pred).mean(0)
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.02)
    hidden = m.binary(m.ids_masked)
    conditional = (m.binary(m.ids_pred) * hidden).sum(0) / hidden.sum(0)
    assert torch.allclose(conditional, torch.full((16,), 1 / 3), atol=0.02)


RATIO_GRID = [(p, g) for p in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9) for g in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75)
              if g <= p]


@pytest.mark.parametrize("num_patches", [16, 49, 64, 144, 196, 256, 576])
def test_split_counts_round_exactly_like_the_released_code(num_patches):
    """The authors' random_masking: int(L*(1-p)) visible, int(L*(p-gamma)) masked and not
    predicted, the rest predicted; no epsilon (p=0.7, gamma=0.2: 0.7-0.2 = 0.49999999999999994)."""
    for mask_ratio, pred_ratio in RATIO_GRID:
        visible = int(num_patches * (1 - mask_ratio))
        skipped = int(num_patches * (mask_ratio - pred_ratio))
        expected = (visible, skipped, num_patches - visible - skipped)
        assert split_counts(num_patches, mask_ratio, pred_ratio) == expected, (mask_ratio, pred_ratio)
        m = random_masking(torch.rand(1, num_patches), mask_ratio, pred_ratio)
        assert (m.num_visible, m.num_pred) == (expected[0], expected[2])


def test_released_rounding_predicts_41_of_196_at_p07_gamma02():
    assert split_counts(196, 0.7, 0.2) == (58, 97, 41)
    assert split_counts(64, 0.7, 0.2) == (19, 31, 14)


@pytest.mark.parametrize("mask_ratio,pred_ratio", [(0.75, 0.8), (1.0, 0.5), (0.75, 0.0), (0.99, 0.5)])
def test_invalid_ratios_are_rejected(mask_ratio, pred_ratio):
    with pytest.raises(ValueError):
        random_masking(torch.rand(2, 64), mask_ratio, pred_ratio)
