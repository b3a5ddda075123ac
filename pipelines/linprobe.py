"""Linear probe, MAE's protocol (``main_linprobe.py``): frozen encoder, the class token (or the
average-pooled patch tokens) -> BatchNorm1d without affine (eps 1e-6) -> Linear, weights
trunc-normal std 0.01; LARS (or SGD with momentum), no weight decay, lr = blr x batch / 256,
linear warmup then half-cosine per step; cross-entropy.

By default the head trains on the cached frozen features of the eval transform (computed once,
pipelines/knn.py): with the encoder frozen, an epoch over cached features is exactly an epoch
over the images with that transform, at the cost of one linear layer instead of one encoder
pass per sample. MAE's probe augments with RandomResizedCrop + flip; ``augment=True`` runs the
encoder every epoch on the loader's training augmentation (the MAE pretraining crop, scale
0.2-1) instead: far slower on a CPU, the faithful choice on GPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .knn import topk_accuracy


@dataclass
class ProbeConfig:
    pool: str = "cls"  # MAE: the class token; "avg" for the average-pooled patch tokens
    epochs: int = 90  # MAE ViT-B/L: 90
    batch_size: int = 16384  # MAE: 16384 (the effective batch is at most the training set)
    blr: float = 0.1  # MAE: base lr 0.1; lr = blr x batch / 256
    lr: float | None = None  # absolute lr; overrides blr
    warmup_epochs: int = 10
    optimizer: str = "lars"  # or "sgd" (momentum 0.9)
    momentum: float = 0.9
    weight_decay: float = 0.0  # MAE: 0
    seed: int = 0
    augment: bool = False  # run the encoder per epoch on augmented images (see module doc)

    def __post_init__(self):
        if self.pool not in ("cls", "avg") or self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"pool must be cls|avg and optimizer lars|sgd, not {self.pool!r}, {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be positive")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of every weight matrix is scaled by the trust ratio
    eta ||w|| / ||g + wd w|| (You et al. 2017); 1-d parameters (biases, norms) take plain steps,
    as in MAE's util/lars.py."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, 1.0)
                    d = d.mul(trust)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


def make_head(dim: int, num_classes: int) -> torch.nn.Sequential:
    linear = torch.nn.Linear(dim, num_classes)
    torch.nn.init.trunc_normal_(linear.weight, std=0.01)
    torch.nn.init.zeros_(linear.bias)
    return torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def lr_at(step: float, total: int, warmup: int, lr: float) -> float:
    """Linear warmup, then half-cosine to 0 (MAE util/lr_sched.py, per step)."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_head(dim: int, num_classes: int, epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               steps_per_epoch: int, num_train: int, cfg: ProbeConfig) -> tuple[torch.nn.Module, dict]:
    """Train the head on the (features, labels) batches ``epoch_batches(epoch)`` yields."""
    torch.manual_seed(cfg.seed)
    head = make_head(dim, num_classes)
    lr = cfg.lr if cfg.lr is not None else cfg.blr * min(cfg.batch_size, num_train) / 256
    opt = (LARS(head.parameters(), lr, cfg.weight_decay, cfg.momentum) if cfg.optimizer == "lars" else
           torch.optim.SGD(head.parameters(), lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
    total, warmup, step, loss = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, 0, float("nan")
    head.train()
    for epoch in range(cfg.epochs):
        for x, y in epoch_batches(epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, lr)
            loss_t = F.cross_entropy(head(x.float()), y)
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            opt.step()
            step, loss = step + 1, loss_t.item()
    return head.eval(), dict(lr=lr, steps=step, final_loss=round(loss, 5))


def cached_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """epoch -> seeded random minibatches of in-memory features (MAE drops no last batch here:
    on small sets a dropped remainder would be a visible share of the data)."""
    def batches(epoch: int):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for start in range(0, len(x), batch_size):
            i = order[start:start + batch_size]
            yield x[i], y[i]
    return batches


@torch.no_grad()
def evaluate_head(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {k: round(v, 4) for k, v in topk_accuracy(head(x.float()), y).items()}


def probe(train_x, train_y, val_x, val_y, num_classes: int, cfg: ProbeConfig, epoch_batches=None,
          steps_per_epoch: int | None = None) -> dict:
    """Metrics of a probe trained on cached features (or on ``epoch_batches`` when augmenting):
    val top1/top5, train top1 on the cached eval-transform features, and the schedule used."""
    bs = min(cfg.batch_size, len(train_x))
    if epoch_batches is None:
        epoch_batches, steps_per_epoch = cached_batches(train_x, train_y, bs, cfg.seed), math.ceil(len(train_x) / bs)
    head, info = train_head(train_x.shape[1], num_classes, epoch_batches, steps_per_epoch, len(train_x), cfg)
    metrics = evaluate_head(head, val_x, val_y)
    metrics["train_top1"] = evaluate_head(head, train_x, train_y)["top1"]
    return dict(metrics, **info)

