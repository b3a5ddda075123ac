"""Linear probe, MAE's protocol (``main_linprobe.py``): frozen encoder, the class token (or the
average-pooled patch tokens) -> BatchNorm1d without affine (eps 1e-6) -> Linear, weights
trunc-normal std 0.01; LARS (or SGD with momentum), no weight decay, lr = blr x batch / 256,
linear warmup then half-cosine per step; cross-entropy.

By default the head trains on the cached frozen features of the eval transform (computed once,
pipelines/eval/knn.py): with the encoder frozen, an epoch over cached features is exactly an epoch
over the images with that transform, at the cost of one linear layer instead of one encoder
pass per sample. MAE's probe augments with RandomResizedCrop + flip; ``augment=True`` runs the
encoder every epoch on the loader's training augmentation (the MAE pretraining crop, scale
0.2-1) instead: far slower on a CPU, the faithful choice on GPUs.

Small training sets: MAE's batch of 16,384 makes an epoch one step on a 1,500-image set, and a
head evaluated with BatchNorm running statistics that had 30 momentum updates (class-token
features have mean/std about 13) scored 29.7% top-1 where the same features give 89% with
batch 256. So (1) the default batch is MAE's capped to at least ``MIN_STEPS_PER_EPOCH`` steps per
epoch (MAE's holds from 8 x 16,384 = 131k samples: ImageNet-1k), LARS only at MAE's batch, SGD
below it (LARS' trust ratio makes too-small steps with a few hundred steps: 25% on the digits
after 90 epochs); (2) the BatchNorm statistics are the exact mean/variance of the whole training
feature set, set before training (so running statistics are right after any number of steps)
and again after it on cached features (the population every batch was drawn from).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from pipelines.eval.knn import topk_accuracy


MAE_BATCH = 16384  # MAE main_linprobe.py: 16,384 (512 x 32 GPUs)
MIN_STEPS_PER_EPOCH = 8  # digits (1,500 train), 30 epochs SGD: 1 step/epoch 82.8%, 2: 86.5%, 8: 88.9%, 16: 88.9%


@dataclass
class ProbeConfig:
    pool: str = "cls"  # MAE: the class token; "avg" for the average-pooled patch tokens
    epochs: int = 90  # MAE ViT-B/L: 90
    batch_size: int | None = None  # None: MAE's 16,384, capped to MIN_STEPS_PER_EPOCH steps per epoch
    blr: float = 0.1  # MAE: base lr 0.1; lr = blr x batch / 256
    lr: float | None = None  # absolute lr; overrides blr
    warmup_epochs: int = 10
    optimizer: str = "auto"  # auto: LARS at MAE's batch, SGD (momentum 0.9) below it; or "lars" | "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0  # MAE: 0
    seed: int = 0
    augment: bool = False  # run the encoder per epoch on augmented images (see module doc)

    def __post_init__(self):
        if self.pool not in ("cls", "avg") or self.optimizer not in ("auto", "lars", "sgd"):
            raise ValueError(f"pool must be cls|avg and optimizer auto|lars|sgd, not {self.pool!r}, {self.optimizer!r}")
        if self.epochs < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("epochs and batch size must be positive")
        if not all(x > 0 and math.isfinite(x) for x in (self.blr, self.lr if self.lr is not None else 1.0)):
            raise ValueError(f"blr and lr must be finite and > 0, not {self.blr}, {self.lr}")
        if self.warmup_epochs < 0 or self.seed < 0 or not (0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ValueError("warmup epochs, seed and weight decay must be >= 0, momentum in [0, 1)")

    def resolve(self, num_train: int) -> tuple[int, str, str | None]:
        """(probe batch, optimizer, a warning or None) for a training set of ``num_train``
        samples: an explicit batch is capped to the set; the default one is MAE's where the set
        allows MIN_STEPS_PER_EPOCH steps per epoch, else the batch that gives that many."""
        if self.batch_size is not None:
            batch = min(self.batch_size, num_train)
            warn = None if num_train // batch >= MIN_STEPS_PER_EPOCH else (
                f"probe batch {batch} gives {math.ceil(num_train / batch)} step(s) per epoch on {num_train} "
                f"training samples: BatchNorm and the head see few updates (the default batch gives "
                f">= {MIN_STEPS_PER_EPOCH})")
        else:
            batch = min(MAE_BATCH, math.ceil(num_train / MIN_STEPS_PER_EPOCH))
            warn = None if batch == MAE_BATCH else (
                f"probe batch {batch}, not MAE's {MAE_BATCH}: {num_train} training samples, "
                f"{MIN_STEPS_PER_EPOCH} steps per epoch (--probe-batch sets it)")
        optimizer = self.optimizer if self.optimizer != "auto" else "lars" if batch >= MAE_BATCH else "sgd"
        return batch, optimizer, warn


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


@torch.no_grad()
def set_bn_statistics(head: torch.nn.Sequential, x: torch.Tensor) -> None:
    """The head's BatchNorm running mean/variance := the exact statistics of all of ``x``
    (float64 sums; unbiased variance, as BatchNorm's running estimate)."""
    bn, x = head[0], x.double()
    bn.running_mean.copy_(x.mean(0))
    bn.running_var.copy_(x.var(0) if len(x) > 1 else torch.ones(x.shape[1]))


def lr_at(step: float, total: int, warmup: int, lr: float) -> float:
    """Linear warmup, then half-cosine to 0 (MAE util/lr_sched.py, per step)."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_head(train_x: torch.Tensor, num_classes: int,
               epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               steps_per_epoch: int, batch: int, optimizer: str, cfg: ProbeConfig) -> tuple[torch.nn.Module, dict]:
    """Train the head on the (features, labels) batches ``epoch_batches(epoch)`` yields; its
    BatchNorm starts from the statistics of ``train_x`` (the whole training feature set)."""
    torch.manual_seed(cfg.seed)
    head = make_head(train_x.shape[1], num_classes)
    set_bn_statistics(head, train_x)
    lr = cfg.lr if cfg.lr is not None else cfg.blr * batch / 256
    opt = (LARS(head.parameters(), lr, cfg.weight_decay, cfg.momentum) if optimizer == "lars" else
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
          steps_per_epoch: int | None = None, batch: int | None = None) -> tuple[dict, dict]:
    """(metrics, hyper-parameters) of a probe trained on cached features (or on ``epoch_batches``
    of ``batch`` samples when augmenting): val top1/top5, train top1 on the cached
    eval-transform features; the probe batch, optimizer, lr, epochs and steps really used."""
    resolved, optimizer, _ = cfg.resolve(len(train_x))
    batch = batch or resolved
    cached = epoch_batches is None
    if cached:
        epoch_batches, steps_per_epoch = cached_batches(train_x, train_y, batch, cfg.seed), math.ceil(len(train_x) / batch)
    head, info = train_head(train_x, num_classes, epoch_batches, steps_per_epoch, batch, optimizer, cfg)
    if cached:  # the batches' population exactly: what MAE's running estimate approaches on large sets
        set_bn_statistics(head, train_x)
    metrics = evaluate_head(head, val_x, val_y)
    metrics["train_top1"] = evaluate_head(head, train_x, train_y)["top1"]
    metrics["final_loss"] = info.pop("final_loss")
    hparams = dict(pool=cfg.pool, batch=batch, batch_requested=cfg.batch_size, optimizer=optimizer, lr=info["lr"],
                   blr=cfg.blr if cfg.lr is None else None, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                   steps_per_epoch=steps_per_epoch, steps=info["steps"], momentum=cfg.momentum,
                   weight_decay=cfg.weight_decay, seed=cfg.seed, augment=not cached,
                   bn_statistics=f"training features ({len(train_x)} samples)" + ("" if cached else ", then running"))
    return metrics, hparams

