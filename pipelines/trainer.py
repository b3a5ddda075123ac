"""The pretraining run as one object, in torchtitan's shape: `Trainer` holds the engine, the loader,
the checkpointer, the metrics, the schedule and the step counters; `train()` is the loop.

Built in this order (`Trainer.__init__`): the loader (its sample count sizes the schedule), the
checkpointer and the tag to resume from, the checks that the tag is this run's model, data and run
id, the DeepSpeed engine, the checkpoint's state (loader position, step, samples seen), then
(rank 0) the run's files. Each component reads its own config section: the loader `cfg.data`, the
checkpointer `cfg.run`, the schedule `cfg.optim` via `PretrainConfig.schedule`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
import yaml

from crossmae.flops import flops_per_image

from pipelines import storage
from pipelines.checkpoints.checkpointer import Checkpointer
from pipelines.checkpoints.run_checks import (check_checkpoint_run, check_resume_config, describe_schedule_change,
                                              run_identity, short_run_warning, writing_checkpoint)
from pipelines.data.factory import LoaderConfig, build_loader
from pipelines.data.transforms import normalize_batch
from pipelines.runtime import config_loader, distributed
from pipelines.runtime.versions import code_version
from pipelines.train.config import PretrainConfig, default_num_workers, deepspeed_config, resolve_precision
from pipelines.train.metrics import Observer, RunMetrics, process_start_time
from pipelines.train.optim import set_lr
from pipelines.train.step import TrainStep, build_engine, device_batches


class StopRequest:
    """SIGTERM / SIGUSR1 (preemption, Slurm's --signal, Kubernetes' grace period) and, once the
    loop runs, SIGINT (Ctrl-C) only set a flag; the flag rides on the step's all-reduce, and every
    rank then saves a checkpoint at the end of the same step and stops. Ctrl-C before the loop,
    or a second one, stops at once (KeyboardInterrupt). Loader workers forked after this inherit
    the handler and ignore the signals it handles: the trainer decides."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested, self.name, self.armed, self.pid = False, None, False, os.getpid()
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def arm(self):
        self.armed = True

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked loader worker
            return
        if signum == signal.SIGINT and (not self.armed or self.name == "SIGINT"):
            raise KeyboardInterrupt
        self.requested = True
        self.name = self.name or signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def loader_config(cfg: PretrainConfig, world: int, on_gpu: bool, **overrides) -> LoaderConfig:
    """The loader factory's settings for this run (pipelines/data/factory.py: WebDataset manifest or
    brace pattern, or an FFCV manifest staged into the run directory)."""
    d = cfg.data
    workers = d.num_workers
    if workers is None:
        workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    settings = dict(manifest=d.train, batch_size=cfg.deepspeed.micro_batch, num_workers=workers,
                    seed=cfg.run.seed, image_size=d.image_size, block_size=d.block_size, access=d.access,
                    resize=d.resize, decode=d.decode, cache_dir=os.path.join(cfg.run.output, "ffcv-cache"),
                    shard_cache_dir=d.shard_cache_dir, shard_cache_bytes=d.shard_cache_bytes, pin_memory=on_gpu)
    return LoaderConfig(**dict(settings, **overrides))


def train_loader(cfg: PretrainConfig, rank: int, world: int, on_gpu: bool):
    """The training loader of this rank, with exact elastic resume."""
    return build_loader(loader_config(cfg, world, on_gpu), train=True, rank=rank, world_size=world)


