"""One pretraining step: the code ``crossmae-pretrain`` runs and ``benchmarks/gpu_throughput.py``
measures (the benchmark builds its engine and steps through these same functions).

A step is ``grad_accum`` micro-batches: batch -> device (uint8 / packed crops / packed JPEGs),
masking noise from a generator seeded by (seed, step, micro, rank) on the device, forward,
then ONE all-reduce of [loss, non-finite, stop-request] on the device and ONE host read of
it: the global loss for the logs, whether any rank's loss is non-finite (then every rank
skips that micro-batch: no backward, the next batch takes its place) and whether a rank was
signalled. That read is the step's only host-device synchronisation outside log steps
(grad_accum=1; one per micro-batch otherwise) — the skip must be decided before backward,
because a NaN forward leaves NaN gradients that ZeRO has already reduced into its buffers.

The step's gradient norm (the global L2 norm of the averaged gradients, before any clipping)
stays a device tensor; the metrics read it on log steps only.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from crossmae import MaskedAutoencoder

from pipelines.runtime import distributed
from pipelines.train.optim import build_optimizer
from pipelines.train.config import PretrainConfig, deepspeed_config, resolve_precision
from pipelines.data.prefetch import DevicePrefetcher
from pipelines.data.device_decode import batch_to_device


class NonFiniteLoss(RuntimeError):
    pass


def compile_enabled(cfg: PretrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.model.compile is None else cfg.model.compile


def say_if_compile_is_a_no_op() -> bool:
    """model.compile is on: say so on stderr when TORCHDYNAMO_DISABLE makes torch.compile a no-op
    (the tests set it; a user who set it for something else would otherwise run eagerly unknowing)."""
    if os.environ.get("TORCHDYNAMO_DISABLE", "") != "1":  # torch's own test (torch/_dynamo/eval_frame.py)
        return False
    print("crossmae-pretrain: warning: model.compile is on but TORCHDYNAMO_DISABLE is set: torch.compile is a "
          "no-op and the model runs eagerly", file=sys.stderr, flush=True)
    return True


def build_engine(cfg: PretrainConfig, world: int, device: torch.device, ds_patch: dict | None = None,
                 lr: float | None = None):
    """Model + torch AdamW (fused on CUDA) -> ``deepspeed.initialize`` with the config derived
    from ``cfg`` (plus ``ds_patch``, e.g. universal-checkpoint loading), compiled when enabled.
    Returns (engine, optimizer, input dtype)."""
    import deepspeed

    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(cfg.model_config())
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing()
    on_gpu = device.type == "cuda"
    ds_config = dict(deepspeed_config(cfg, world, on_gpu), **(ds_patch or {}))
    optimizer = build_optimizer(model.to(device), lr if lr is not None else cfg.learning_rate(world),
                                cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.decay_tokens)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if compile_enabled(cfg, device):
        say_if_compile_is_a_no_op()
        engine.compile()
    bf16_weights = resolve_precision(cfg, on_gpu) == "bf16" and cfg.deepspeed.bf16_mode == "weights"
    # autocast keeps fp32 inputs: the patch targets of the loss stay exact (bf16 keeps 8 bits)
    return engine, optimizer, torch.bfloat16 if bf16_weights else torch.float32


def masking_noise(seed: int, step: int, micro: int, rank: int, n: int, num_patches: int,
                  device: torch.device) -> torch.Tensor:
    """Uniform noise for ``random_masking``, drawn on ``device`` (no host->device copy) from a
    generator seeded by (seed, step, micro-batch attempt, rank): a resumed run masks exactly
    as an uninterrupted one on the same device type."""
    # mod 2**64: torch takes a uint64 seed and refused the product past it ("Overflow when unpacking
    # long long" at the first step from run.seed = 278,960 on); smaller products are unchanged
    key = (((seed * 1_000_003 + step) * 1009 + micro) * 65537 + rank) % 2**64
    g = torch.Generator(device=device).manual_seed(key)
    return torch.rand(n, num_patches, generator=g, device=device)


def injected_faults() -> dict[int, int]:
    """Test-only fault injection: CROSSMAE_FAULT_NONFINITE="7:1,9:10" makes rank 0's loss NaN on
    the first 1 (10) attempts of step 7 (9); CROSSMAE_FAULT_RAISE=5 raises at step 5 (after
    the loader workers started). Unset in real runs."""
    out = {}
    for item in filter(None, os.environ.get("CROSSMAE_FAULT_NONFINITE", "").split(",")):
        step, _, count = item.partition(":")
        out[int(step)] = int(count or 1)
    return out


@dataclass
class StepResult:
    loss: float  # global mean loss of the micro-batches that counted
    data_wait: float  # seconds spent waiting for batches
    skipped: int = 0  # micro-batches skipped for a non-finite loss (on any rank)
    stop: bool = False  # some rank was asked to stop (SIGTERM / SIGUSR1)
    keys: list = field(default_factory=list)  # per micro-batch sample keys (for exact-resume proofs)
    grad_norm: torch.Tensor | float | None = None  # this step's global gradient norm (a device tensor: read lazily)


def device_batches(batches, image_size: int, device: torch.device, dtype: torch.dtype, state_source=None):
    """(batch, images on the device) pairs, prepared one batch ahead on a side stream on GPUs
    (JPEG decode / resize of batch i+1 overlaps step i); ``.state_dict()`` is the loader's
    state after the last pair handed out (what a checkpoint must hold)."""
    return DevicePrefetcher(batches, lambda b: (b, batch_to_device(b, image_size, device, dtype)), device,
                            state_source=state_source)


class TrainStep:
    """``step(step, batches, stop_requested)`` runs one optimizer step on ``engine``;
    ``batches`` yields (batch, images on the device) pairs (:func:`device_batches`)."""

    def __init__(self, engine, cfg: PretrainConfig, device: torch.device, rank: int, world: int, on_skip=None):
        self.engine, self.cfg, self.device = engine, cfg, device
        self.rank, self.world = rank, world
        self.num_patches = engine.module.config.num_patches
        self.faults = injected_faults()
        self.raise_at = int(os.environ.get("CROSSMAE_FAULT_RAISE", "-1"))
        self.on_skip = on_skip or (lambda step, ranks, in_row, total: None)
        self.skipped_total = self.bad_in_row = 0
        # DeepSpeed's ZeRO 1-3 and bf16-weights optimizers compute the global grad norm while
        # stepping (ZeRO-2/3 hold only a partition of the gradients, so only they can);
        # with the plain torch optimizer of ZeRO-0 get_global_grad_norm() stays None, so the
        # norm is taken here from the gradients DeepSpeed all-reduced in the boundary backward.
        self.own_grad_norm = not hasattr(engine.optimizer, "_global_grad_norm")
        self.params = [p for p in engine.module.parameters() if p.requires_grad]

    def __call__(self, step: int, batches, stop_requested: bool = False) -> StepResult:
        cfg, engine = self.cfg, self.engine
        if step == self.raise_at:
            raise RuntimeError(f"injected failure at step {step} (CROSSMAE_FAULT_RAISE)")
        result, losses = StepResult(loss=float("nan"), data_wait=0.0), []
        micro = attempt = 0
        while micro < cfg.deepspeed.grad_accum:
            t0 = time.perf_counter()
            batch, imgs = next(batches)
            result.data_wait += time.perf_counter() - t0
            noise = masking_noise(cfg.run.seed, step, micro + 1000 * attempt, self.rank, imgs.shape[0],
                                  self.num_patches, self.device)
            loss = engine(imgs, noise).loss
            if self.rank == 0 and self.faults.get(step, 0) > attempt:
                loss = loss * float("nan")
            finite = torch.isfinite(loss.detach())
            flags = torch.stack([torch.where(finite, loss.detach().float(), 0.0), (~finite).float(),
                                 torch.full((), float(stop_requested), device=loss.device)])
            total, nonfinite, stop = distributed.all_reduce(flags).tolist()  # the one host read
            result.stop = result.stop or stop > 0
            if nonfinite > 0:
                self.skipped_total += 1
                self.bad_in_row += 1
                result.skipped += 1
                attempt += 1
                self.on_skip(step, int(nonfinite), self.bad_in_row, self.skipped_total)
                if self.bad_in_row >= cfg.run.max_nonfinite:
                    raise NonFiniteLoss(f"{self.bad_in_row} non-finite losses in a row at step {step} "
                                        f"(run.max_nonfinite={cfg.run.max_nonfinite})")
                continue
            self.bad_in_row = 0
            engine.backward(loss)
            if self.own_grad_norm and engine.is_gradient_accumulation_boundary():
                # one foreach norm over the gradients, no host read (ViT-B: ~0.35 GB of fp32 grads)
                result.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            engine.step()
            losses.append(total / self.world)
            result.keys.append(batch.get("key"))
            micro += 1
        result.loss = sum(losses) / len(losses)
        if not self.own_grad_norm:
            result.grad_norm = engine.get_global_grad_norm()
        return result
