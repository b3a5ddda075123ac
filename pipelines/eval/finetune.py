"""Fine-tuning an exported encoder (MAE's protocol) under DeepSpeed: the machinery and the CLI of
``crossmae-eval finetune`` / ``-m pipelines.finetune`` (pipelines/finetune.py, whose docstring has the usage).

The export (a directory or storage prefix: model.safetensors, timm config.json, export.json)
becomes a timm ViT with a fresh head (global average pooling + fc_norm, drop path), trained
with layer-wise lr decay (timm's BEiT/MAE param groups), warmup + cosine, AdamW, RandAugment,
random erasing, mixup/cutmix and label smoothing; top-1/top-5 on the val manifest after every
epoch, each val sample counted exactly once across ranks (every collective through
pipelines.runtime.distributed, whose tensors are on the device the backend needs: CUDA under NCCL). Writes ``run.output``/metrics.jsonl,
config.yaml, deepspeed.json, checkpoints/epoch####/ (``--resume auto``), and the result
``<export>/eval/finetune.json``. The export's files are checked against the sha256 its
export.json records before use (pipelines/eval/inputs.py; the result records the sha256 of the
bytes read), its weights must be finite, and every config value is checked (pipelines/eval/finetune_config.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import time
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from pipelines.runtime import config_loader
from pipelines.runtime import distributed
from pipelines import storage
from pipelines.eval.inputs import BAD_EXPORT, BadExport, Export
from pipelines.eval.finetune_config import FinetuneConfig
from pipelines.storage.hashing import sha256_bytes
from pipelines.data.factory import LoaderConfig, build_loader
from pipelines.train.optim import lr_at, set_lr
from pipelines.train.config import deepspeed_config, resolve_precision
from pipelines.data.transforms import IMAGENET_MEAN, mae_train, normalize_batch


# ---------------------------------------------------------------- export -> model
def read_export(url: str) -> tuple[dict, dict, dict, dict]:
    """(tensors, timm config, export.json, what was read: sha256 per file and whether export.json
    vouched for them) of an export directory or prefix; its files are read once and checked
    against export.json (eval_inputs.Export), and its weights must be finite (NaN weights trained
    to a NaN loss and a chance-level top-1)."""
    export = Export.read(url)
    tensors, model_sha256, verified = export.load()
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise BadExport(f"{url}: model.safetensors holds non-finite weights ({len(bad)} tensors: "
                        f"{', '.join(bad[:3])}): the run diverged or the file is damaged")
    read = dict(sha256={"model.safetensors": model_sha256, "config.json": export.config_sha256}, verified=verified,
                weights_sha256=export.weights_sha256)
    return tensors, export.config, export.info, read


def build_model(config: dict, tensors: dict, num_classes: int, cfg: FinetuneConfig) -> torch.nn.Module:
    from timm.layers import trunc_normal_

    from crossmae import create_timm_encoder

    # avg: MAE's fc_norm after pooling (timm builds it only with final_norm=True; the encoder's own
    # final norm, if any, is dropped). token: the cls token through the export's own final norm.
    avg = cfg.model.global_pool == "avg"
    model, _ = create_timm_encoder(config, tensors, num_classes=num_classes, global_pool=cfg.model.global_pool,
                                   fc_norm=avg, final_norm=True if avg else config["model_args"]["final_norm"],
                                   drop_path_rate=cfg.model.drop_path)
    trunc_normal_(model.head.weight, std=cfg.model.head_init_std)
    torch.nn.init.zeros_(model.head.bias)
    return model


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-wise lr decay groups (BEiT/MAE): ``lr_scale`` = decay^(depth + 1 - layer),
    layer 0 = patch/pos embedding + cls token, i + 1 = block i, head and fc_norm 1.0. No weight
    decay on 1-D parameters, biases and ``no_weight_decay()`` (pos_embed, cls_token)."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay, model.no_weight_decay(), layer_decay=layer_decay)


# ---------------------------------------------------------------- augmentation
def _posterize(img, bits_to_keep, **_):
    """timm's posterize, keeping the bits=0 case that Pillow >= 12 refuses ('bits must be
    between 1 and 8'): rand-...-inc1 asks for 0 bits at magnitude 10, and older Pillow returned
    a black image there, which is what MAE/CrossMAE trained with."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else ImageOps.posterize(img, bits_to_keep)


