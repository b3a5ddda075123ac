"""``crossmae-pretrain``: DeepSpeed ZeRO pretraining of CrossMAE / MAE.

    deepspeed --num_gpus 8 -m pipelines.pretrain --config run.yaml data.train=s3://b/in1k/train/manifest.json
    torchrun --nproc_per_node 2 -m pipelines.pretrain --config run.yaml deepspeed.zero_stage=3
    crossmae-pretrain --config run.yaml run.max_steps=100          (one plain process)

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the launcher (``--local_rank`` is
accepted and ignored). Writes into ``run.output``: config.yaml (resolved), deepspeed.json,
metrics.jsonl (rank 0), checkpoints/<tag>/ (DeepSpeed checkpoints whose client state holds the
loader position and step). ``--resume auto`` continues from the newest complete checkpoint
with exactly the samples not yet seen. Masking noise is drawn from a generator seeded by
(seed, step, micro-step, rank), so a resumed run computes what an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

import torch
import yaml

from crossmae import MaskedAutoencoder
from crossmae.flops import flops_per_image
from crossmae.visualize import reconstruction_grid

from . import checkpoints as ckpt
from . import config as config_loader
from . import reshard, storage
from .observe import Observer, code_version, peak_memory_gb, peak_tflops
from .optim import build_optimizer, lr_at, set_lr
from .train_config import PretrainConfig, deepspeed_config, resolve_precision
from .transforms import MAETrainTransform, normalize_batch, resize_on_device
from .wds_loader import StreamingLoader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(on_gpu: bool) -> tuple[int, int]:
    """(rank, world size); a plain process becomes a world of one."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def checkpoints(out: str) -> list[str]:
    """Complete checkpoint tags, oldest first: a tag counts once its marker file exists."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if os.path.exists(os.path.join(root, t, "COMPLETE")))


def _noise(cfg: PretrainConfig, step: int, micro: int, rank: int, n: int, num_patches: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(((cfg.run.seed * 1_000_003 + step) * 1009 + micro) * 65537 + rank)
    return torch.rand(n, num_patches, generator=g)


class NonFiniteLoss(RuntimeError):
    pass


class _StopRequest:
    """SIGTERM / SIGUSR1 (preemption, Slurm's --signal, Kubernetes' grace period) only set a flag;
    the flag rides on the per-micro-batch all-reduce, and every rank then saves a checkpoint at
    the end of the same step and stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _injected_faults() -> dict[int, int]:
    """Test-only fault injection: CROSSMAE_FAULT_NONFINITE="7:1,9:10" makes rank 0's loss NaN on
    the first 1 (10) attempts of step 7 (9). Unset in real runs."""
    spec = os.environ.get("CROSSMAE_FAULT_NONFINITE", "")
    out = {}
    for item in filter(None, spec.split(",")):
        step, _, count = item.partition(":")
        out[int(step)] = int(count or 1)
    return out


