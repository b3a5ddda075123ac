"""Checkpoint mirroring to any storage URL, selection for resume, and pruning.

Layout under a store ``S`` (local path or ``s3://``)::

    S/checkpoints/<tag>/...        every file of the DeepSpeed checkpoint directory
    S/checkpoints/<tag>/COMPLETE   written after all of the tag's files are durable
    S/latest                       {"tag": ..., "step": ...}: written last, names a COMPLETE tag

A crash at any point leaves ``latest`` naming the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os

from . import storage


def files(local_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(local_dir):
        out += [os.path.relpath(os.path.join(dirpath, n), local_dir) for n in names]
    return sorted(f for f in out if f != "COMPLETE")


def upload(local_root: str, tag: str, store: str, names: list[str] | None = None) -> None:
    """Copy ``names`` (default: all files) of local_root/tag into the store. Call from every node
    (each uploads what its ranks wrote), then ``publish`` once from global rank 0."""
    local_dir = os.path.join(local_root, tag)
    for rel in names if names is not None else files(local_dir):
        with open(os.path.join(local_dir, rel), "rb") as src, \
                storage.open_write(storage.join(store, "checkpoints", tag, rel)) as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)


def publish(store: str, tag: str, step: int, expected_files: list[str]) -> None:
    """Mark the tag complete and point ``latest`` at it, after checking every file arrived."""
    prefix = storage.join(store, "checkpoints", tag) + "/"
    present = {url[len(prefix):] for url, _ in storage.list_objects(prefix)}
    missing = sorted(set(expected_files) - present)
    if missing:
        raise storage.StorageError(f"checkpoint {tag} is missing {len(missing)} files in {store} (first: {missing[0]})")
    storage.write_bytes(storage.join(store, "checkpoints", tag, "COMPLETE"), str(step).encode())
    storage.write_bytes(storage.join(store, "latest"), json.dumps(dict(tag=tag, step=step)).encode())


def latest(store: str) -> dict | None:
    try:
        pointer = json.loads(storage.read_bytes(storage.join(store, "latest")))
    except FileNotFoundError:
        return None
    return pointer if storage.exists(storage.join(store, "checkpoints", pointer["tag"], "COMPLETE")) else None


def download(store: str, tag: str, local_root: str) -> str:
    """Fetch a complete tag into local_root/tag (skipping files already there with the same size)."""
    prefix = storage.join(store, "checkpoints", tag) + "/"
    for url, size in storage.list_objects(prefix):
        path = os.path.join(local_root, tag, url[len(prefix):])
        if os.path.exists(path) and os.path.getsize(path) == size:
            continue
        with storage.open_read(url) as src, storage.open_write(path) as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
    return os.path.join(local_root, tag)


def tags_to_delete(tags: list[str], steps: dict[str, int], keep_last: int, keep_every: int) -> list[str]:
    """Keep the newest ``keep_last`` tags and every tag whose step is a multiple of ``keep_every``."""
    ordered = sorted(tags, key=lambda t: steps[t])
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {t for t in ordered if steps[t] % keep_every == 0}
    return [t for t in ordered if t not in keep]


def prune(store: str, steps: dict[str, int], keep_last: int, keep_every: int) -> list[str]:
    """Delete old complete tags from the store (COMPLETE first, so a half-deleted tag is never chosen)."""
    gone = tags_to_delete(list(steps), steps, keep_last, keep_every)
    for tag in gone:
        prefix = storage.join(store, "checkpoints", tag)
        storage.delete(storage.join(prefix, "COMPLETE"))
        for url, _ in list(storage.list_objects(prefix + "/")):
            storage.delete(url)
    return gone


def check_weights_only(ckpt_dir: str) -> None:
    """DeepSpeed 0.19.8 unpickles its checkpoints with ``weights_only=False`` (zero_to_fp32,
    the torch checkpoint engine), so a checkpoint from elsewhere could run code when loaded.
    Refuse any ``.pt`` file that needs more than tensors, containers and the three DeepSpeed
    classes its checkpoints hold. ``mmap=True``: pickles are read, tensor data is not."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        for dirpath, _, names in os.walk(ckpt_dir):
            for name in sorted(n for n in names if n.endswith(".pt")):
                path = os.path.join(dirpath, name)
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - any refusal or damage is the same answer
                    cause = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), type(e).__name__)
                    raise storage.StorageError(f"{path}: refused, not a plain weights file ({cause.strip()})",
                                               path) from None