class FinetuneTrainTransform:
    """Picklable loader transform, timm's training order: RandomResizedCrop(scale) + flip
    (the project's fast uint8 path), then RandAugment on the crop (PIL, timm's policy). Seeded
    per sample from the loader's generator, so a sample's augmentation is reproducible."""

    def __init__(self, size: int, scale=(0.08, 1.0), randaug: str = ""):
        self.size, self.scale, self.randaug, self._ra = size, tuple(scale), randaug, None

    def _policy(self):
        from timm.data.auto_augment import rand_augment_transform

        ra = rand_augment_transform(self.randaug, dict(translate_const=int(self.size * 0.45),
                                                       img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN)))
        for op in ra.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
        return ra

    def __getstate__(self):
        return dict(self.__dict__, _ra=None)

    def __call__(self, data: bytes, rng) -> torch.Tensor:
        img = mae_train(data, rng, size=self.size, scale=self.scale)
        if not self.randaug:
            return img
        from PIL import Image

        self._ra = self._ra or self._policy()
        seed = int(rng.integers(2**32))
        py_state, np_state = random.getstate(), np.random.get_state()  # timm draws from the global RNGs
        random.seed(seed)
        np.random.seed(seed)
        try:
            out = np.asarray(self._ra(Image.fromarray(img.permute(1, 2, 0).numpy())))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.from_numpy(out.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, loader, device, dtype) -> dict:
    """top-1 / top-5 / loss over the val set, every sample once across ranks: padded repeats
    are masked by the loader's ``valid`` flags, or else by the rank's first sight of ``index``.
    The sums are reduced through pipelines.runtime.distributed (on the device the backend needs)."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    seen: set[int] = set()
    for batch in loader:
        if "valid" in batch:
            keep = batch["valid"].bool()
        elif "index" in batch:
            keep = torch.tensor([int(i) not in seen for i in batch["index"]])
            seen.update(int(i) for i in batch["index"])
        else:  # a loader without either flag: count every row
            keep = torch.ones(len(batch["label"]), dtype=torch.bool)
        keep, labels = keep.to(device), batch["label"].to(device)
        logits = engine(normalize_batch(batch["image"], device, dtype)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([(hit[:, 0] & keep).sum(), (hit.any(1) & keep).sum(),
                             (F.cross_entropy(logits, labels, reduction="none") * keep).sum(), keep.sum()]).double()
    sums = distributed.all_reduce(sums)
    engine.train()
    c1, c5, loss, n = sums.tolist()
    return dict(top1=100 * c1 / n, top5=100 * c5 / n, val_loss=loss / n, eval_samples=int(n))


# ---------------------------------------------------------------- training
def read_manifest(key: str, url: str) -> tuple[dict, str]:
    """(manifest, sha256 of the bytes read): read once."""
    data = storage.read_bytes(url)
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise config_loader.ConfigError(f"{key} {url}: not a manifest ({e}; write one with crossmae-prep)") from None
    return manifest, sha256_bytes(data)


def read_inputs(cfg: FinetuneConfig, export: str) -> dict:
    """Everything the run reads before it starts, each file read once and checked: the export
    (read_export) and both manifests (read_manifest); and the run directory, made. main calls
    it before DeepSpeed starts, so a damaged export, a bad manifest or an unwritable run.output is
    one line in seconds (DeepSpeed's start took 10 s to 5 min here, building its CPU comm op)."""
    os.makedirs(os.path.join(cfg.run.output, "checkpoints"), exist_ok=True)
    return dict(export=read_export(export),
                manifests={s: read_manifest(f"data.{s}", getattr(cfg.data, s)) for s in ("train", "val")})


def finetune(cfg: FinetuneConfig, export: str, resume: str = "auto", inputs: dict | None = None) -> dict:
    """Fine-tune the export; ``inputs``: read_inputs(cfg, export), when the caller read them."""
    import deepspeed
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.loss import SoftTargetCrossEntropy

    from pipelines.checkpoints.store import complete_tags
    from pipelines.checkpoints.integrity import check_weights_only
    from pipelines.runtime.launch import init_distributed

    t_start = time.time()
    on_gpu = torch.cuda.is_available()
    rank, world = init_distributed(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    precision = resolve_precision(cfg, on_gpu)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    inputs = inputs or read_inputs(cfg, export)
    tensors, tconfig, meta, read = inputs["export"]
    if not read["verified"] and rank == 0:
        print(f"crossmae-eval finetune: {export}: warning: its export.json records no sha256 of model.safetensors "
              "(not written by crossmae-export): the weights are not verified", file=sys.stderr)
    size = Export(export, tconfig, meta).image_size
    read_manifests = inputs["manifests"]
    manifests = {s: m for s, (m, _) in read_manifests.items()}
    classes = manifests["train"].get("classes") or []
    if manifests["val"].get("classes", classes) != classes:
        raise config_loader.ConfigError("data.train and data.val have different class lists")
    try:
        num_classes = len(classes) or int(manifests["train"]["source"]["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise config_loader.ConfigError(f"data.train {cfg.data.train}: the manifest has neither classes nor "
                                        "source.num_classes") from None

    def loader(split: str, train: bool):
        lc = LoaderConfig(manifest=getattr(cfg.data, split), batch_size=cfg.deepspeed.micro_batch,
                          num_workers=cfg.data.num_workers, seed=cfg.run.seed, image_size=size, drop_last=train,
                          block_size=cfg.data.block_size, shard_cache_dir=cfg.data.shard_cache_dir,
                          shard_cache_bytes=cfg.data.shard_cache_bytes)
        return build_loader(lc, train=train, rank=rank, world_size=world)

    train_loader, val_loader = loader("train", True), loader("val", False)
    if manifests["train"].get("format") == "webdataset":
        # TODO(loaders): build_loader(transform=...) would avoid setting the attribute here
        train_loader.transform = FinetuneTrainTransform(size, cfg.augment.crop_scale, cfg.augment.randaug)
    elif cfg.augment.randaug or tuple(cfg.augment.crop_scale) != (0.2, 1.0):
        raise config_loader.ConfigError("FFCV shards: augment.randaug='' and augment.crop_scale=[0.2,1.0] only "
                                        "(FFCV crops in its own pipeline)")

    torch.manual_seed(cfg.run.seed)  # identical head init on every rank
    model = build_model(tconfig, tensors, num_classes, cfg).to(device)
    spe = max(1, len(train_loader) // cfg.deepspeed.grad_accum)  # optimizer steps per epoch
    derived = dict(world_size=world, effective_batch=cfg.effective_batch(world), lr=cfg.learning_rate(world),
                   steps_per_epoch=spe, total_steps=cfg.optim.epochs * spe, warmup_steps=cfg.optim.warmup_epochs * spe,
                   num_classes=num_classes, image_size=size)
    ds_config = deepspeed_config(cfg, world, on_gpu)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
                                  lr=derived["lr"], betas=tuple(cfg.optim.betas), fused=on_gpu or None)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    # the scales as the (ZeRO-wrapped) optimizer holds them: set_lr reads them from here
    derived["lr_scales"] = sorted({round(g.get("lr_scale", 1.0), 8) for g in optimizer.param_groups})
    torch.manual_seed(cfg.run.seed * 1000 + rank + 1)  # drop path, erasing, mixup differ per rank (MAE)
    np.random.seed(cfg.run.seed * 1000 + rank + 1)
    random.seed(cfg.run.seed * 1000 + rank + 1)

    a = cfg.augment
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                  mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=num_classes) \
        if a.mixup > 0 or a.cutmix > 0 else None
    erase = RandomErasing(a.reprob, mode="pixel", max_count=1, device=device) if a.reprob > 0 else None
    soft_ce = SoftTargetCrossEntropy()

    out = cfg.run.output
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    if rank == 0:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(config_loader.to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(out, "deepspeed.json"), "w") as f:
            json.dump(dict(ds_config, derived=derived), f, indent=1)

    epoch, step, best, history = 0, 0, 0.0, []
    tags = complete_tags(out) if resume == "auto" else []
    if tags:
        check_weights_only(os.path.join(out, "checkpoints", tags[-1]))  # DeepSpeed unpickles with weights_only=False
        _, client = engine.load_checkpoint(os.path.join(out, "checkpoints"), tags[-1])
        epoch, step, best, history = client["epoch"], client["step"], client["best_top1"], client["history"]
        train_loader.load_state_dict(client["loader"])
        if rank == 0:
            print(f"resumed from {tags[-1]} at epoch {epoch}", file=sys.stderr)

    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if rank == 0 else None
    last_epoch = min(cfg.optim.epochs, cfg.run.max_epochs or cfg.optim.epochs)
    result = history[-1] if history else {}
    while epoch < last_epoch:
        t0, losses = time.perf_counter(), []
        for micro, batch in enumerate(train_loader):
            if micro >= spe * cfg.deepspeed.grad_accum:  # a partial accumulation at the epoch's end
                continue
            if micro % cfg.deepspeed.grad_accum == 0:
                lr = lr_at(step, derived["lr"], derived["warmup_steps"], derived["total_steps"], cfg.optim.min_lr)
                set_lr(optimizer, lr)
            x, y = normalize_batch(batch["image"], device, dtype), batch["label"].to(device)
            if erase:
                x = erase(x)
            if mixup:
                x, target = mixup(x, y)
                loss = soft_ce(engine(x).float(), target)
            else:
                loss = F.cross_entropy(engine(x).float(), y, label_smoothing=a.smoothing)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if (micro + 1) % cfg.deepspeed.grad_accum == 0:
                step += 1
                if metrics and step % cfg.run.log_every == 0:
                    metrics.write(json.dumps(dict(step=step, epoch=epoch, loss=losses[-1], lr=lr)) + "\n")
        epoch += 1
        row = dict(epoch=epoch, step=step, train_loss=sum(losses) / max(1, len(losses)),
                   seconds=round(time.perf_counter() - t0, 3))
        if epoch % cfg.run.eval_every == 0 or epoch == last_epoch:
            row.update(evaluate(engine, val_loader, device, dtype))
            best = max(best, row["top1"])
            row["best_top1"] = best
            result = row
        history.append(row)
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            print(f"epoch {epoch}/{last_epoch} loss {row['train_loss']:.4f} top1 {row.get('top1', float('nan')):.2f} "
                  f"top5 {row.get('top5', float('nan')):.2f} ({row['seconds']} s)", file=sys.stderr)
        if cfg.run.save_every and (epoch % cfg.run.save_every == 0 or epoch == last_epoch):
            _save(engine, out, epoch, dict(epoch=epoch, step=step, best_top1=best, history=history,
                                           loader=train_loader.state_dict()), rank)
    if metrics:
        metrics.close()

    summary = dict(job="finetune", metrics=dict(top1=result.get("top1"), top5=result.get("top5"), best_top1=best,
                                                epochs=epoch),
                   export=export, tag=meta.get("tag"), step=meta.get("step"),
                   weights_sha256=read["weights_sha256"], read_sha256=read["sha256"], verified=read["verified"],
                   dataset={s: dict(manifest=getattr(cfg.data, s), sha256=read_manifests[s][1],
                                    num_samples=manifests[s].get("num_samples")) for s in ("train", "val")},
                   config=config_loader.to_dict(cfg), derived=derived, output=out,
                   seconds=round(time.time() - t_start, 1),
                   time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if rank == 0:
        storage.write_bytes(storage.join(export, "eval", "finetune.json"), json.dumps(summary, indent=1).encode())
    distributed.barrier()
    return summary


def _save(engine, out: str, epoch: int, client: dict, rank: int) -> None:
    """DeepSpeed checkpoint at an epoch boundary; COMPLETE once every rank saved; older ones removed."""
    root, tag = os.path.join(out, "checkpoints"), f"epoch{epoch:04d}"
    engine.save_checkpoint(root, tag=tag, client_state=client)
    distributed.barrier()
    if rank == 0:
        with open(os.path.join(root, tag, "COMPLETE"), "w") as f:
            f.write(str(epoch))
        for old in os.listdir(root):
            if old != tag and os.path.isdir(os.path.join(root, old)):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    distributed.barrier()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (main), not argparse's usage block
        raise config_loader.ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="crossmae-eval finetune", description="End-to-end fine-tuning of an export")
    ap.add_argument("export", help="export directory or prefix (model.safetensors, config.json, export.json)")
    ap.add_argument("--config", help="YAML config (sections: model, data, optim, augment, deepspeed, run)")
    ap.add_argument("--resume", default="auto", choices=["auto", "none"])
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=50")
    try:
        args = ap.parse_args(argv)
        cfg = config_loader.load(FinetuneConfig, args.config, args.overrides)
        cfg.validate()
        for url in (*(storage.join(args.export, n) for n in ("export.json", "model.safetensors")), cfg.data.train,
                    cfg.data.val):
            if not storage.exists(url):
                raise config_loader.ConfigError(f"not found: {url}")
        finetune(cfg, args.export, args.resume, read_inputs(cfg, args.export))
    except (config_loader.ConfigError, storage.StorageError, *BAD_EXPORT) as e:
        print(f"crossmae-eval finetune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - OS / library errors (disk full, DeepSpeed): one line, not a traceback
        print(f"crossmae-eval finetune: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0

