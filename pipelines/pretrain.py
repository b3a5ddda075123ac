"""``crossmae-pretrain``: DeepSpeed pretraining of CrossMAE / MAE.

    deepspeed --num_gpus 8 --module pipelines.pretrain --config run.yaml data.train=s3://b/in1k/train/manifest.json
    torchrun --nproc_per_node 2 -m pipelines.pretrain --config run.yaml deepspeed.zero_stage=3
    crossmae-pretrain --config run.yaml run.max_steps=100          (one plain process)

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the launcher (``--local_rank`` is
accepted and ignored). ``run.output`` is a local directory that belongs to one run: rank 0 locks
it (run.lock; and ``run.store``) before writing anything (pipelines/run_lock.py), then writes
run.json (the run's id), config.yaml (resolved), deepspeed.json, metrics.jsonl, and
checkpoints/<tag>/ (DeepSpeed checkpoints whose client state holds the loader position, step,
samples seen and run id). ``--resume auto`` continues from the newest complete checkpoint with
exactly the samples not yet seen, after checking that the checkpoint's model and data settings
and run id are the ones asked for; ``--resume none`` starts a new run, refused where one already
is unless ``--move-old-run`` moves it into previous-<UTC time>/ (pipelines/run_checks.py).

The components: pipelines/train_step.py (one optimizer step, shared with the GPU benchmark),
pipelines/checkpointer.py (save / resume / store mirror), pipelines/observe.py (metrics),
pipelines/distributed.py (every collective), the loader factory (pipelines/loaders.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import traceback

import torch
import yaml

from crossmae.flops import flops_per_image

from . import config as config_loader
from . import distributed, run_lock, storage
from .checkpointer import Checkpointer, complete_tags
from .observe import DataLossError, Observer, RunMetrics, code_version
from .optim import lr_at, set_lr
from .run_checks import (RunDirError, check_checkpoint_run, check_resume_config, check_run_paths, claim_run_directory,
                         describe_os_error, describe_schedule_change, run_identity, short_run_warning,
                         writing_checkpoint)
from .train_config import PretrainConfig, deepspeed_config, default_num_workers, resolve_precision
from .train_step import NonFiniteLoss, TrainStep, build_engine, device_batches

checkpoints = complete_tags  # the old name (pipelines.demo, tests)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(on_gpu: bool, run=None) -> tuple[int, int]:
    """(rank, world size); a plain process becomes a world of one. ``run`` (a RunSection; None or
    a section without them: RunSection's defaults) sets the collective and heartbeat timeouts;
    a launched rank also dies with its launcher (pipelines/watchdog.py)."""
    import atexit

    import deepspeed

    from . import watchdog
    from .train_config import RunSection

    collective_s = float(getattr(run, "collective_timeout_s", RunSection.collective_timeout_s))
    heartbeat_s = float(getattr(run, "heartbeat_timeout_s", RunSection.heartbeat_timeout_s))
    watchdog.check_timeouts(collective_s, heartbeat_s)
    if "RANK" not in os.environ:  # a plain process: a world of one
        watchdog.plain_process = True  # RANK below is ours: a later call in this process is no launched rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    elif not watchdog.plain_process:
        watchdog.die_with_launcher()
    if on_gpu:  # before the process group: NCCL binds each rank's communicator to its device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        warning = watchdog.nccl_error_handling()
        if warning and os.environ["RANK"] == "0":
            print(f"{watchdog.program_name()}: warning: {warning}", file=sys.stderr)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                               timeout=watchdog.collective_timeout(collective_s))
    distributed.install_device_check_from_env()  # tests: CROSSMAE_CHECK_COLLECTIVES=meta
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dog = watchdog.start(rank, world, heartbeat_s, watchdog.program_name())
    if dog is not None:
        atexit.register(dog.stop)  # a clean exit (also 143 after a stop signal) is not a lost rank
    return rank, world


class _StopRequest:
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


def loader_config(cfg: PretrainConfig, world: int, on_gpu: bool, **overrides):
    """The loader factory's settings for this run (pipelines/loaders.py: WebDataset manifest or
    brace pattern, or an FFCV manifest staged into the run directory)."""
    from .loaders import LoaderConfig

    workers = cfg.data.num_workers
    if workers is None:
        workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    settings = dict(manifest=cfg.data.train, batch_size=cfg.deepspeed.micro_batch, num_workers=workers,
                    seed=cfg.run.seed, image_size=cfg.data.image_size, block_size=cfg.data.block_size,
                    resize=cfg.data.resize, decode=cfg.data.decode, cache_dir=os.path.join(cfg.run.output, "ffcv-cache"),
                    shard_cache_dir=cfg.data.shard_cache_dir, shard_cache_bytes=cfg.data.shard_cache_bytes,
                    pin_memory=on_gpu)
    return LoaderConfig(**dict(settings, **overrides))


def build_loader(cfg: PretrainConfig, rank: int, world: int, on_gpu: bool):
    """The training loader of this rank, with exact elastic resume."""
    from .loaders import build_loader as factory

    return factory(loader_config(cfg, world, on_gpu), train=True, rank=rank, world_size=world)


def _fixed_batch(cfg: PretrainConfig, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reconstruction grid's images (eval crop of the first samples of the epoch order) and
    masking noise: the same on every rank and at every grid, so grids compare across steps."""
    if not cfg.run.recon_every:
        return None
    from .loaders import build_loader as factory
    from .transforms import normalize_batch

    loader = factory(loader_config(cfg, 1, False, batch_size=cfg.run.recon_images, num_workers=0,
                                   block_size=cfg.run.recon_images), train=False)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    imgs = normalize_batch(batch["image"], device, torch.float32)
    noise = torch.rand(imgs.shape[0], cfg.model_config().num_patches, generator=torch.Generator().manual_seed(cfg.run.seed + 1))
    return imgs, noise.to(device)


