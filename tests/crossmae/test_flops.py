import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from crossmae import create_model, flops_per_image, model_config


@pytest.mark.parametrize("name,overrides", [
    ("crossmae_vit_micro_patch4_dec64d2b", {}),
    ("crossmae_vit_micro_patch4_dec64d2b", {"decoder_self_attn": True, "pred_ratio": 0.5}),
    ("crossmae_vit_micro_patch4_dec64d2b", {"fuse_features": False}),
    ("mae_vit_micro_patch4_dec64d2b", {}),
])
def test_analytical_flops_match_torch_flop_counter(name, overrides):
    model = create_model(name, **overrides).eval()
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into counted matmuls (the fused CPU kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(4, 3, 32, 32))
    measured = counter.get_total_flops() / 4
    analytical = flops_per_image(model.config)["total"]
    assert abs(analytical - measured) / measured < 0.01, (analytical, measured)


def test_vit_b_decoder_flops_against_the_paper():
    """Paper: CrossMAE gamma=0.25 decoder (depth 12) about 4.1 GFLOPs/image, MAE (depth 8) about 10.1."""
    cross = flops_per_image(model_config("crossmae_vit_base_patch16_dec512d12b"))["decoder"] / 1e9
    mae = flops_per_image(model_config("mae_vit_base_patch16_dec512d8b"))["decoder"] / 1e9
    assert cross == pytest.approx(4.1, rel=0.03)
    assert mae == pytest.approx(10.1, rel=0.08)
    assert cross / mae <= 0.41
    full = flops_per_image(model_config("crossmae_vit_base_patch16_dec512d12b"), query="masked")["decoder"]
    assert full > 2.5 * cross * 1e9
