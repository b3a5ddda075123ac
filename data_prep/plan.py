"""The deterministic plan: which sample goes into which shard.

Computed from the sorted source listing and the seed alone, so every worker on every
machine derives the same plan without talking to the others: samples are globally
shuffled (the archives are grouped by class; loaders rely on pre-shuffled shards), then cut
into consecutive shards by target bytes or sample count. Shard i belongs to worker
i mod num_workers.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shard:
    index: int
    name: str  # "{split}-{index:06d}.tar"
    items: tuple[int, ...]  # indices into the listing's items, in shard order


def shard_name(split: str, index: int, ext: str = "tar") -> str:
    return f"{split}-{index:06d}.{ext}"


def make_plan(sizes: list[int], split: str, seed: int, shard_bytes: int | None = None,
              shard_samples: int | None = None) -> list[Shard]:
    """Shuffle item indices with ``seed``, then cut: a shard closes when it reaches
    ``shard_samples`` items or ``shard_bytes`` of stored image bytes."""
    if not sizes:
        return []
    if not shard_bytes and not shard_samples:
        raise ValueError("give shard_bytes or shard_samples")
    order = np.random.default_rng(seed).permutation(len(sizes)).tolist()
    shards, current, current_bytes = [], [], 0
    for i in order:
        current.append(i)
        current_bytes += sizes[i]
        if (shard_samples and len(current) >= shard_samples) or (shard_bytes and current_bytes >= shard_bytes):
            shards.append(current)
            current, current_bytes = [], 0
    if current:
        shards.append(current)
    return [Shard(k, shard_name(split, k), tuple(s)) for k, s in enumerate(shards)]


def plan_digest(keys: list[str], shards: list[Shard], options: dict) -> str:
    """Identifies a plan: same source keys, same cut, same options -> same digest."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for s in shards:
        h.update(("\n" + s.name + ":" + ",".join(keys[i] for i in s.items)).encode())
    return h.hexdigest()


def worker_slice(shards: list[Shard], num_workers: int, worker_index: int) -> list[Shard]:
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker index {worker_index} is outside 0..{num_workers - 1}")
    return [s for s in shards if s.index % num_workers == worker_index]


def workers_from_env(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """Defaults for multi-machine runs: Kubernetes Indexed Jobs set JOB_COMPLETION_INDEX
    (the count comes from --num-workers or CROSSMAE_NUM_WORKERS); Slurm job arrays set
    SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (or MIN/MAX)."""
    env = os.environ
    if worker_index is None:
        for var in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
            if env.get(var, "").isdigit():
                worker_index = int(env[var]) - (int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                                                if var == "SLURM_ARRAY_TASK_ID" else 0)
                break
    if num_workers is None:
        if env.get("CROSSMAE_NUM_WORKERS", "").isdigit():
            num_workers = int(env["CROSSMAE_NUM_WORKERS"])
        elif env.get("SLURM_ARRAY_TASK_COUNT", "").isdigit():
            num_workers = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif env.get("SLURM_ARRAY_TASK_MAX", "").isdigit():
            num_workers = int(env["SLURM_ARRAY_TASK_MAX"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)) + 1
    return num_workers or 1, worker_index or 0
