"""Pretraining configuration: typed sections, the paper's recipe as defaults, and every
derived quantity (effective batch, learning rate, steps) computed in one place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from crossmae import model_config


@dataclass
class ModelSection:
    preset: str = "crossmae_vit_base_patch16_dec512d12b"
    mask_ratio: float = 0.75  # p
    pred_ratio: float = 0.25  # the paper's gamma (CrossMAE); MAE predicts every masked patch
    norm_pix_loss: bool = True
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (GPUs)


@dataclass
class DataSection:
    train: str = ""  # manifest URL (crossmae-prep) or a brace pattern of WebDataset tars
    image_size: int = 224
    num_workers: int = 8
    block_size: int = 512
    shard_cache_dir: str | None = None
    shard_cache_bytes: int = 0
    resize: Literal["cpu", "device"] = "cpu"  # device: workers decode + crop, the GPU resizes (transforms.py)


@dataclass
class OptimSection:
    """The paper's recipe: AdamW (0.9, 0.95), wd 0.05 (not on biases / norms / 1-D / tokens),
    base lr 1.5e-4, lr = blr * effective_batch / 256 * (gamma / p) for CrossMAE (released code),
    linear warmup then half-cosine per iteration to min_lr."""

    blr: float = 1.5e-4
    lr: float | None = None  # absolute lr: overrides blr scaling when set
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    epochs: int = 800
    warmup_epochs: int = 40
    min_lr: float = 0.0
    gradient_clipping: float = 0.0  # the paper uses none; 0 = off


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    micro_batch: int = 64  # per rank per step
    grad_accum: int = 1


@dataclass
class RunSection:
    output: str = "runs/crossmae"  # local run directory (logs, local checkpoints)
    store: str | None = None  # checkpoints mirrored here (local path or s3://...); None = output
    seed: int = 0
    save_every: int = 1000  # steps
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step's checkpoint (0 = none)
    log_every: int = 20  # metrics.jsonl + TensorBoard every N steps
    recon_every: int = 500  # reconstruction grid PNG every N steps (0 = off)
    recon_images: int = 8  # rows of the grid (a fixed batch, the same every time)
    max_steps: int | None = None  # stop early (tests, demos)
    log_keys: bool = False  # write every rank's sample keys per step (tests: exact-resume proofs)
    async_upload: bool = True  # mirror checkpoints to the store in a background thread
    max_nonfinite: int = 5  # non-finite losses in a row before the run stops (each one is skipped)
    peak_tflops: float | None = None  # per device, for MFU; None = looked up from the GPU name
    tensorboard: bool = True


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    run: RunSection = field(default_factory=RunSection)

    def model_config(self):
        m = self.model
        overrides = dict(mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, img_size=self.data.image_size)
        if m.preset.startswith("crossmae"):
            overrides["pred_ratio"] = m.pred_ratio
        return model_config(m.preset, **overrides)

    def effective_batch(self, world_size: int) -> int:
        return self.deepspeed.micro_batch * self.deepspeed.grad_accum * world_size

    def learning_rate(self, world_size: int) -> float:
        """Peak lr. CrossMAE scales by gamma/p like the released code: 4096 x 1.5e-4 / 256 x
        0.25 / 0.75 = 8e-4 for ViT-B at batch 4096 (MAE: 2.4e-3)."""
        if self.optim.lr is not None:
            return self.optim.lr
        mc = self.model_config()
        ratio = mc.pred_ratio / mc.mask_ratio if mc.decoder == "cross" else 1.0
        return self.optim.blr * self.effective_batch(world_size) / 256 * ratio

    def steps_per_epoch(self, num_samples: int, world_size: int) -> int:
        """Optimizer steps per epoch: every rank yields floor(N / world / micro) micro-batches."""
        micro_per_rank = num_samples // world_size // self.deepspeed.micro_batch
        return max(1, micro_per_rank // self.deepspeed.grad_accum)

    def derived(self, num_samples: int, world_size: int) -> dict:
        spe = self.steps_per_epoch(num_samples, world_size)
        total = self.optim.epochs * spe
        return dict(world_size=world_size, effective_batch=self.effective_batch(world_size),
                    lr=self.learning_rate(world_size), steps_per_epoch=spe, total_steps=total,
                    warmup_steps=self.optim.warmup_epochs * spe,
                    max_steps=min(total, self.run.max_steps) if self.run.max_steps else total)


def resolve_precision(cfg: PretrainConfig, on_gpu: bool) -> str:
    """bf16 on GPUs; fp32 on CPUs: bf16 autocast backward ran 60x slower on this project's CPU
    (no AVX512-BF16; BENCHMARKS.md)."""
    p = cfg.deepspeed.precision
    return ("bf16" if on_gpu else "fp32") if p == "auto" else p


def deepspeed_config(cfg: PretrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed JSON, derived from the config (never kept by hand)."""
    ds = cfg.deepspeed
    out = dict(
        train_batch_size=cfg.effective_batch(world_size),
        train_micro_batch_size_per_gpu=ds.micro_batch,
        gradient_accumulation_steps=ds.grad_accum,
        gradient_clipping=cfg.optim.gradient_clipping,
        zero_optimization=dict(stage=ds.zero_stage),
        steps_per_print=10**9,  # the trainer logs its own metrics; DeepSpeed's print stays off
        wall_clock_breakdown=False,
    )
    if resolve_precision(cfg, on_gpu) == "bf16":
        out["bf16"] = dict(enabled=True)
    return out
