"""Pretraining configuration: typed sections, the paper's recipe as defaults, and every
derived quantity (effective batch, learning rate, steps) computed in one place."""
from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from crossmae import model_config

from pipelines.runtime import watchdog
from pipelines.train.optim import lr_at


@dataclass
class ModelSection:
    preset: str = "crossmae_vit_base_patch16_dec512d12b"
    mask_ratio: float = 0.75  # p
    pred_ratio: float = 0.25  # the paper's gamma (CrossMAE); MAE predicts every masked patch
    norm_pix_loss: bool = True
    grad_checkpointing: bool = False
    recompute_kv: bool = False  # CrossMAE: fusion + K/V recomputed in backward (ViT-B bf16 b256 est. 7.8 -> 7.1 GiB)
    compile: bool | None = None  # torch.compile the model; None: on for CUDA (47.7 vs 70.0 ms/step, H200), off on CPU


@dataclass
class DataSection:
    train: str = ""  # manifest URL (crossmae-prep) or a brace pattern of WebDataset tars
    image_size: int = 224
    num_workers: int | None = None  # loader processes per rank; None: the cores this rank can have, minus one, 1..16
    block_size: int = 512  # access=stream: samples shuffled together (a worker holds ~2 blocks)
    # random: each sample read at its byte span from local shards or the node's shard cache (which must then hold
    # every remote shard); each epoch is one random permutation (block_size unused). BENCHMARKS.md: shuffle quality
    access: Literal["stream", "random"] = "stream"
    shard_cache_dir: str | None = None
    shard_cache_bytes: int = 0
    resize: Literal["cpu", "device"] = "cpu"  # device: workers decode + crop, the GPU resizes (transforms.py)
    decode: Literal["cpu", "gpu"] = "cpu"  # gpu: workers only sample crop boxes, the device decodes the JPEGs
    max_skipped_fraction: float = 0.01  # damaged / undecodable samples (replaced in their batch) before the run stops


