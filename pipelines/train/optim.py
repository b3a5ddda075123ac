"""Optimizer and schedule, built by the project so the same code runs on CPU and GPU: torch
AdamW (fused on CUDA) handed to ``deepspeed.initialize``, and the per-iteration schedule."""
from __future__ import annotations

import math

import torch


# What this project exempted before 2026-12-02 (optim.decay_tokens=false): the tokens and the
# position tables. Runs started then keep it on resume: their optimizer state has those groups.
OLD_NO_DECAY = frozenset({"encoder.cls_token", "encoder.pos_embed", "decoder.mask_token", "decoder.decoder_pos_embed"})


def param_groups(model: torch.nn.Module, weight_decay: float, decay_tokens: bool = True) -> list[dict]:
    """The released rule (CrossMAE's and MAE's main_pretrain call timm's
    ``param_groups_weight_decay`` / ``add_weight_decay`` with no skip list): no decay on biases
    and 1-D parameters (norms); every other trainable tensor decays, the cls and mask tokens
    (1, 1, D) and the fusion weight included. The sin-cos position tables are frozen: not trained.
    ``decay_tokens=False``: this project's earlier rule (tokens exempt), for runs that began with it."""
    skip = set() if decay_tokens else OLD_NO_DECAY
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    decay_tokens: bool = True):
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay, decay_tokens), lr=lr, betas=tuple(betas),
                             fused=fused or None)


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0, then half-cosine to ``min_lr``, per iteration (MAE's lr_sched)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr: float) -> None:
    """Set every group's lr; groups with an ``lr_scale`` (layer-wise decay, fine-tuning) get lr x scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
