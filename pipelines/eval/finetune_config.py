"""The config of ``crossmae-eval finetune`` (pipelines/finetune.py): MAE's fine-tuning recipe as
defaults, one section per component, every value checked by ``FinetuneConfig.validate``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.runtime import config_loader
from pipelines.train.config import DeepSpeedSection


@dataclass
class FtModelSection:
    drop_path: float = 0.1
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fc_norm (CrossMAE, MAE)
    head_init_std: float = 2e-5  # MAE: trunc_normal_(head.weight, std=2e-5)


@dataclass
class FtDataSection:
    train: str = ""  # manifest URLs (crossmae-prep); the image size is the export's
    val: str = ""
    num_workers: int = 8
    block_size: int = 512
    shard_cache_dir: str | None = None
    shard_cache_bytes: int = 0


@dataclass
class FtOptimSection:
    """MAE's ViT-B fine-tuning: AdamW (0.9, 0.999), wd 0.05, blr 5e-4, lr = blr * batch / 256
    (1024 -> 2e-3), layer decay 0.65 (0.75 for L/H), 100 epochs with 5 warmup, min lr 1e-6."""

    blr: float = 5e-4
    lr: float | None = None  # absolute peak lr: overrides blr scaling
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    epochs: int = 100
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    gradient_clipping: float = 0.0  # MAE fine-tuning: none


@dataclass
class AugmentSection:
    crop_scale: tuple[float, float] = (0.08, 1.0)  # timm's RandomResizedCrop for fine-tuning (bicubic, + flip)
    randaug: str = "rand-m9-mstd0.5-inc1"  # timm policy string; "" = off
    reprob: float = 0.25  # random erasing (pixel mode, one box)
    mixup: float = 0.8  # alphas; both 0 = off
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    smoothing: float = 0.1


@dataclass
class FtRunSection:
    output: str = "runs/finetune"
    seed: int = 0
    log_every: int = 20  # steps
    eval_every: int = 1  # epochs (the last epoch is always evaluated)
    save_every: int = 1  # epochs; 0 = no checkpoints (only the newest is kept)
    max_epochs: int | None = None  # stop early (tests); the schedule still spans optim.epochs


@dataclass
class FinetuneConfig:
    model: FtModelSection = field(default_factory=FtModelSection)
    data: FtDataSection = field(default_factory=FtDataSection)
    optim: FtOptimSection = field(default_factory=FtOptimSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    deepspeed: DeepSpeedSection = field(default_factory=lambda: DeepSpeedSection(micro_batch=128))  # x 8 GPUs = 1024
    run: FtRunSection = field(default_factory=FtRunSection)

    def effective_batch(self, world_size: int) -> int:
        return self.deepspeed.micro_batch * self.deepspeed.grad_accum * world_size

    def learning_rate(self, world_size: int) -> float:
        return self.optim.lr if self.optim.lr is not None else self.optim.blr * self.effective_batch(world_size) / 256

    def validate(self) -> None:
        """Refuse values that would crash later, silently do nothing or make no sense: one line
        naming the key (the first problem found)."""
        problem = next(self._problems(), None)
        if problem:
            raise config_loader.ConfigError(problem)

    def _problems(self):
        m, d, o, a, ds, r = self.model, self.data, self.optim, self.augment, self.deepspeed, self.run
        if not d.train or not d.val:
            yield "data.train and data.val must be set (manifest URLs)"
        yield from config_loader.non_finite_values(self)
        scale = tuple(a.crop_scale)
        checks = [
            (0 <= m.drop_path < 1, f"model.drop_path must be in [0, 1), got {m.drop_path}"),
            (m.head_init_std > 0, f"model.head_init_std must be > 0, got {m.head_init_std}"),
            (d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}"),
            (d.block_size >= 1, f"data.block_size must be >= 1, got {d.block_size}"),
            (d.shard_cache_bytes >= 0, f"data.shard_cache_bytes must be >= 0, got {d.shard_cache_bytes}"),
            (o.blr > 0, f"optim.blr must be > 0, got {o.blr}"),
            (o.lr is None or o.lr > 0, f"optim.lr must be > 0 (or unset: blr scaling), got {o.lr}"),
            (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas must be two values in [0, 1) (Adam's moment decays), got {list(o.betas)}"),
            (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
            (0 < o.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {o.layer_decay}"),
            (o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}"),
            (0 <= o.warmup_epochs < o.epochs,
             f"optim.warmup_epochs must be in [0, optim.epochs={o.epochs}): a warm-up as long as the run never "
             f"reaches the cosine; got {o.warmup_epochs}"),
            (o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}"),
            (o.gradient_clipping >= 0, f"optim.gradient_clipping must be >= 0 (0 = off), got {o.gradient_clipping}"),
            (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
             f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(scale)}"),
            (0 <= a.reprob <= 1, f"augment.reprob must be in [0, 1], got {a.reprob}"),
            (a.mixup >= 0 and a.cutmix >= 0, f"augment.mixup and augment.cutmix must be >= 0 (0 = off), got "
                                             f"{a.mixup}, {a.cutmix}"),
            (0 <= a.mixup_prob <= 1, f"augment.mixup_prob must be in [0, 1], got {a.mixup_prob}"),
            (0 <= a.mixup_switch_prob <= 1, f"augment.mixup_switch_prob must be in [0, 1], got {a.mixup_switch_prob}"),
            (0 <= a.smoothing < 1, f"augment.smoothing must be in [0, 1), got {a.smoothing}"),
            (ds.micro_batch >= 1, f"deepspeed.micro_batch must be >= 1, got {ds.micro_batch}"),
            (ds.grad_accum >= 1, f"deepspeed.grad_accum must be >= 1, got {ds.grad_accum}"),
            (not (a.mixup > 0 or a.cutmix > 0) or ds.micro_batch % 2 == 0,
             "mixup/cutmix need an even deepspeed.micro_batch"),
            (0 <= r.seed < 2**32, f"run.seed must be in [0, 2**32), got {r.seed}"),
            (r.log_every >= 1, f"run.log_every must be >= 1, got {r.log_every}"),
            (r.eval_every >= 1, f"run.eval_every must be >= 1, got {r.eval_every}"),
            (r.save_every >= 0, f"run.save_every must be >= 0 (0 = no checkpoints), got {r.save_every}"),
            (r.max_epochs is None or r.max_epochs >= 1, f"run.max_epochs must be >= 1 (or unset), got {r.max_epochs}"),
        ]
        yield from (message for ok, message in checks if not ok)
        if a.randaug:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(a.randaug, dict(translate_const=14, img_mean=(124, 116, 104)))
            except (AssertionError, ValueError, KeyError):  # timm asserts on unknown sections
                yield f"augment.randaug {a.randaug!r} is not a timm RandAugment policy (e.g. rand-m9-mstd0.5-inc1)"