@dataclass
class OptimSection:
    """The paper's recipe: AdamW (0.9, 0.95), wd 0.05 (not on biases / norms / 1-D params; the
    cls and mask tokens decay, as in the released code), base lr 1.5e-4,
    lr = blr * effective_batch / 256 * (gamma / p) for CrossMAE (released code),
    linear warmup then half-cosine per iteration to min_lr."""

    blr: float = 1.5e-4
    lr: float | None = None  # absolute lr: overrides blr scaling when set
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    epochs: int = 800
    warmup_epochs: int = 40
    min_lr: float = 0.0
    gradient_clipping: float = 0.0  # the paper uses none; 0 = off
    # The released rule: the cls and mask tokens decay. A resumed run whose config.yaml lacks this
    # key began with this project's earlier rule (tokens exempt) and keeps it (pipelines/pretrain.py).
    decay_tokens: bool = True


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 0  # 0: plain data parallel; ZeRO 1-3 shard states for models that need it
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    # bf16 as DeepSpeed's torch_autocast (fp32 weights + torch's fused AdamW, bf16 compute and
    # gradient communication) or as DeepSpeed's bf16 section (bf16 weights, fp32 master copy in
    # DeepSpeed's optimizer wrapper, which loops over every parameter in Python each step).
    bf16_mode: Literal["autocast", "weights"] = "autocast"
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
    upload_wait_s: float = 120.0  # a save waits at most this long for the previous checkpoint's upload
    close_wait_s: float = 900.0  # the end of a run waits this long for the last uploads (ViT-L ~4 GB: ~40 s at 100 MB/s)
    # run.output / run.store lock (pipelines/storage/run_lock.py): refreshed every lease / 6 (30 s); a lock whose
    # holder ran on another host is taken over once its heartbeat is this old, so a requeued job waits <= 3 min
    lock_lease_s: float = 180.0
    # The process group's timeout: the longest one rank may wait in a collective for another. It must
    # outlast every legitimate one-sided wait: the end-of-run barrier while each node's uploader gives the
    # last checkpoint up to close_wait_s (900 s), a save's upload_wait_s (120 s) + writing ViT-L (~4 GB),
    # S3 reads retrying for 120 s, the first torch.compile on a GPU (minutes). 30 min = 2x close_wait_s;
    # DeepSpeed's default (10 min) is shorter than close_wait_s. A frozen peer is named far sooner below.
    collective_timeout_s: float = watchdog.COLLECTIVE_TIMEOUT_S
    # A peer whose heartbeat (a thread of its own, so long compiles and saves do not stall it;
    # pipelines/runtime/watchdog.py) stood still this long is named and the job ends; 0 = off. 90 s + a 5 s check
    # interval names a SIGSTOPped rank within ~100 s; raising it only delays that line.
    heartbeat_timeout_s: float = watchdog.HEARTBEAT_TIMEOUT_S


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self, world_size: int | None = None) -> None:
        """Refuse values that would crash later, silently do nothing or make no sense: one line
        naming the key. ``world_size`` (default: the launcher's WORLD_SIZE, 1 for a plain process)
        fixes the blr-derived peak lr that ``optim.min_lr`` must not exceed; ``schedule()`` checks
        that again with the running job's world size."""
        from pipelines.runtime.config_loader import ConfigError

        problem = next(self._problems(world_size), None)
        if problem:
            raise ConfigError(problem)

    def _problems(self, world_size: int | None):
        """The config's problems, most basic first (the first one is reported)."""
        from pipelines.runtime.config_loader import non_finite_values

        yield from non_finite_values(self)
        m, d, o, ds, r = self.model, self.data, self.optim, self.deepspeed, self.run
        betas_ok = len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas)
        checks = [
            (0.0 <= m.mask_ratio < 1.0, f"model.mask_ratio must be in [0, 1), got {m.mask_ratio}"),
            (not m.preset.startswith("crossmae") or 0.0 < m.pred_ratio <= m.mask_ratio + 1e-9,
             f"model.pred_ratio (the paper's gamma, a share of all patches) must be in (0, model.mask_ratio="
             f"{m.mask_ratio}], got {m.pred_ratio}"),
            (d.image_size >= 1, f"data.image_size must be >= 1, got {d.image_size}"),
            (d.num_workers is None or d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}"),
            (d.block_size >= 1, f"data.block_size must be >= 1, got {d.block_size}"),
            (d.shard_cache_bytes >= 0, f"data.shard_cache_bytes must be >= 0, got {d.shard_cache_bytes}"),
            (0.0 <= d.max_skipped_fraction <= 1.0,
             f"data.max_skipped_fraction must be in [0, 1], got {d.max_skipped_fraction}"),
            (o.blr > 0, f"optim.blr must be > 0, got {o.blr}"),
            (o.lr is None or o.lr > 0, f"optim.lr must be > 0 (or unset: blr scaling), got {o.lr}"),
            (betas_ok, f"optim.betas must be two values in [0, 1) (Adam's moment decays), got {list(o.betas)}"),
            (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
            (o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}"),
            (o.gradient_clipping >= 0, f"optim.gradient_clipping must be >= 0 (0 = off), got {o.gradient_clipping}"),
            (o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}"),
            (0 <= o.warmup_epochs < o.epochs,
             f"optim.warmup_epochs must be in [0, optim.epochs={o.epochs}): a warm-up as long as the run never "
             f"reaches the cosine; got {o.warmup_epochs}"),
            (ds.micro_batch >= 1, f"deepspeed.micro_batch must be >= 1, got {ds.micro_batch}"),
            (ds.grad_accum >= 1, f"deepspeed.grad_accum must be >= 1, got {ds.grad_accum}"),
            (0 <= r.seed < 2**32, f"run.seed must be in [0, 2**32) (the data order uses 32 bits of it), got {r.seed}"),
            (r.max_steps is None or r.max_steps >= 1,
             f"run.max_steps must be >= 1 (or unset for the whole schedule), got {r.max_steps}"),
            (r.save_every >= 1, f"run.save_every must be >= 1, got {r.save_every}"),
            (r.keep_last >= 1, f"run.keep_last must be >= 1, got {r.keep_last}"),
            (r.keep_every >= 0, f"run.keep_every must be >= 0 (0 = none), got {r.keep_every}"),
            (r.log_every >= 1, f"run.log_every must be >= 1, got {r.log_every}"),
            (r.recon_every >= 0, f"run.recon_every must be >= 0 (0 = off), got {r.recon_every}"),
            (r.recon_images >= 1, f"run.recon_images must be >= 1, got {r.recon_images}"),
            (r.max_nonfinite >= 1, f"run.max_nonfinite must be >= 1, got {r.max_nonfinite}"),
            (r.peak_tflops is None or r.peak_tflops > 0,
             f"run.peak_tflops must be > 0 (or unset: looked up from the GPU name), got {r.peak_tflops}"),
            (r.upload_wait_s >= 0, f"run.upload_wait_s must be >= 0, got {r.upload_wait_s}"),
            (r.close_wait_s >= 0, f"run.close_wait_s must be >= 0, got {r.close_wait_s}"),
            (r.lock_lease_s > 0, f"run.lock_lease_s must be > 0, got {r.lock_lease_s}"),
            (r.collective_timeout_s > 0, f"run.collective_timeout_s must be > 0, got {r.collective_timeout_s}"),
            (r.heartbeat_timeout_s >= 0, f"run.heartbeat_timeout_s must be >= 0 (0 = off), got {r.heartbeat_timeout_s}"),
            (r.collective_timeout_s > max(r.close_wait_s, r.upload_wait_s),
             f"run.collective_timeout_s={r.collective_timeout_s} must exceed run.close_wait_s={r.close_wait_s} and "
             f"run.upload_wait_s={r.upload_wait_s}: the last barrier waits while the uploads finish"),
        ]
        yield from (message for ok, message in checks if not ok)
        try:
            patch = model_config(m.preset).patch_size
        except ValueError as e:
            yield f"model.preset: {e}"
            return
        if d.image_size % patch:
            yield f"data.image_size={d.image_size} is not a multiple of the patch size {patch} of {m.preset}"
        try:
            self.model_config()
        except (KeyError, ValueError) as e:
            yield f"model: {e}"
            return
        if world_size is None:
            try:
                world_size = max(1, int(os.environ.get("WORLD_SIZE", "1")))
            except ValueError:
                world_size = 1
        problem = self.min_lr_problem(world_size)
        if problem:
            yield problem

    def min_lr_problem(self, world_size: int) -> str | None:
        """optim.min_lr above the peak lr makes the half-cosine climb from the peak toward it."""
        o = self.optim
        peak = self.learning_rate(world_size)
        if o.min_lr <= peak:
            return None
        if o.lr is not None:
            source = f"optim.lr={o.lr:g}"
        else:
            mc = self.model_config()
            ratio = f" x pred_ratio/mask_ratio {mc.pred_ratio:g}/{mc.mask_ratio:g}" if mc.decoder == "cross" else ""
            source = (f"{peak:.3g} = optim.blr={o.blr:g} x effective batch {self.effective_batch(world_size)} / 256"
                      f"{ratio} at world size {world_size}")
        return f"optim.min_lr={o.min_lr:g} is above the peak lr {source}: the cosine would climb toward it"

    def model_config(self):
        m = self.model
        overrides = dict(mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, img_size=self.data.image_size)
        if m.recompute_kv:
            overrides["recompute_kv"] = True
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
        """Optimizer steps per epoch: every rank yields floor(N / world / micro) micro-batches.
        Raises when that is 0: the run would spin through empty epochs forever."""
        micro_per_rank = num_samples // world_size // self.deepspeed.micro_batch
        spe = micro_per_rank // self.deepspeed.grad_accum
        if spe < 1:
            from pipelines.runtime.config_loader import ConfigError

            raise ConfigError(
                f"{num_samples} training samples over {world_size} rank(s) give each rank {num_samples // world_size} "
                f"samples: fewer than one step of deepspeed.micro_batch={self.deepspeed.micro_batch} x "
                f"deepspeed.grad_accum={self.deepspeed.grad_accum}; lower the batch or use fewer ranks")
        return spe

    def schedule(self, num_samples: int, world_size: int) -> Schedule:
        """The schedule is kept in SAMPLES (warmup and total), so a resume on another world size
        or batch continues the same lr curve; steps are derived from it for this world size."""
        spe = self.steps_per_epoch(num_samples, world_size)
        problem = self.min_lr_problem(world_size)
        if problem:
            from pipelines.runtime.config_loader import ConfigError

            raise ConfigError(problem)
        eff = self.effective_batch(world_size)
        total = self.optim.epochs * spe
        return Schedule(world_size=world_size, effective_batch=eff, lr=self.learning_rate(world_size),
                        steps_per_epoch=spe, total_steps=total, warmup_steps=self.optim.warmup_epochs * spe,
                        samples_per_epoch=spe * eff, total_samples=total * eff,
                        warmup_samples=self.optim.warmup_epochs * spe * eff, min_lr=self.optim.min_lr,
                        max_steps=min(total, self.run.max_steps) if self.run.max_steps else total)


@dataclass
class Schedule:
    """One run's schedule on this world size: the lr curve in samples (what a resume on another
    world size continues), and the steps derived from it. Written into deepspeed.json as
    ``derived``."""
    world_size: int
    effective_batch: int
    lr: float  # peak: optim.blr x effective batch / 256 (or optim.lr)
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    samples_per_epoch: int
    total_samples: int
    warmup_samples: int
    max_steps: int  # where this run stops (run.max_steps caps it)
    min_lr: float = 0.0

    def lr_at(self, samples: int) -> float:
        """The lr after ``samples`` samples: linear warm-up, then half-cosine to min_lr (MAE's lr_sched)."""
        return lr_at(samples, self.lr, self.warmup_samples, self.total_samples, self.min_lr)

    def resumed(self, step: int, samples: int, max_steps_cap: int = 0) -> Schedule:
        """The same curve from a checkpoint at (step, samples): the run ends when the samples end
        (or at ``max_steps_cap``), however the batch changed."""
        end = step + -(-(self.total_samples - samples) // self.effective_batch)
        return dataclasses.replace(self, max_steps=min(end, max_steps_cap) if max_steps_cap else end)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        if ds.bf16_mode == "autocast":
            out["torch_autocast"] = dict(enabled=True, dtype="bfloat16")
        else:
            out["bf16"] = dict(enabled=True)
    return out


def default_num_workers(local_world_size: int) -> int:
    """Loader processes per rank: this rank's share of the cores it may use, one left for the
    trainer itself, at least 1 and at most 16 (a 2-core CPU machine with 2 ranks gets 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(1, min(16, cores // max(1, local_world_size) - 1))
