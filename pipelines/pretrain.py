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
import socket
import sys
import time

import torch
import yaml

from crossmae import MaskedAutoencoder

from . import checkpoints as ckpt
from . import config as config_loader
from . import storage
from .optim import build_optimizer, lr_at, set_lr
from .train_config import PretrainConfig, deepspeed_config, resolve_precision
from .transforms import MAETrainTransform, normalize_batch
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


def train(cfg: PretrainConfig, resume: str = "auto") -> dict:
    import deepspeed

    on_gpu = torch.cuda.is_available()
    rank, world = init_distributed(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    model = MaskedAutoencoder(cfg.model_config())
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing()
    loader = StreamingLoader.from_manifest(
        cfg.data.train, batch_size=cfg.deepspeed.micro_batch, transform=MAETrainTransform(cfg.data.image_size),
        rank=rank, world_size=world, num_workers=cfg.data.num_workers, seed=cfg.run.seed,
        block_size=cfg.data.block_size, cache_dir=cfg.data.shard_cache_dir, cache_bytes=cfg.data.shard_cache_bytes)
    derived = cfg.derived(loader.num_samples, world)
    ds_config = deepspeed_config(cfg, world, on_gpu)
    optimizer = build_optimizer(model.to(device), derived["lr"], cfg.optim.weight_decay, cfg.optim.betas)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    precision = resolve_precision(cfg, on_gpu)

    out = cfg.run.output
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)  # every rank: none may wait on rank 0
    if rank == 0:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(config_loader.to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(out, "deepspeed.json"), "w") as f:
            json.dump(dict(ds_config, derived=derived), f, indent=1)

    step = 0
    tag = resume_tag(cfg, rank) if resume == "auto" else None
    if tag:
        _, client = engine.load_checkpoint(os.path.join(out, "checkpoints"), tag)
        step = client["step"]
        loader.load_state_dict(client["loader"])
        if rank == 0:
            print(f"resumed from {tag} at step {step}", file=sys.stderr)

    def batches():
        while True:
            yield from loader

    stream = batches()
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None
    keys_log = open(os.path.join(out, f"keys-rank{rank}.jsonl"), "a") if cfg.run.log_keys else None
    num_patches = engine.module.config.num_patches
    t_last, data_wait = time.perf_counter(), 0.0
    while step < derived["max_steps"]:
        set_lr(optimizer, lr_at(step, derived["lr"], derived["warmup_steps"], derived["total_steps"], cfg.optim.min_lr))
        losses = []
        for micro in range(cfg.deepspeed.grad_accum):
            t0 = time.perf_counter()
            batch = next(stream)
            data_wait += time.perf_counter() - t0
            imgs = normalize_batch(batch["image"], device, torch.bfloat16 if precision == "bf16" else torch.float32)
            noise = _noise(cfg, step, micro, rank, imgs.shape[0], num_patches).to(device)
            loss = engine(imgs, noise).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if keys_log:
                keys_log.write(json.dumps(dict(step=step, micro=micro, keys=batch["key"])) + "\n")
        step += 1
        if metrics and (step % cfg.run.log_every == 0 or step == derived["max_steps"]):
            now = time.perf_counter()
            metrics.write(json.dumps(dict(step=step, loss=sum(losses) / len(losses), lr=optimizer.param_groups[0]["lr"],
                                          epoch=loader.epoch, data_wait_s=round(data_wait, 4),
                                          seconds=round(now - t_last, 4))) + "\n")
            metrics.flush()
            t_last, data_wait = now, 0.0
        if step % cfg.run.save_every == 0 or step == derived["max_steps"]:
            save(engine, cfg, step, loader, rank)
    for f in (metrics, keys_log):
        if f:
            f.close()
    return dict(step=step, rank=rank, world_size=world)


def save(engine, cfg: PretrainConfig, step: int, loader, rank: int) -> None:
    """DeepSpeed checkpoint + client state, then (with ``run.store``) a mirror in the store.
    COMPLETE (local) and ``latest`` (store) are written only after every rank's files are in."""
    import deepspeed.comm as dist

    out, store, tag = cfg.run.output, cfg.run.store, f"step{step:08d}"
    root = os.path.join(out, "checkpoints")
    engine.save_checkpoint(root, tag=tag, client_state=dict(step=step, loader=loader.state_dict()))
    dist.barrier()
    if store:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one uploader per node: its ranks' files
            ckpt.upload(root, tag, store)
        dist.barrier()
    if rank == 0:
        with open(os.path.join(root, tag, "COMPLETE"), "w") as f:
            f.write(str(step))
        steps = {t: int(t[4:]) for t in checkpoints(out)}
        for old in ckpt.tags_to_delete(list(steps), steps, cfg.run.keep_last, cfg.run.keep_every):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        if store:
            ckpt.publish(store, tag, step, ckpt.files(os.path.join(root, tag)))
            prefix = storage.join(store, "checkpoints") + "/"
            tags = {u[len(prefix):].split("/")[0] for u, _ in storage.list_objects(prefix) if u.endswith("/COMPLETE")}
            ckpt.prune(store, {t: int(t[4:]) for t in tags}, cfg.run.keep_last, cfg.run.keep_every)
    dist.barrier()


def resume_tag(cfg: PretrainConfig, rank: int) -> str | None:
    """The newest complete checkpoint, local or in the store (downloaded when only there)."""
    import deepspeed.comm as dist

    local = checkpoints(cfg.run.output)
    best = local[-1] if local else None
    remote = ckpt.latest(cfg.run.store) if cfg.run.store else None
    if remote and (best is None or int(remote["tag"][4:]) > int(best[4:])):
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            ckpt.download(cfg.run.store, remote["tag"], os.path.join(cfg.run.output, "checkpoints"))
        dist.barrier()
        best = remote["tag"]
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
    except config_loader.ConfigError as e:
        print(f"crossmae-pretrain: error: {e}", file=sys.stderr)
        return 2
    train(cfg, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
