"""sha256 of bytes in memory and of stored objects: the one file-hash helper of pipelines/.

Objects are streamed through pipelines.storage in 16 MiB chunks, so hashing a 1.2 GB ViT-L
export or a shard holds one chunk in memory, not the object. A caller that also needs the bytes
reads them once and calls sha256_bytes on them, instead of reading the object a second time.
"""
from __future__ import annotations

import hashlib

from pipelines import storage

CHUNK = 16 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(url) -> str:
    """Hex sha256 of the object at ``url`` (local path, file:// or s3://), streamed."""
    if "://" not in str(url):  # a local file: hashlib reads it with the GIL released (threads hash in parallel)
        with storage.open_read(url) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
