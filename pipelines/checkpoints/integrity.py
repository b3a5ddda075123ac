"""Is a checkpoint directory the one that was saved? Sizes and sha256 written at save time,
checked before DeepSpeed unpickles anything.

After every rank of a node has saved (DeepSpeed's files are written and closed), the node's local
rank 0 writes ``<tag>/MANIFEST.<node>.json``: {"tag", "node", "files": {name: {"bytes", "sha256"}}}
for the files it sees in the tag directory, then ``COMPLETE``. Under ZeRO-2/3 each rank writes its
own shard files; after the barrier the node's directory holds all of its ranks' files (on a shared
filesystem every node's, so the manifests overlap and must agree). One manifest per node because
every node uploads its own files into the same store prefix (pipelines/checkpoints/checkpointer.py Mirror):
the manifests go up with the other files and come back with a download.

``verify_checkpoint(dir)``: every file any manifest lists is there, has its size and its sha256;
then ``check_weights_only``. A checkpoint saved before manifests existed gets the weights-only
check alone, which still finds a truncated pickle or zip but not flipped tensor bytes.

Cost (benchmarks/checkpoint_verify.py, 2 CPUs, files in the page cache as right after a save or
a download; benchmarks/results/checkpoint_verify_cpu.json): the ViT-B ZeRO-2 checkpoint of one
rank, 2.04 GB in 2 files, hashes in 1.0 s (2 GB/s; 1.35 s on a busier run) where ``torch.load``
of the same files takes 1.5 s and the size check 0.02 s. So a save pays ~1 s per 2 GB per node
(files hash in parallel threads), and a resume, once per launch, less than DeepSpeed's own load. Flipped bytes in tensor data load without any error, and
only the hash sees them: resume and crossmae-export hash by default (``hash=False``: sizes only).
"""
from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

from pipelines import storage
from pipelines.storage.hashing import sha256_of
from pipelines.storage import StorageError

MANIFEST_PREFIX = "MANIFEST."
HASH_THREADS = 8  # hashlib releases the GIL: files hash in parallel, one per thread


class DamagedCheckpoint(StorageError):
    """A checkpoint whose files are not the ones written at save time (missing, another size,
    another sha256, or unreadable); the message is ``checkpoint <tag> is damaged (<file>: <why>)``."""

    def __init__(self, tag: str, name: str, why: str, path: str | None = None):
        super().__init__(f"checkpoint {tag} is damaged ({name}: {why})", path)
        self.tag, self.name, self.why = tag, name, why


def is_manifest(name: str) -> bool:
    return os.path.basename(name).startswith(MANIFEST_PREFIX)


def manifest_name(node: int) -> str:
    return f"{MANIFEST_PREFIX}{node}.json"



def _hash_all(paths: list[str]) -> list[str]:
    if len(paths) < 2:
        return [sha256_of(p) for p in paths]
    with ThreadPoolExecutor(min(HASH_THREADS, len(paths))) as pool:
        return list(pool.map(sha256_of, paths))


def saved_files(tag_dir: str) -> list[str]:
    """The files a manifest covers: everything in the tag directory but the markers, the manifests,
    files being written (hidden: another node's manifest on a shared filesystem) and the store's
    receipts (``_nodes/``, present in a downloaded copy)."""
    out = []
    for dirpath, _, names in os.walk(tag_dir):
        out += [os.path.relpath(os.path.join(dirpath, n), tag_dir) for n in names if not n.startswith(".")]
    return sorted(f for f in out if f != "COMPLETE" and not is_manifest(f) and not f.startswith("_nodes" + os.sep))


def write_manifest(tag_dir: str, node: int = 0) -> dict:
    """Record the size and sha256 of every file now in ``tag_dir`` (call after the barrier that
    follows DeepSpeed's save, before COMPLETE). Written atomically: a manifest is whole or absent."""
    names = saved_files(tag_dir)
    paths = [os.path.join(tag_dir, n) for n in names]
    digests = _hash_all(paths)
    record = dict(tag=os.path.basename(os.path.normpath(tag_dir)), node=node,
                  files={n: dict(bytes=os.path.getsize(p), sha256=d) for n, p, d in zip(names, paths, digests)})
    storage.write_bytes(os.path.join(tag_dir, manifest_name(node)), json.dumps(record, indent=1).encode())
    return record


