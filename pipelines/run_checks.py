"""Checks the trainer makes before it writes or loads anything, and what it says when a run's
settings change between launches: one line each, naming the numbers."""
from __future__ import annotations

import os

import yaml

from . import config as config_loader
from . import distributed, storage

# Settings a checkpoint's weights, loader position and file layout depend on: a resume must not
# change them (another world size is fine: pipelines/reshard.py converts).
RESUME_FIXED = ("model.", "data.image_size", "deepspeed.zero_stage")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _saved_config(cfg) -> dict | None:
    """The run's config.yaml as the checkpoint's run wrote it: local, else in the store."""
    local = os.path.join(cfg.run.output, "config.yaml")
    if os.path.exists(local):
        with open(local) as f:
            return yaml.safe_load(f)
    if cfg.run.store and storage.exists(storage.join(cfg.run.store, "config.yaml")):
        return yaml.safe_load(storage.read_bytes(storage.join(cfg.run.store, "config.yaml")))
    return None


def resume_config_differences(cfg, saved: dict) -> list[str]:
    """``key: saved -> asked`` for every model / data setting that differs. Keys the saved config
    lacks (added to the project after that run started) are not differences."""
    now, before = _flatten(config_loader.to_dict(cfg)), _flatten(saved)
    keys = sorted(k for k in before if k.startswith(RESUME_FIXED))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def check_resume_config(cfg, ckpt_root: str, tag: str, rank: int) -> None:
    """Rank 0 compares the config asked for with the one the checkpoint's run saved; every rank
    raises the same one-line ConfigError when they differ (before anything is written)."""
    message = None
    if rank == 0:
        saved = _saved_config(cfg)
        diffs = resume_config_differences(cfg, saved) if saved else []
        if diffs:
            message = (f"cannot resume {tag} from {cfg.run.output}: its run used other settings ("
                       + "; ".join(diffs) + "); use another run.output, or --resume none to start over")
    message = distributed.broadcast_object(message, src=0)
    if message:
        raise config_loader.ConfigError(message)


def describe_schedule_change(client: dict, derived: dict, samples: int) -> list[str]:
    """Lines to print when the effective batch differs from the checkpoint's (another world size
    or micro batch): the peak lr follows the batch, the schedule continues in samples."""
    before = client.get("effective_batch")
    if before is None or before == derived["effective_batch"]:
        return []
    lines = [f"resume: effective batch {before} -> {derived['effective_batch']} "
             f"(world size {client.get('world_size', '?')} -> {derived['world_size']})"]
    if client.get("lr") is not None and abs(client["lr"] - derived["lr"]) > 1e-12:
        lines.append(f"resume: peak lr {client['lr']:.4g} -> {derived['lr']:.4g} (optim.blr x effective batch / 256; "
                     "set optim.lr to keep it)")
    lines.append(f"resume: the schedule continues in samples: {samples} of {derived['total_samples']} seen, "
                 f"warm-up ends at sample {derived['warmup_samples']}")
    return lines


def short_run_warning(cfg, derived: dict, step: int) -> str | None:
    """A run whose max_steps ends inside the warm-up barely trains: say which lr it reaches."""
    from .optim import lr_at

    end = derived["max_steps"]
    if not derived["warmup_steps"] or end >= derived["warmup_steps"]:
        return None
    reached = lr_at(end * derived["effective_batch"], derived["lr"], derived["warmup_samples"],
                    derived["total_samples"], cfg.optim.min_lr)
    return (f"crossmae-pretrain: note: the run stops at step {end}, inside the {derived['warmup_steps']}-step warm-up "
            f"(optim.warmup_epochs={cfg.optim.warmup_epochs}): the lr only reaches {reached:.3g} of its peak "
            f"{derived['lr']:.3g}; for a short run set optim.epochs / optim.warmup_epochs to fit run.max_steps")