def fixed_batch(cfg: PretrainConfig, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reconstruction grid's images (eval crop of the first samples of the epoch order) and
    masking noise: the same on every rank and at every grid, so grids compare across steps."""
    if not cfg.run.recon_every:
        return None
    n = cfg.run.recon_images
    loader = build_loader(loader_config(cfg, 1, False, batch_size=n, num_workers=0, block_size=n), train=False)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    imgs = normalize_batch(batch["image"], device, torch.float32)
    noise = torch.rand(imgs.shape[0], cfg.model_config().num_patches, generator=torch.Generator().manual_seed(cfg.run.seed + 1))
    return imgs, noise.to(device)


class Trainer:
    """One rank's pretraining run. ``Trainer(cfg, resume, stop, on_gpu, rank, world).train()``
    returns the run's summary; close() (called by train()) releases the loader and checkpointer."""

    def __init__(self, cfg: PretrainConfig, resume: str, stop: StopRequest, on_gpu: bool, rank: int, world: int):
        self.cfg, self.stop, self.on_gpu, self.rank, self.world = cfg, stop, on_gpu, rank, world
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.step = self.samples = 0
        self.loader = self.checkpointer = self.batches = self.keys_log = None
        self.resumed, self.process_started = False, process_start_time()
        os.makedirs(os.path.join(cfg.run.output, "checkpoints"), exist_ok=True)  # every rank: none waits on rank 0
        self.loader_built = time.time()  # time to first batch counts from here too (and from process start)
        self.loader = train_loader(cfg, rank, world, on_gpu)
        self.loader_build_s = time.time() - self.loader_built  # the manifest: part of the loader's own time
        self.checkpointer = Checkpointer(cfg.run, rank, world)
        try:
            self.schedule = cfg.schedule(self.loader.num_samples, world)  # refuses a batch larger than a rank's data
            tag = self.checkpointer.resume_tag() if resume == "auto" else None
            if tag:  # before anything is written or loaded: the checkpoint must be this run's model and data
                check_resume_config(cfg, self.checkpointer.root, tag, rank)
            self.run_id = run_identity(cfg, tag, rank)  # a fresh run writes run.json; a resume reads it
            plan = self.checkpointer.prepare(tag) if tag else None
            self.ds_patch = plan.ds_config_patch if plan else {}
            self.engine, self.optimizer, self.dtype = build_engine(cfg, world, self.device, self.ds_patch or None,
                                                                   lr=self.schedule.lr)
            if plan:
                self._resume(tag, plan)
            if rank == 0:
                self._write_run_files()
        except BaseException as e:
            self.close(wait_s=0 if isinstance(e, KeyboardInterrupt) else None)
            raise

    def _resume(self, tag: str, plan) -> None:
        client = self.checkpointer.load(self.engine, plan)
        check_checkpoint_run(self.cfg, tag, client, self.run_id)  # before the run's files are written
        eff = self.schedule.effective_batch
        self.step, self.samples = client["step"], client.get("samples", client["step"] * eff)
        self.loader.load_state_dict(client["loader"])
        self.resumed = True
        if self.rank == 0:
            how = f" (saved by {plan.saved_world_size} ranks, universal checkpoint)" if plan.universal else ""
            print(f"resumed from {tag} at step {self.step}{how}", file=sys.stderr)
            for line in describe_schedule_change(client, self.schedule, self.samples):
                print(line, file=sys.stderr)
        self.schedule = self.schedule.resumed(self.step, self.samples, self.cfg.run.max_steps)

    def _write_run_files(self) -> None:
        """config.yaml (resolved), deepspeed.json (with the schedule as ``derived``), version.json; also
        into run.store, which alone must describe the run (crossmae-export reads config.yaml)."""
        cfg = self.cfg
        self.checkpointer.restore_history(self.step)  # metrics.jsonl etc. from the store on a fresh node
        ds_config = dict(deepspeed_config(cfg, self.world, self.on_gpu), **self.ds_patch)
        version = dict(code_version(), world_size=self.world, precision=resolve_precision(cfg, self.on_gpu),
                       device=torch.cuda.get_device_name() if self.on_gpu else "cpu")
        files = {"config.yaml": yaml.safe_dump(config_loader.to_dict(cfg), sort_keys=False),
                 "deepspeed.json": json.dumps(dict(ds_config, derived=self.schedule.as_dict()), indent=1),
                 "version.json": json.dumps(version, indent=1)}
        for name, text in files.items():
            with open(os.path.join(cfg.run.output, name), "w") as f:
                f.write(text)
            if cfg.run.store:
                storage.write_bytes(storage.join(cfg.run.store, name), text.encode())
        warning = short_run_warning(cfg, self.schedule, self.step)
        if warning:
            print(warning, file=sys.stderr)

    def _start(self) -> None:
        """The loop's components: device batches one ahead, metrics, the step, the key log, the grid's batch."""
        cfg, run = self.cfg, self.cfg.run
        self.batches = device_batches(_forever(self.loader), cfg.data.image_size, self.device, self.dtype,
                                      state_source=self.loader)
        obs = Observer(run.output, self.rank == 0, self.schedule.max_steps, self.step, run.tensorboard)
        self.metrics = RunMetrics(cfg, obs, self.batches, self.world, self.device,
                                  flops_per_image=3 * flops_per_image(self.engine.module.config, "pred")["total"],
                                  samples_per_epoch=self.schedule.samples_per_epoch, store=self.loader)
        self.train_step = TrainStep(self.engine, cfg, self.device, self.rank, self.world,
                                    on_skip=self.metrics.skipped_step)
        self.keys_log = open(os.path.join(run.output, f"keys-rank{self.rank}.jsonl"), "a", buffering=1) \
            if run.log_keys else None
        self.fixed = fixed_batch(cfg, self.device)

    def train(self) -> dict:
        """The training loop: one screen, top to bottom."""
        try:
            self._start()
            stopped, end, first = False, self.schedule.max_steps, _FirstArrival(self.batches, self.device)
            self.stop.arm()  # from here on Ctrl-C saves a checkpoint at the end of the step
            while self.step < end:
                lr = self.schedule.lr_at(self.samples)
                set_lr(self.optimizer, lr)
                result = self.train_step(self.step, first, self.stop.requested)
                if not first.reported:
                    first.reported = True  # every rank, after the same step: one collective
                    self.metrics.report_first_batch(first.at, self.loader_built, self.process_started, self.rank,
                                                    self.resumed, data_s=self.loader_build_s + first.at - first.asked)
                self.step, self.samples = self.step + 1, self.samples + self.schedule.effective_batch
                self.metrics.step(self.step, result, lr, self.engine)  # metrics.jsonl / TensorBoard every log_every
                self._log_keys(result)
                if self.fixed is not None and (self.step % self.cfg.run.recon_every == 0 or self.step == end):
                    self.metrics.recon(self.step, self.engine.module, self.fixed)  # every rank: ZeRO-3 gathers
                stopped = result.stop
                if self.step % self.cfg.run.save_every == 0 or self.step == end or stopped:
                    self.save()
                if stopped:
                    self.metrics.obs.message(f"stop requested by a signal: checkpoint step{self.step:08d} saved; "
                                             "--resume auto continues")
                    break
            self.checkpointer.close(wait_s=60 if stopped else None)  # preemption grace periods are short
            distributed.barrier()
            summary = dict(self.metrics.finish(self.step, self.checkpointer), step=self.step,
                           stopped_by_signal=stopped, signal=self.stop.name)
            return dict(summary, rank=self.rank, world_size=self.world, upload_failures=self.checkpointer.failures)
        except KeyboardInterrupt:  # a second Ctrl-C: leave now, saying what did not reach the store
            self.close(wait_s=0)
            raise
        finally:
            self.close()

    def save(self) -> None:
        """A checkpoint of this step; its client state is what an exact resume needs."""
        tag = f"step{self.step:08d}"
        client = dict(loader=self.batches.state_dict(), samples=self.samples, run_id=self.run_id,
                      effective_batch=self.schedule.effective_batch, lr=self.schedule.lr, world_size=self.world,
                      config=config_loader.to_dict(self.cfg))
        with writing_checkpoint(os.path.join(self.checkpointer.root, tag)):  # a full disk: names the cause
            self.checkpointer.save(self.engine, self.step, client)

    def _log_keys(self, result) -> None:
        if self.keys_log:
            for micro, keys in enumerate(result.keys):
                self.keys_log.write(json.dumps(dict(step=self.step - 1, micro=micro, keys=keys)) + "\n")

    def close(self, wait_s: float | None = None) -> None:
        """Release the prefetcher, key log, loader and checkpointer; ``wait_s`` bounds the wait for
        uploads still running (0 after a second Ctrl-C). Idempotent."""
        for part in (self.batches, self.keys_log, self.loader):
            if part is not None:
                part.close()
        self.batches = self.keys_log = self.loader = None
        if self.checkpointer is not None:
            self.checkpointer.close(wait_s)


class _FirstArrival:
    """The device batches, noting when the first one was asked for (the loader's workers start
    then) and when it was ready on the device (wall clock)."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device, self.asked, self.at, self.reported = batches, device, None, None, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.asked is None:
            self.asked = time.time()
        out = next(self.batches)
        if self.at is None:
            if self.device.type == "cuda":  # its copy may still run on the side stream
                torch.cuda.synchronize(self.device)
            self.at = time.time()
        return out


def _forever(loader):
    while True:
        yield from loader
