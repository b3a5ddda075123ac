"""The optimizer and schedule against the released code's own rules (TonyLianLong/CrossMAE
main_pretrain.py, facebookresearch/mae main_pretrain.py and util/lr_sched.py, timm's
param_groups_weight_decay as they call it), each re-implemented here from its definition."""
import math

import pytest
import timm.optim
import torch

from crossmae import create_model
from pipelines.runtime.config_loader import load
from pipelines.train.optim import build_optimizer, lr_at, param_groups
from pipelines.train.config import PretrainConfig

CROSS, MAE = "crossmae_vit_micro_patch4_dec64d2b", "mae_vit_micro_patch4_dec64d2b"


def released_groups(model) -> tuple[set, set]:
    """MAE's timm 0.3.2 add_weight_decay(model, wd) / CrossMAE's timm 0.9.7
    param_groups_weight_decay(model, wd), both called without a skip list: frozen params are
    left out; 1-D params and names ending in .bias get no decay; everything else decays."""
    decay, no_decay = set(), set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).add(name)
    return decay, no_decay


def groups_by_decay(model, groups) -> dict[float, set]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[float, set] = {}
    for g in groups:
        out.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
    return out


@pytest.mark.parametrize("preset,overrides", [(CROSS, {}), (CROSS, dict(decoder_self_attn=True)),
                                              (CROSS, dict(fuse_features=False)), (MAE, {})])
def test_weight_decay_groups_are_the_released_ones(preset, overrides):
    """The cls and mask tokens (1, 1, D) and the fusion weight decay; biases and norms do not; the
    frozen sin-cos tables are in no group."""
    model = create_model(preset, **overrides)
    ours = groups_by_decay(model, param_groups(model, 0.05))
    decay, no_decay = released_groups(model)
    assert ours == {0.05: decay, 0.0: no_decay}
    assert ours == groups_by_decay(model, timm.optim.param_groups_weight_decay(model, 0.05))  # what CrossMAE calls
    assert {"encoder.cls_token", "decoder.mask_token"} <= ours[0.05]
    assert ("decoder.feature_fusion.weight" in ours[0.05]) == (preset == CROSS and overrides.get("fuse_features", True))
    assert "encoder.blocks.0.norm1.weight" in ours[0.0] and "encoder.patch_embed.proj.bias" in ours[0.0]
    everything = ours[0.05] | ours[0.0]
    assert "encoder.pos_embed" not in everything and "decoder.decoder_pos_embed" not in everything


def test_optimizer_is_adamw_with_the_released_betas_eps_and_decay():
    cfg = load(PretrainConfig, None, [f"model.preset={CROSS}", "data.image_size=32"])
    model = create_model(CROSS)
    opt = build_optimizer(model, 1e-3, cfg.optim.weight_decay, cfg.optim.betas)
    assert type(opt) is torch.optim.AdamW
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 1e-3 and not g["amsgrad"]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    assert (cfg.optim.blr, cfg.optim.min_lr, cfg.optim.gradient_clipping) == (1.5e-4, 0.0, 0.0)
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs) == (800, 40)


def released_lr(blr, batch_size, accum_iter, world, mask_ratio, kept_mask_ratio, cross: bool) -> float:
    """CrossMAE main_pretrain (no --inverse_lr / --no_lr_scale, as its README runs it):
    lr = (kmr / mr) * blr * eff / 256. MAE's main_pretrain: lr = blr * eff / 256."""
    eff = batch_size * accum_iter * world
    return (kept_mask_ratio / mask_ratio if cross else 1.0) * blr * eff / 256


@pytest.mark.parametrize("preset", ["crossmae_vit_base_patch16_dec512d12b", "mae_vit_base_patch16_dec512d8b"])
def test_peak_lr_is_the_released_scaling(preset):
    cross = preset.startswith("crossmae")
    for micro, accum, world in ((64, 1, 1), (1024, 1, 4), (128, 2, 16), (256, 4, 4), (8, 3, 7)):
        for mask_ratio, pred_ratio in ((0.75, 0.25), (0.75, 0.75), (0.75, 0.15), (0.9, 0.3), (0.6, 0.5)):
            overrides = [f"model.preset={preset}", f"deepspeed.micro_batch={micro}", f"deepspeed.grad_accum={accum}",
                         f"model.mask_ratio={mask_ratio}", f"model.pred_ratio={pred_ratio}"]
            cfg = load(PretrainConfig, None, overrides)
            expected = released_lr(1.5e-4, micro, accum, world, mask_ratio, pred_ratio, cross)
            assert cfg.learning_rate(world) == pytest.approx(expected, rel=1e-12), (micro, accum, world, mask_ratio)
    # the README's command: 4 GPUs x 1024, gamma 0.25 / p 0.75 -> 8e-4 (MAE: 2.4e-3)
    cfg = load(PretrainConfig, None, [f"model.preset={preset}", "deepspeed.micro_batch=1024"])
    assert cfg.learning_rate(4) == pytest.approx(8e-4 if cross else 2.4e-3)


def mae_adjust_learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: int, epochs: int) -> float:
    """util/lr_sched.adjust_learning_rate, called every iteration with a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


@pytest.mark.parametrize("overrides", [
    ["optim.epochs=10", "optim.warmup_epochs=2"],
    ["optim.epochs=7", "optim.warmup_epochs=0", "optim.lr=1e-3", "optim.min_lr=1e-5"],
    ["optim.epochs=5", "optim.warmup_epochs=4", "deepspeed.grad_accum=3", "optim.min_lr=1e-7"],
])
@pytest.mark.parametrize("world", [1, 3])
def test_schedule_is_maes_per_iteration_lr_sched(overrides, world):
    """The trainer sets lr_at(samples seen, ...) before each step (pipelines/pretrain.py); MAE's
    engine sets adjust_learning_rate(data_iter_step / len(data_loader) + epoch) before it: the
    same value at every iteration of the run, warm-up, cosine and min_lr included."""
    cfg = load(PretrainConfig, None, ["deepspeed.micro_batch=8", *overrides])
    num_samples = 1000
    d = cfg.schedule(num_samples, world)
    accum = cfg.deepspeed.grad_accum
    micro_per_epoch = d.steps_per_epoch * accum  # MAE's len(data_loader) with drop_last
    for step in range(d.total_steps):
        data_iter_step = step * accum  # MAE adjusts at data_iter_step % accum_iter == 0
        epoch = data_iter_step // micro_per_epoch + (data_iter_step % micro_per_epoch) / micro_per_epoch
        expected = mae_adjust_learning_rate(epoch, d.lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.optim.epochs)
        ours = lr_at(step * d.effective_batch, d.lr, d.warmup_samples, d.total_samples, cfg.optim.min_lr)
        assert ours == pytest.approx(expected, rel=1e-9, abs=1e-15), step