def _fixed_batch(cfg: PretrainConfig, device, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reconstruction grid's images (eval crop of the first samples of the epoch order) and
    masking noise: the same on every rank and at every grid, so grids compare across steps."""
    if not cfg.run.recon_every:
        return None
    from .loaders import EvalTransform

    loader = StreamingLoader.from_manifest(cfg.data.train, batch_size=cfg.run.recon_images,
                                           transform=EvalTransform(cfg.data.image_size), num_workers=0,
                                           seed=cfg.run.seed, block_size=cfg.run.recon_images)
    batch = next(iter(loader))
    imgs = normalize_batch(batch["image"], device, dtype)
    mc = cfg.model_config()
    noise = torch.rand(imgs.shape[0], mc.num_patches, generator=torch.Generator().manual_seed(cfg.run.seed + 1))
    return imgs, noise.to(device)


def train(cfg: PretrainConfig, resume: str = "auto") -> dict:
    import deepspeed
    import deepspeed.comm as dist

    on_gpu = torch.cuda.is_available()
    rank, world = init_distributed(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(cfg.model_config())
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing()
    loader = StreamingLoader.from_manifest(
        cfg.data.train, batch_size=cfg.deepspeed.micro_batch,
        transform=MAETrainTransform(cfg.data.image_size, resize=cfg.data.resize), rank=rank, world_size=world,
        num_workers=cfg.data.num_workers, seed=cfg.run.seed, block_size=cfg.data.block_size,
        cache_dir=cfg.data.shard_cache_dir, cache_bytes=cfg.data.shard_cache_bytes, pin_memory=on_gpu)
    derived = cfg.derived(loader.num_samples, world)
    ds_config = deepspeed_config(cfg, world, on_gpu)
    tag = resume_tag(cfg, rank) if resume == "auto" else None
    plan = None
    if tag and int(os.environ.get("LOCAL_RANK", 0)) == 0:  # before DeepSpeed unpickles it (weights_only=False)
        ckpt.check_weights_only(os.path.join(cfg.run.output, "checkpoints", tag))
    if tag:  # saved by another world size: load its universal conversion (made once, on each node)
        plan = reshard.prepare_resume(os.path.join(cfg.run.output, "checkpoints"), tag, world,
                                      convert=int(os.environ.get("LOCAL_RANK", 0)) == 0)
        dist.barrier()
        ds_config.update(plan.ds_config_patch)  # {"checkpoint": {"load_universal": true}}: read at initialize
    optimizer = build_optimizer(model.to(device), derived["lr"], cfg.optim.weight_decay, cfg.optim.betas)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.model.compile:
        engine.compile()
    precision = resolve_precision(cfg, on_gpu)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    out = cfg.run.output
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)  # every rank: none may wait on rank 0
    if rank == 0:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(config_loader.to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(out, "deepspeed.json"), "w") as f:
            json.dump(dict(ds_config, derived=derived), f, indent=1)
        with open(os.path.join(out, "version.json"), "w") as f:
            json.dump(dict(code_version(), world_size=world, precision=precision,
                           device=torch.cuda.get_device_name() if on_gpu else "cpu"), f, indent=1)
        if cfg.run.store:  # the store alone must describe the run (crossmae-export reads config.yaml)
            for name in ("config.yaml", "deepspeed.json", "version.json"):
                with open(os.path.join(out, name), "rb") as f:
                    storage.write_bytes(storage.join(cfg.run.store, name), f.read())

    step = 0
    if plan:
        client = reshard.load_checkpoint(engine, plan)
        step = client["step"]
        loader.load_state_dict(client["loader"])
        if rank == 0:
            how = f" (saved by {plan.saved_world_size} ranks, universal checkpoint)" if plan.universal else ""
            print(f"resumed from {tag} at step {step}{how}", file=sys.stderr)

    def batches():
        while True:
            yield from loader

    stream = batches()
    max_steps = derived["max_steps"]
    obs = Observer(out, rank == 0, max_steps, step, cfg.run.tensorboard)
    mirror = _Mirror(cfg, rank, world)
    fixed = _fixed_batch(cfg, device, dtype)
    keys_log = open(os.path.join(out, f"keys-rank{rank}.jsonl"), "a", buffering=1) if cfg.run.log_keys else None
    mc = engine.module.config
    flops_per_img = 3 * flops_per_image(mc, "pred")["total"]  # forward + backward (2x) of the tokens processed
    peak = peak_tflops(cfg.run.peak_tflops)
    faults = _injected_faults()
    imgs_per_step = cfg.effective_batch(world)
    t_last, data_wait, window_steps, losses = time.perf_counter(), 0.0, 0, []
    skipped = bad_in_row = 0
    stop, stop_all = _StopRequest(), False
    while step < max_steps:
        set_lr(optimizer, lr_at(step, derived["lr"], derived["warmup_steps"], derived["total_steps"], cfg.optim.min_lr))
        micro = attempt = 0
        while micro < cfg.deepspeed.grad_accum:
            t0 = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - t0
            if cfg.data.resize == "device":  # uint8 crops -> resized, flipped, normalised on the device
                imgs = resize_on_device(batch, cfg.data.image_size, device, dtype)
            else:  # uint8 (pinned on GPUs) -> device, non_blocking, then normalised there
                imgs = normalize_batch(batch["image"], device, dtype)
            noise = _noise(cfg, step, micro + 1000 * attempt, rank, imgs.shape[0], num_patches=mc.num_patches)
            loss = engine(imgs, noise.to(device)).loss
            if rank == 0 and faults.get(step, 0) > attempt:
                loss = loss * float("nan")
            # One all-reduce per micro-batch: the global mean loss for the logs, and whether any
            # rank's loss is non-finite, so that every rank skips the same micro-batch.
            finite = bool(torch.isfinite(loss.detach()))
            stats = torch.tensor([loss.detach().float().item() if finite else 0.0, 0.0 if finite else 1.0,
                                  float(stop.requested)])
            dist.all_reduce(stats)
            stop_all = stop_all or stats[2].item() > 0  # any rank signalled: all stop at this step's end
            if stats[1] > 0:  # skip: no backward, no step; the next batch takes its place
                skipped += 1
                bad_in_row += 1
                attempt += 1
                obs.message(f"step {step}: non-finite loss on {int(stats[1])} rank(s); micro-batch skipped "
                            f"({bad_in_row} in a row, {skipped} in total)")
                if bad_in_row >= cfg.run.max_nonfinite:
                    raise NonFiniteLoss(f"{bad_in_row} non-finite losses in a row at step {step} "
                                        f"(run.max_nonfinite={cfg.run.max_nonfinite}); last checkpoint: "
                                        f"{(checkpoints(out) or ['none'])[-1]}")
                continue
            bad_in_row = 0
            engine.backward(loss)
            engine.step()
            losses.append(stats[0].item() / world)
            if keys_log:
                keys_log.write(json.dumps(dict(step=step, micro=micro, keys=batch["key"])) + "\n")
            micro += 1
        step += 1
        window_steps += 1
        obs.step(loss=losses[-1], lr=optimizer.param_groups[0]["lr"])
        if step % cfg.run.log_every == 0 or step == max_steps:
            now = time.perf_counter()
            seconds = now - t_last
            share = torch.tensor([data_wait / seconds])
            dist.all_reduce(share, op=dist.ReduceOp.MAX)
            skipped_data = torch.tensor([sum(v for k, v in loader.stats.items() if k != "samples")])
            dist.all_reduce(skipped_data)  # corrupt samples replaced in their batch, all ranks, so far
            ips = window_steps * imgs_per_step / seconds
            grad_norm = engine.get_global_grad_norm()
            obs.log(dict(step=step, epoch=loader.epoch, loss=sum(losses) / len(losses),
                         lr=optimizer.param_groups[0]["lr"],
                         grad_norm=None if grad_norm is None else float(grad_norm),
                         images_per_s=round(ips, 2), images_per_s_per_rank=round(ips / world, 2),
                         data_wait_share=round(data_wait / seconds, 4), data_wait_share_max=round(share.item(), 4),
                         peak_memory_gb=round(peak_memory_gb(device), 3),
                         mfu=round(flops_per_img * ips / world / (peak * 1e12), 4) if peak else None,
                         skipped_nonfinite=skipped, skipped_samples=int(skipped_data.item()),
                         skipped_samples_rank0={k: v for k, v in loader.stats.items() if k != "samples"},
                         upload_failures=mirror.failures, seconds=round(seconds, 4)))
            t_last, data_wait, window_steps, losses = now, 0.0, 0, []
        if fixed is not None and (step % cfg.run.recon_every == 0 or step == max_steps):
            grid = reconstruction_grid(engine.module, *fixed)  # every rank: ZeRO-3 gathers parameters
            obs.recon(step, grid)
        if step % cfg.run.save_every == 0 or step == max_steps or stop_all:
            save(engine, cfg, step, loader, rank, mirror)
        if stop_all:
            obs.message(f"stop requested by a signal: checkpoint step{step:08d} saved; --resume auto continues")
            break
    mirror.join()
    dist.barrier()
    obs.close()
    if keys_log:
        keys_log.close()
    stop.restore()
    return dict(step=step, rank=rank, world_size=world, skipped_nonfinite=skipped, upload_failures=mirror.failures,
                stopped_by_signal=stop_all)


class _Mirror:
    """Copies each checkpoint into ``run.store`` in a background thread, so training goes on
    while it uploads. Each node's local rank 0 uploads the files its ranks wrote and then a
    receipt (checkpoints/<tag>/_nodes/<node>.json); global rank 0 waits for every node's
    receipt, checks every listed file is in the store, and only then writes COMPLETE and
    ``latest`` and prunes. One upload in flight: the next save waits for the previous one."""

    def __init__(self, cfg: PretrainConfig, rank: int, world: int):
        self.cfg, self.rank = cfg, rank
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.uploader = int(os.environ.get("LOCAL_RANK", 0)) == 0
        self.node, self.nodes = rank // local_world, max(1, world // local_world)
        self.thread: threading.Thread | None = None
        self.failures = 0

    def start(self, tag: str, step: int) -> None:
        self.join()
        if not self.cfg.run.store or not self.uploader:
            return
        if self.cfg.run.async_upload:
            self.thread = threading.Thread(target=self._run, args=(tag, step), name=f"upload-{tag}", daemon=True)
            self.thread.start()
        else:
            self._run(tag, step)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _run(self, tag: str, step: int) -> None:
        store, root = self.cfg.run.store, os.path.join(self.cfg.run.output, "checkpoints")
        try:
            names = ckpt.files(os.path.join(root, tag))
            ckpt.upload(root, tag, store, names)
            storage.write_bytes(storage.join(store, "checkpoints", tag, "_nodes", f"{self.node}.json"),
                                json.dumps(names).encode())
            if self.rank == 0:
                expected = self._wait_for_receipts(store, tag)
                ckpt.publish(store, tag, step, expected)
                prefix = storage.join(store, "checkpoints") + "/"
                tags = {u[len(prefix):].split("/")[0] for u, _ in storage.list_objects(prefix) if u.endswith("/COMPLETE")}
                ckpt.prune(store, {t: int(t[4:]) for t in tags}, self.cfg.run.keep_last, self.cfg.run.keep_every)
        except Exception as e:  # noqa: BLE001 - reported, counted; the local checkpoint still stands
            self.failures += 1
            print(f"crossmae-pretrain: checkpoint {tag} not mirrored to {store}: {e}", file=sys.stderr)

    def _wait_for_receipts(self, store: str, tag: str, timeout: float = 3600.0) -> list[str]:
        deadline = time.monotonic() + timeout
        receipts = [storage.join(store, "checkpoints", tag, "_nodes", f"{n}.json") for n in range(self.nodes)]
        while True:
            missing = [r for r in receipts if not storage.exists(r)]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise storage.StorageError(f"{len(missing)} node(s) did not finish uploading {tag} in {timeout:.0f} s")
            time.sleep(1.0)
        names = set()
        for r in receipts:
            names |= set(json.loads(storage.read_bytes(r)))
        return sorted(names)


def save(engine, cfg: PretrainConfig, step: int, loader, rank: int, mirror: _Mirror) -> None:
    """DeepSpeed checkpoint + client state into the local directory; COMPLETE once every rank's
    files are written; then the store mirror starts (in the background by default)."""
    import deepspeed.comm as dist

    out, tag = cfg.run.output, f"step{step:08d}"
    root = os.path.join(out, "checkpoints")
    engine.save_checkpoint(root, tag=tag, client_state=dict(step=step, loader=loader.state_dict()))
    dist.barrier()
    mirror.join()  # the previous upload must finish before its local copy may be pruned
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # each node marks and prunes its own directory
        with open(os.path.join(root, tag, "COMPLETE"), "w") as f:
            f.write(str(step))
        steps = {t: int(t[4:]) for t in checkpoints(out)}
        for old in ckpt.tags_to_delete(list(steps), steps, cfg.run.keep_last, cfg.run.keep_every):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    mirror.start(tag, step)


def resume_tag(cfg: PretrainConfig, rank: int) -> str | None:
    """The newest complete checkpoint, local or in the store (downloaded when only there).
    Global rank 0 decides and broadcasts, so every rank loads the same tag."""
    import deepspeed.comm as dist

    choice = [None]
    if rank == 0:
        local = checkpoints(cfg.run.output)
        best = local[-1] if local else None
        remote = ckpt.latest(cfg.run.store) if cfg.run.store else None
        if remote and (best is None or int(remote["tag"][4:]) > int(best[4:])):
            best = remote["tag"]
        choice = [best]
    dist.broadcast_object_list(choice, src=0)
    best = choice[0]
    if best and int(os.environ.get("LOCAL_RANK", 0)) == 0 and best not in checkpoints(cfg.run.output):
        ckpt.download(cfg.run.store, best, os.path.join(cfg.run.output, "checkpoints"))
        with open(os.path.join(cfg.run.output, "checkpoints", best, "COMPLETE"), "w") as f:
            f.write(best[4:])
    dist.barrier()
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="crossmae-pretrain", description="DeepSpeed pretraining of CrossMAE")
    ap.add_argument("--config", help="YAML config (sections: model, data, optim, deepspeed, run)")
    ap.add_argument("--resume", default="auto", choices=["auto", "none"])
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.blr=1e-4")
    args = ap.parse_args(argv)
    try:
        cfg = config_loader.load(PretrainConfig, args.config, args.overrides)
        if not cfg.data.train:
            raise config_loader.ConfigError("data.train is not set (a manifest URL or shard pattern)")
        if cfg.data.train.endswith(".json") and not storage.exists(cfg.data.train):  # fail before DeepSpeed starts
            raise config_loader.ConfigError(f"data.train: no such manifest {cfg.data.train}")
    except (config_loader.ConfigError, storage.StorageError) as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, args.resume)
    except NonFiniteLoss as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 3
    except (storage.StorageError, FileNotFoundError, ValueError) as e:  # data or store unreachable / invalid
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    if result["stopped_by_signal"]:
        print(f"crossmae-pretrain: stopped by a signal at step {result['step']} after saving a checkpoint; "
              "run again with --resume auto to continue", file=sys.stderr)
        return 143
    if result["upload_failures"]:
        print(f"crossmae-pretrain: error: {result['upload_failures']} checkpoint(s) were not mirrored to "
              f"{cfg.run.store} (local copies kept in {cfg.run.output}/checkpoints)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
