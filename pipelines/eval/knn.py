"""Frozen features of an exported encoder (computed once, cached) and the k-NN classifier.

Features: the encoder's output tokens for the deterministic eval transform (resize to
size/0.875, center crop); ``avg`` = mean of the patch tokens, ``cls`` = the class token, both
kept raw (the k-NN normalises them, the linear probe's BatchNorm standardises them). They are
stored as float16 (ImageNet-1k train at ViT-B: 2 x 1.28M x 768 x 2 B = 3.9 GB; float32 where
float16 would overflow), and a fresh run uses the same rounded values, so a cached run gives
exactly the fresh run's numbers.

k-NN as DINO's ``eval_knn.py``: cosine similarity of L2-normalised
features, the k most similar training samples vote with weight exp(sim / T), T = 0.07.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines import storage
from pipelines.data.transforms import normalize_batch

KS = (10, 20, 100)  # reported
HEADLINE_K = 20  # the headline top-1 (DINO, MAE): always computed, whatever --k asks
TEMPERATURE = 0.07


@dataclass
class Features:
    avg: torch.Tensor  # (N, D) float16 (float32 where float16 overflows), mean of patch tokens
    cls: torch.Tensor  # (N, D) the class token, same dtype
    label: torch.Tensor  # (N,) int64
    index: torch.Tensor  # (N,) int64: position in the loader's epoch order (each sample once)
    corrupt: int = 0  # samples the loader replaced (counted, never silently dropped)

    def get(self, pool: str) -> torch.Tensor:
        return getattr(self, pool)


def encode(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, S, S) -> (avg, cls) float32 on the CPU, (B, D) each."""
    x = normalize_batch(images, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tokens = encoder.forward_features(x)  # (B, prefix + L, D), after the encoder's final norm (if any)
    prefix = encoder.num_prefix_tokens
    return tokens[:, prefix:].mean(1).float().cpu(), tokens[:, 0].float().cpu()


def keep_once(batch: dict, seen: set) -> torch.Tensor:
    """Boolean mask of the batch's samples not counted before: the loader's ``valid`` mask
    where it has one, else drop repeated ``index`` values (evaluation pads the last batch)."""
    n = len(batch["label"])
    keep = batch["valid"].bool().clone() if batch.get("valid") is not None else torch.ones(n, dtype=torch.bool)
    if "index" in batch:
        for i, g in enumerate(batch["index"].tolist()):
            keep[i] = keep[i] and g not in seen
            seen.add(g)
    return keep


@torch.no_grad()
def extract(encoder, manifest: str, image_size: int, batch_size: int, num_workers: int, device: torch.device,
            progress: str | None = None) -> Features:
    """Features of every sample of the manifest's split, each exactly once, in index order."""
    from tqdm import tqdm

    from pipelines.data.factory import LoaderConfig, build_loader  # lazy: `crossmae-eval report` needs no loader

    loader = build_loader(LoaderConfig(manifest=manifest, batch_size=batch_size, num_workers=num_workers,
                                       image_size=image_size, drop_last=False), train=False)
    encoder.eval().to(device)
    avg, cls, labels, index, seen, offset = [], [], [], [], set(), 0
    for batch in tqdm(loader, desc=progress, disable=progress is None or not sys.stderr.isatty(), leave=False):
        keep = keep_once(batch, seen)
        a, c = encode(encoder, batch["image"], device)
        avg.append(a[keep])
        cls.append(c[keep])
        labels.append(batch["label"][keep])
        idx = batch["index"] if "index" in batch else torch.arange(offset, offset + len(keep))  # FFCV: sequential
        index.append(idx[keep])
        offset += len(keep)
    order = torch.cat(index).argsort()
    stats = getattr(loader, "stats", {})
    return Features(storable(torch.cat(avg)[order]), storable(torch.cat(cls)[order]), torch.cat(labels)[order],
                    torch.cat(index)[order], int(sum(v for k, v in stats.items() if k != "samples")))


def storable(x: torch.Tensor) -> torch.Tensor:
    """float16, unless a value would overflow it (encoders without a final norm can have large
    activations): then float32."""
    half = x.half()
    return half if torch.isfinite(half).all() else x


def save_features(url: str, feats: Features, meta: dict) -> None:
    from safetensors.torch import save

    tensors = dict(avg=feats.avg, cls=feats.cls, label=feats.label, index=feats.index)
    storage.write_bytes(url, save(tensors, metadata=dict(meta=json.dumps(dict(meta, corrupt=feats.corrupt)))))


def load_features(url: str) -> Features:
    from safetensors.torch import load

    data = storage.read_bytes(url)
    t = load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 length + JSON
    meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    return Features(t["avg"], t["cls"], t["label"], t["index"], int(meta.get("corrupt", 0)))


@torch.no_grad()
def knn_classify(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                 ks=KS, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Class scores (len(ks), N_test, C): for each k, the sum of exp(cos / T) over the test
    sample's k nearest training samples, per class. Features are L2-normalised here."""
    if not temperature > 0:  # T <= 0 or NaN: every weight inf or NaN, a meaningless vote
        raise ValueError(f"k-NN temperature must be > 0, not {temperature}")
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    kmax = min(max(ks), len(train))
    out = torch.zeros(len(ks), len(test), num_classes)
    for start in range(0, len(test), chunk):
        sim, nn = (test[start:start + chunk] @ train.T).topk(kmax, dim=1)  # sorted: the top k are the first k
        weight, votes = (sim / temperature).exp(), F.one_hot(train_labels[nn], num_classes).float()
        for i, k in enumerate(ks):
            k = min(k, kmax)
            out[i, start:start + chunk] = (votes[:, :k] * weight[:, :k, None]).sum(1)
    return out


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{'top1': %, 'top5': %} of (N, C) scores (top-k with k >= C is 100%)."""
    ranked = scores.sort(dim=1, descending=True, stable=True).indices  # ties: lower class first
    return {f"top{k}": 100.0 * (ranked[:, :k] == labels[:, None]).any(1).float().mean().item() for k in ks}


def effective_ks(ks, num_train: int) -> tuple[int, ...]:
    """The k values a training set of ``num_train`` samples can answer, always with the headline
    k: each k capped to the set (a larger k is the whole set voting), deduplicated, sorted."""
    return tuple(sorted({min(k, num_train) for k in (*ks, HEADLINE_K)}))


def knn_metrics(train: Features, val: Features, num_classes: int, ks=KS, temperature: float = TEMPERATURE) -> dict:
    """Flat metrics: ``{pool}_k{k}_top{1,5}`` for pool in (avg, cls) and every k of
    ``effective_ks`` (named by the k really used), and the headline ``top1``/``top5``: always
    avg pooling, k = 20 (or the whole training set where it is smaller), whatever ``ks`` holds,
    so one report column never mixes protocols."""
    ks, metrics = effective_ks(ks, len(train.label)), {}
    for pool in ("avg", "cls"):
        scores = knn_classify(train.get(pool), train.label, val.get(pool), num_classes, ks, temperature)
        for k, s in zip(ks, scores):
            for name, v in topk_accuracy(s, val.label).items():
                metrics[f"{pool}_k{k}_{name}"] = round(v, 4)
    headline = min(HEADLINE_K, len(train.label))
    metrics.update(top1=metrics[f"avg_k{headline}_top1"], top5=metrics[f"avg_k{headline}_top5"])
    return metrics