def _write_run_files(cfg: PretrainConfig, ds_config: dict, derived: dict, world: int, precision: str, on_gpu: bool):
    out = cfg.run.output
    files = {"config.yaml": yaml.safe_dump(config_loader.to_dict(cfg), sort_keys=False),
             "deepspeed.json": json.dumps(dict(ds_config, derived=derived), indent=1),
             "version.json": json.dumps(dict(code_version(), world_size=world, precision=precision,
                                             device=torch.cuda.get_device_name() if on_gpu else "cpu"), indent=1)}
    for name, text in files.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
        if cfg.run.store:  # the store alone must describe the run (crossmae-export reads config.yaml)
            storage.write_bytes(storage.join(cfg.run.store, name), text.encode())


def train(cfg: PretrainConfig, resume: str = "auto", move_old_run: bool = False) -> dict:
    on_gpu = torch.cuda.is_available()
    rank, world = init_distributed(on_gpu, cfg.run)
    stop, lock = _StopRequest(), None
    try:
        lock = run_lock.lock_run(cfg.run, rank, describe_os_error)  # before anything is written (rank 0)
        claim_run_directory(cfg, resume, move_old_run, rank)  # --resume none never lands on another run
        return _train(cfg, resume, stop, on_gpu, rank, world)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()


def _train(cfg: PretrainConfig, resume: str, stop: _StopRequest, on_gpu: bool, rank: int, world: int) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    os.makedirs(os.path.join(cfg.run.output, "checkpoints"), exist_ok=True)  # every rank: none waits on rank 0
    loader = build_loader(cfg, rank, world, on_gpu)
    checkpointer = Checkpointer(cfg.run, rank, world)
    try:
        derived = cfg.derived(loader.num_samples, world)  # refuses a batch larger than each rank's data
        tag = checkpointer.resume_tag() if resume == "auto" else None
        if tag:  # before anything is written or loaded: the checkpoint must be this run's model and data
            check_resume_config(cfg, checkpointer.root, tag, rank)
        run_id = run_identity(cfg, tag, rank)  # a fresh run writes run.json; a resume reads it
        plan = checkpointer.prepare(tag) if tag else None
        engine, optimizer, dtype = build_engine(cfg, world, device, plan.ds_config_patch if plan else None,
                                                lr=derived["lr"])
        precision = resolve_precision(cfg, on_gpu)
        step = samples = 0
        if plan:
            client = checkpointer.load(engine, plan)
            check_checkpoint_run(cfg, tag, client, run_id)  # before the run's files are written
            step, samples = client["step"], client.get("samples", client["step"] * derived["effective_batch"])
            loader.load_state_dict(client["loader"])
            if rank == 0:
                how = f" (saved by {plan.saved_world_size} ranks, universal checkpoint)" if plan.universal else ""
                print(f"resumed from {tag} at step {step}{how}", file=sys.stderr)
                for line in describe_schedule_change(client, derived, samples):
                    print(line, file=sys.stderr)
            derived["max_steps"] = step + -(-(derived["total_samples"] - samples) // derived["effective_batch"])
            if cfg.run.max_steps:
                derived["max_steps"] = min(derived["max_steps"], cfg.run.max_steps)
        if rank == 0:
            checkpointer.restore_history(step)  # metrics.jsonl etc. from the store on a fresh node
            ds_config = dict(deepspeed_config(cfg, world, on_gpu), **(plan.ds_config_patch if plan else {}))
            _write_run_files(cfg, ds_config, derived, world, precision, on_gpu)
            warning = short_run_warning(cfg, derived, step)
            if warning:
                print(warning, file=sys.stderr)
        return _loop(cfg, engine, optimizer, loader, checkpointer, stop, derived, dtype, device, rank, world, step,
                     samples, run_id)
    except KeyboardInterrupt:  # a second Ctrl-C: leave now, saying what did not reach the store
        checkpointer.close(wait_s=0)
        raise
    finally:
        loader.close()
        checkpointer.close()


def _loop(cfg, engine, optimizer, loader, checkpointer, stop, derived, dtype, device, rank, world, step, samples,
          run_id):
    """The run's components, then the loop."""
    batches = device_batches(_forever(loader), cfg.data.image_size, device, dtype, state_source=loader)
    obs = Observer(cfg.run.output, rank == 0, derived["max_steps"], step, cfg.run.tensorboard)
    metrics = RunMetrics(cfg, obs, batches, world, device,
                         flops_per_image=3 * flops_per_image(engine.module.config, "pred")["total"],
                         samples_per_epoch=derived["samples_per_epoch"])
    train_step = TrainStep(engine, cfg, device, rank, world, on_skip=metrics.skipped_step)
    keys_log = open(os.path.join(cfg.run.output, f"keys-rank{rank}.jsonl"), "a", buffering=1) if cfg.run.log_keys else None
    fixed = _fixed_batch(cfg, device)
    try:
        summary = _run_steps(cfg, engine, optimizer, checkpointer, stop, derived, batches, metrics, train_step,
                             keys_log, fixed, world, step, samples, run_id)
    finally:
        batches.close()
        if keys_log:
            keys_log.close()
    return dict(summary, rank=rank, world_size=world, upload_failures=checkpointer.failures)


def _run_steps(cfg, engine, optimizer, checkpointer, stop, derived, batches, metrics, train_step, keys_log,
               fixed, world, step, samples, run_id):
    """The training loop: one screen, top to bottom."""
    stopped = False
    stop.arm()  # from here on Ctrl-C saves a checkpoint at the end of the step
    while step < derived["max_steps"]:
        lr = lr_at(samples, derived["lr"], derived["warmup_samples"], derived["total_samples"], cfg.optim.min_lr)
        set_lr(optimizer, lr)
        result = train_step(step, batches, stop.requested)
        step, samples = step + 1, samples + derived["effective_batch"]
        metrics.step(step, result, lr, engine)  # metrics.jsonl / TensorBoard every run.log_every steps
        if keys_log:
            for micro, keys in enumerate(result.keys):
                keys_log.write(json.dumps(dict(step=step - 1, micro=micro, keys=keys)) + "\n")
        if fixed is not None and (step % cfg.run.recon_every == 0 or step == derived["max_steps"]):
            metrics.recon(step, engine.module, fixed)  # every rank: ZeRO-3 gathers parameters
        stopped = result.stop
        if step % cfg.run.save_every == 0 or step == derived["max_steps"] or stopped:
            with writing_checkpoint(os.path.join(checkpointer.root, f"step{step:08d}")):  # a full disk: the cause
                checkpointer.save(engine, step, dict(loader=batches.state_dict(), samples=samples, run_id=run_id,
                                                     effective_batch=derived["effective_batch"], lr=derived["lr"],
                                                     world_size=world, config=config_loader.to_dict(cfg)))
        if stopped:
            metrics.obs.message(f"stop requested by a signal: checkpoint step{step:08d} saved; --resume auto continues")
            break
    checkpointer.close(wait_s=60 if stopped else None)  # preemption grace periods are short
    distributed.barrier()
    return dict(metrics.finish(step, checkpointer), step=step, stopped_by_signal=stopped, signal=stop.name)


def _forever(loader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crossmae-pretrain", description="DeepSpeed pretraining of CrossMAE / MAE")
    ap.add_argument("--config", help="YAML config (sections: model, data, optim, deepspeed, run)")
    ap.add_argument("--resume", default="auto", choices=["auto", "none"],
                    help="auto: continue from the newest complete checkpoint (local or in run.store); none: start a "
                         "new run (refused where run.output or run.store holds a run's checkpoints)")
    ap.add_argument("--move-old-run", action="store_true",
                    help="with --resume none: first move the run in run.output into run.output/previous-<UTC time>/")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4")
    args = ap.parse_args(argv)
    try:
        cfg = config_loader.load(PretrainConfig, args.config, args.overrides)
        if not cfg.data.train:
            raise config_loader.ConfigError("data.train is not set (a manifest URL or shard pattern)")
        cfg.validate()
        check_run_paths(cfg.run)  # a URL, a file or a read-only place as run.output: before DeepSpeed starts
        if args.move_old_run and args.resume != "none":
            raise config_loader.ConfigError("--move-old-run goes with --resume none (it starts a new run)")
        if cfg.data.train.endswith(".json") and not storage.exists(cfg.data.train):  # fail before DeepSpeed starts
            raise config_loader.ConfigError(f"data.train: no such manifest {cfg.data.train}")
    except (config_loader.ConfigError, storage.StorageError) as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, args.resume, args.move_old_run)
    except NonFiniteLoss as e:
        print(f"crossmae-pretrain: error: {e}; last checkpoint: {(complete_tags(cfg.run.output) or ['none'])[-1]}",
              file=sys.stderr)
        return 3
    except (config_loader.ConfigError, storage.StorageError, ValueError, DataLossError, run_lock.RunLockError,
            RunDirError) as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission, a file in the way: the file and the cause, no traceback
        print(f"crossmae-pretrain: error: {describe_os_error(e, cfg.run.output)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossmae-pretrain: interrupted (Ctrl-C) before training or a second time: stopped at once, nothing "
              f"more saved; newest checkpoint: {(complete_tags(cfg.run.output) or ['none'])[-1]}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug or a device failure: the traceback, then the error as the last line
        traceback.print_exc()
        print(f"crossmae-pretrain: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if result["stopped_by_signal"]:
        name = {"SIGINT": " (SIGINT, Ctrl-C)", None: ""}.get(result["signal"], f" ({result['signal']})")
        print(f"crossmae-pretrain: stopped by a signal at step {result['step']}{name} after saving a checkpoint; "
              "run again with --resume auto to continue", file=sys.stderr)
        return 130 if result["signal"] == "SIGINT" else 143
    if result["upload_failures"]:
        print(f"crossmae-pretrain: error: {result['upload_failures']} checkpoint(s) were not mirrored to "
              f"{cfg.run.store} (local copies kept in {cfg.run.output}/checkpoints)", file=sys.stderr)
        return 1
    return 0


def _exit(code: int) -> None:
    """Leave at once on failure: leftover loader workers or a dead peer's collective must not keep
    a crashed trainer alive (the last line stays the real error)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code not in (0, 130, 143):
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
