"""Resume a DeepSpeed run with another world size, through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer shard per data-parallel rank (``zero_pp_rank_<r>_...``), and
``engine.load_checkpoint`` refuses another world size ("Automatic adjustment of ZeRO's optimizer
state partitioning with a new world size is not currently supported"). DeepSpeed's converter
(``deepspeed.checkpoint.ds_to_universal``) rewrites the shards as one file per parameter and
state (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``); an engine built with
``"checkpoint": {"load_universal": true}`` re-partitions them for any world size, keeping the fp32
master weights and Adam's moments and step. Tested on CPU (gloo) for ZeRO 1, 2 and 3, 2 -> 1 and
1 -> 2 ranks (tests/pipelines/test_reshard.py).

    plan = prepare_resume(root, tag, world_size)      # converts once when the world size changed
    ds_config.update(plan.ds_config_patch)            # before deepspeed.initialize
    client = load_checkpoint(engine, plan)            # the client state (step, loader) comes along
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field

import torch

MARKER = "UNIVERSAL"  # written inside a converted tag before it is published by rename
_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def saved_world_size(tag_dir: str) -> int | None:
    """Data-parallel ranks that wrote the checkpoint: its optimizer shard files. None for ZeRO-0
    (one unsharded optimizer state, which any world size loads as it is)."""
    ranks = {int(m.group(1)) for name in os.listdir(tag_dir) if (m := _SHARD.fullmatch(name))}
    return len(ranks) or None


def universal_root(ckpt_root: str) -> str:
    """Converted tags live beside the checkpoints (``checkpoints_universal/<tag>``), never inside:
    the trainer reads every directory under ``checkpoints/`` as a resumable step."""
    return os.path.normpath(ckpt_root) + "_universal"


def to_universal(ckpt_root: str, tag: str, out_root: str | None = None) -> str:
    """Convert ``ckpt_root/tag`` to a universal checkpoint at ``out_root/tag`` and return its path.

    Idempotent and atomic: built in a private staging directory, marked, then renamed into place,
    so a crash or a concurrent converter (two nodes on one shared filesystem) never leaves a
    half-written tag that looks usable. The copied ``mp_rank_*_model_states.pt`` keeps the
    client state (step, loader position)."""
    from deepspeed.checkpoint import ds_to_universal

    out_root = out_root or universal_root(ckpt_root)
    dst = os.path.join(out_root, tag)
    if os.path.exists(os.path.join(dst, MARKER)):
        return dst
    os.makedirs(out_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{tag}.{socket.gethostname()}.", dir=out_root)
    try:
        built = os.path.join(staging, tag)  # the converter writes <staging>/latest_universal: discarded
        args = argparse.Namespace(input_folder=os.path.join(ckpt_root, tag), output_folder=built,
                                  num_extract_workers=1, num_merge_workers=1,  # no process pool inside a rank
                                  keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)  # the info Megatron adds; a plain model has none
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its prints and progress bars
            ds_to_universal.main(args)  # errors still raise
        with open(os.path.join(built, MARKER), "w") as f:
            f.write(tag)
        if os.path.isdir(dst) and not os.path.exists(os.path.join(dst, MARKER)):
            shutil.rmtree(dst)  # an unmarked leftover (copied by hand, or interrupted before this scheme)
        try:
            os.rename(built, dst)
        except OSError:
            if not os.path.exists(os.path.join(dst, MARKER)):  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


@dataclass
class ResumePlan:
    load_dir: str  # pass to engine.load_checkpoint(load_dir, tag)
    tag: str
    saved_world_size: int | None  # None: ZeRO-0, no shards
    ds_config_patch: dict = field(default_factory=dict)  # merge into the DeepSpeed config before initialize

    @property
    def universal(self) -> bool:
        return bool(self.ds_config_patch)


def prepare_resume(ckpt_root: str, tag: str, world_size: int, convert: bool = True) -> ResumePlan:
    """What to load for a resume at ``world_size``: the tag itself when the world size is the one
    that saved it, else its universal conversion (made here when ``convert``; call with
    ``convert`` on one rank per filesystem and barrier after) plus the config switch to read it."""
    saved = saved_world_size(os.path.join(ckpt_root, tag))
    if saved is None or saved == world_size:
        return ResumePlan(ckpt_root, tag, saved)
    out_root = universal_root(ckpt_root)
    if convert:
        to_universal(ckpt_root, tag, out_root)
        for old in os.listdir(out_root):  # one converted tag is enough: drop older ones
            if old != tag and not old.startswith("."):
                shutil.rmtree(os.path.join(out_root, old), ignore_errors=True)
    return ResumePlan(out_root, tag, saved, {"checkpoint": {"load_universal": True}})


def load_checkpoint(engine, plan: ResumePlan) -> dict:
    """``engine.load_checkpoint`` for the plan; returns the client state. DeepSpeed 0.19.8's ZeRO-3
    universal load copies param group 0's hyper-parameters into every group
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` reads ``param_groups[0]``), so the
    no-decay group (biases, norms, tokens) would decay at 0.05: each group's own values are put back
    from the converted optimizer state."""
    _, client = engine.load_checkpoint(plan.load_dir, plan.tag)
    if plan.universal and engine.zero_optimization_stage() == 3:
        path = os.path.join(plan.load_dir, plan.tag, "zero", "optimizer_state.pt")
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["param_groups"]
        groups = engine.optimizer.optimizer.param_groups
        assert len(groups) == len(saved), f"{len(saved)} param groups saved, {len(groups)} built"
        for group, values in zip(groups, saved):
            group.update({k: v for k, v in values.items() if k != "params"})
    return client