def clear_markers(tag_dir: str) -> None:
    """Before a tag is saved again (the same step after a fallback, or a run started over in the
    same directory): drop COMPLETE and the manifests, so a save cut short is never complete."""
    if not os.path.isdir(tag_dir):
        return
    for name in os.listdir(tag_dir):
        if name == "COMPLETE" or is_manifest(name):
            try:
                os.remove(os.path.join(tag_dir, name))
            except FileNotFoundError:  # another node on a shared filesystem was first
                pass


def read_manifests(tag_dir: str) -> dict[str, dict] | None:
    """{file: {"bytes", "sha256"}} over every manifest in ``tag_dir``; None when it has none (a
    checkpoint saved before manifests). Raises DamagedCheckpoint for an unreadable manifest or
    two that disagree about a file."""
    tag = os.path.basename(os.path.normpath(tag_dir))
    names = sorted(n for n in os.listdir(tag_dir) if is_manifest(n) and n.endswith(".json"))
    if not names:
        return None
    merged: dict[str, dict] = {}
    for name in names:
        try:
            with open(os.path.join(tag_dir, name)) as f:
                files = json.load(f)["files"]
            entries = {k: dict(bytes=int(v["bytes"]), sha256=str(v["sha256"])) for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedCheckpoint(tag, name, f"unreadable manifest ({type(e).__name__})",
                                    os.path.join(tag_dir, name)) from None
        for k, v in entries.items():
            if merged.setdefault(k, v) != v:
                raise DamagedCheckpoint(tag, k, f"the manifests disagree about it ({name})", os.path.join(tag_dir, k))
    return merged


def verify_checkpoint(tag_dir: str, hash: bool = True) -> None:
    """Raise DamagedCheckpoint unless every file the manifests list is there with its size and
    (``hash``) its sha256, then refuse any ``.pt`` file that is not plain weights
    (``check_weights_only``). Sizes first, for every file: a missing or cut file is named without
    reading anything. Without a manifest, only the weights-only check runs."""
    tag = os.path.basename(os.path.normpath(tag_dir))
    if not os.path.isdir(tag_dir):
        raise DamagedCheckpoint(tag, tag_dir, "no such directory", tag_dir)
    expected = read_manifests(tag_dir)
    if expected:
        for name, meta in expected.items():
            path = os.path.join(tag_dir, name)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                raise DamagedCheckpoint(tag, name, "missing", path) from None
            if size != meta["bytes"]:
                raise DamagedCheckpoint(tag, name, f"{size} bytes, {meta['bytes']} when saved", path)
        if hash:
            names = sorted(expected)
            for name, digest in zip(names, _hash_all([os.path.join(tag_dir, n) for n in names])):
                if digest != expected[name]["sha256"]:
                    raise DamagedCheckpoint(tag, name, "its sha256 differs from the one recorded at save time "
                                            "(bytes changed on disk or in transit)", os.path.join(tag_dir, name))
    check_weights_only(tag_dir)


def check_weights_only(ckpt_dir: str) -> None:
    """DeepSpeed 0.19.8 unpickles its checkpoints with ``weights_only=False`` (zero_to_fp32,
    the torch checkpoint engine), so a checkpoint from elsewhere could run code when loaded.
    Refuse any ``.pt`` file that needs more than tensors, containers and the three DeepSpeed
    classes its checkpoints hold (StorageError); a file torch cannot read at all (cut short,
    bytes changed) is DamagedCheckpoint. ``mmap=True``: pickles are read, tensor data is not."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    tag = os.path.basename(os.path.normpath(ckpt_dir))
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        for dirpath, _, names in os.walk(ckpt_dir):
            for name in sorted(n for n in names if n.endswith(".pt")):
                path = os.path.join(dirpath, name)
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    continue
                except Exception as e:  # noqa: BLE001 - sorted into the two answers below
                    error = e
                lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
                refused = next((ln for ln in lines if "GLOBAL" in ln), None)
                if refused:  # a class outside the allow-list: maybe code; never loaded
                    raise StorageError(f"{path}: refused, not a plain weights file ({refused})", path)
                if not zipfile.is_zipfile(path):  # torch says only "[Errno 22] Invalid argument" for a cut file
                    why = "not a whole torch zip archive (cut short or overwritten)"
                else:
                    why = f"unreadable ({type(error).__name__}: {(lines or [''])[0][:160]})"
                raise DamagedCheckpoint(tag, os.path.relpath(path, ckpt_dir), why, path)
