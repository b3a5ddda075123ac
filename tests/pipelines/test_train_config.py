"""Config loading, derived quantities, the DeepSpeed JSON (checked by DeepSpeed's own parser),
parameter groups and the schedule."""

import pytest

from crossmae import create_model
from pipelines.runtime.config_loader import ConfigError, load
from pipelines.train.optim import lr_at, param_groups
from pipelines.train.config import PretrainConfig, deepspeed_config


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: crossmae_vit_micro_patch4_dec64d2b\noptim:\n  epochs: 10\n")
    cfg = load(PretrainConfig, str(path), ["optim.blr=1e-4", "deepspeed.zero_stage=3", "optim.betas=[0.9, 0.99]",
                                          "run.max_steps=5", "model.grad_checkpointing=true"])
    assert cfg.model.preset == "crossmae_vit_micro_patch4_dec64d2b" and cfg.optim.epochs == 10
    assert cfg.optim.blr == 1e-4 and cfg.deepspeed.zero_stage == 3 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.run.max_steps == 5 and cfg.model.grad_checkpointing is True


@pytest.mark.parametrize("override,message", [
    ("optim.bl=1e-4", "unknown config key optim.bl"),
    ("optimizer.blr=1", "unknown config key optimizer"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("optim.epochs=ten", "optim.epochs: expected int"),
    ("run.seed", "not key=value"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load(PretrainConfig, None, [override])


def test_learning_rate_scaling_follows_the_released_code():
    cfg = load(PretrainConfig, None, ["deepspeed.micro_batch=128"])  # 128 x 32 ranks = 4096
    assert cfg.effective_batch(32) == 4096
    assert cfg.learning_rate(32) == pytest.approx(1.5e-4 * 16 * 0.25 / 0.75)  # 8e-4
    mae = load(PretrainConfig, None, ["deepspeed.micro_batch=128", "model.preset=mae_vit_base_patch16_dec512d8b"])
    assert mae.learning_rate(32) == pytest.approx(2.4e-3)
    d = cfg.schedule(num_samples=1_281_167, world_size=32)
    assert d.steps_per_epoch == 312 and d.warmup_steps == 40 * 312 and d.total_steps == 800 * 312


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("on_gpu", [False, True])
def test_deepspeed_accepts_the_derived_config(stage, on_gpu):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load(PretrainConfig, None, [f"deepspeed.zero_stage={stage}", "deepspeed.micro_batch=8",
                                      "deepspeed.grad_accum=2", "optim.gradient_clipping=1.0"])
    assert deepspeed_config(cfg, world_size=4, on_gpu=on_gpu)["train_batch_size"] == 8 * 2 * 4
    # DeepSpeed's own parser (outside a distributed job it assumes one rank)
    ds = deepspeed_config(cfg, world_size=1, on_gpu=on_gpu)
    parsed = DeepSpeedConfig(ds)
    assert parsed.train_batch_size == 16 and parsed.gradient_accumulation_steps == 2
    assert parsed.zero_optimization_stage == stage and parsed.gradient_clipping == 1.0
    assert parsed.torch_autocast_enabled is on_gpu and parsed.bfloat16_config.enabled is False  # autocast mode
    weights = load(PretrainConfig, None, ["deepspeed.bf16_mode=weights"])
    assert DeepSpeedConfig(deepspeed_config(weights, 1, on_gpu)).bfloat16_config.enabled is on_gpu
    with pytest.raises(AssertionError):  # and it does check: a wrong batch product is refused
        DeepSpeedConfig(dict(ds, train_batch_size=63))


def test_weight_decay_skips_biases_and_norms_only():
    """The released rule (tests/pipelines/test_released_recipe.py checks it against timm's own):
    the cls and mask tokens are 3-D and decay, like every matrix."""
    model = create_model("crossmae_vit_micro_patch4_dec64d2b")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.cls_token" not in skipped and "decoder.mask_token" not in skipped
    assert "encoder.blocks.0.norm1.weight" in skipped and "encoder.blocks.0.attn.qkv.bias" in skipped
    assert "decoder.feature_fusion.weight" not in skipped  # a 2-D matrix: decayed
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())


def test_schedule_warms_up_linearly_then_half_cosine():
    assert lr_at(0, 1.0, 10, 110) == 0.0 and lr_at(5, 1.0, 10, 110) == 0.5
    assert lr_at(10, 1.0, 10, 110) == 1.0
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, 110, min_lr=0.1) == pytest.approx(0.1)
    values = [lr_at(s, 1.0, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("override,message", [
    ("deepspeed.micro_batch=0", "deepspeed.micro_batch must be >= 1, got 0"),
    ("deepspeed.micro_batch=-3", "deepspeed.micro_batch must be >= 1, got -3"),
    ("deepspeed.grad_accum=0", "deepspeed.grad_accum must be >= 1"),
    ("run.max_steps=0", "run.max_steps must be >= 1"),
    ("run.max_steps=-1", "run.max_steps must be >= 1"),
    ("optim.warmup_epochs=900", "optim.warmup_epochs must be in"),
    ("data.max_skipped_fraction=2", "data.max_skipped_fraction"),
    ("model.preset=nope", "model.preset: unknown model preset 'nope'"),
])
def test_values_that_would_crash_or_do_nothing_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load(PretrainConfig, None, [override]).validate()


def test_a_batch_larger_than_each_ranks_data_is_refused_naming_the_numbers():
    cfg = load(PretrainConfig, None, ["deepspeed.micro_batch=8"])
    assert cfg.steps_per_epoch(16, 2) == 1
    with pytest.raises(ConfigError, match="15 training samples over 2 rank.*7 samples.*micro_batch=8"):
        cfg.steps_per_epoch(15, 2)
    with pytest.raises(ConfigError, match="micro_batch=2000"):
        load(PretrainConfig, None, ["deepspeed.micro_batch=2000"]).schedule(1200, 1)


def test_the_schedule_is_kept_in_samples_across_world_sizes():
    """2 -> 1 ranks without grad_accum: steps per epoch double, but the lr at a given number of
    samples seen is the same curve (peak scaled with the batch, as blr scaling says)."""
    from pipelines.train.optim import lr_at

    cfg = load(PretrainConfig, None, ["deepspeed.micro_batch=8", "optim.lr=1e-3", "optim.epochs=10",
                                      "optim.warmup_epochs=2"])
    two, one = cfg.schedule(1200, 2), cfg.schedule(1200, 1)
    assert one.steps_per_epoch == 2 * two.steps_per_epoch
    assert one.total_samples == two.total_samples and one.warmup_samples == two.warmup_samples
    samples = 100 * two.effective_batch  # resumed after 100 steps on 2 ranks
    lr2 = lr_at(samples, two.lr, two.warmup_samples, two.total_samples)
    lr1 = lr_at(samples, one.lr, one.warmup_samples, one.total_samples)
    assert lr1 == pytest.approx(lr2)  # the old per-step schedule jumped here (0.00053 -> 0.00091 in the report)


def test_default_workers_fit_the_machine():
    from pipelines.train.config import default_num_workers

    import os
    cores = len(os.sched_getaffinity(0))
    assert default_num_workers(1) == max(1, min(16, cores - 1))
    assert default_num_workers(cores) == 1 and default_num_workers(64 * cores) == 1


def test_recompute_kv_reaches_the_decoder():
    from crossmae import MaskedAutoencoder

    cfg = load(PretrainConfig, None, ["model.preset=crossmae_vit_micro_patch4_dec64d2b", "data.image_size=32",
                                      "model.recompute_kv=true"])
    assert MaskedAutoencoder(cfg.model_config()).decoder.recompute_kv is True


def test_resume_lines_name_the_changes():
    from pipelines.checkpoints.run_checks import describe_schedule_change, resume_config_differences

    cfg = load(PretrainConfig, None, ["deepspeed.micro_batch=8"])
    derived = cfg.schedule(1200, 1)
    lines = describe_schedule_change(dict(effective_batch=16, world_size=2, lr=derived.lr * 2), derived, 160)
    assert lines[0] == "resume: effective batch 16 -> 8 (world size 2 -> 1)" and "peak lr" in lines[1]
    assert describe_schedule_change(dict(effective_batch=8), derived, 160) == []
    saved = {"model": dict(vars(cfg.model), preset="mae_vit_base_patch16_dec512d8b"), "data": vars(cfg.data)}
    assert resume_config_differences(cfg, saved) == [
        "model.preset: 'mae_vit_base_patch16_dec512d8b' -> 'crossmae_vit_base_patch16_dec512d12b'"]
    del saved["model"]["recompute_kv"]  # a run from before that key existed: not a difference
    saved["model"]["preset"] = cfg.model.preset
    assert resume_config_differences(cfg, saved) == []


def test_compile_under_torchdynamo_disable_is_said_not_silent(monkeypatch, capsys):
    """tests/conftest.py sets TORCHDYNAMO_DISABLE=1 (DeepSpeed's start loads TorchInductor otherwise);
    a run that asks for model.compile under it is told that torch.compile does nothing."""
    from pipelines.train.step import say_if_compile_is_a_no_op

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert say_if_compile_is_a_no_op()
    assert capsys.readouterr().err.count("TORCHDYNAMO_DISABLE is set") == 1
    for off in ("0", ""):
        monkeypatch.setenv("TORCHDYNAMO_DISABLE", off)
        assert not say_if_compile_is_a_no_op()
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    assert not say_if_compile_is_a_no_op() and capsys.readouterr().err == ""
