"""Write one WebDataset shard: ``{key}.jpg`` (original JPEG bytes) + ``{key}.cls`` (ASCII
class index) per sample, as a deterministic tar (fixed mtime, owner and mode), so a re-run
produces byte-identical shards. The shard streams through the storage layer's atomic
writer while its sha256 is computed."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from pipelines import storage

from .images import check_image

TAR_MTIME = 946684800  # 2000-01-01: any fixed value; real mtimes would make re-runs differ


class _HashingWriter(io.RawIOBase):
    def __init__(self, sink):
        self.sink, self.sha, self.bytes = sink, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.bytes += len(b)
        self.sink.write(b)
        return len(b)


def _member(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, TAR_MTIME, 0o444, 0, 0, "", ""
    return ti


@dataclass(frozen=True)
class ImageOptions:
    validate: str = "header"  # "header" | "decode"
    max_size: int | None = None  # longer side; None keeps originals
    quality: int = 90


def write_shard(url: str, items: list, read: Callable, opts: ImageOptions, progress: Callable[[int], None] = None
                ) -> dict:
    """Write the items (SourceItems) to ``url``; return the shard's part record."""
    status, rejects, converted, count = Counter(), [], [], 0
    with storage.open_write(url) as sink:
        hashing = _HashingWriter(sink)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for item in items:
                try:
                    raw = read(item)
                except OSError as e:
                    checked = None
                    rejects.append(dict(key=item.key, reason=f"unreadable: {e}"))
                    status["rejected"] += 1
                else:
                    checked = check_image(raw, opts.validate, opts.max_size, opts.quality)
                    status[checked.status] += 1
                    if checked.status == "rejected":
                        rejects.append(dict(key=item.key, reason=checked.reason))
                    elif checked.status == "converted":
                        converted.append(dict(key=item.key, reason=checked.reason))
                if checked is not None and checked.data is not None:
                    label = str(item.label).encode()
                    tar.addfile(_member(f"{item.key}.jpg", len(checked.data)), io.BytesIO(checked.data))
                    tar.addfile(_member(f"{item.key}.cls", len(label)), io.BytesIO(label))
                    count += 1
                if progress:
                    progress(1)
    return dict(num_samples=count, bytes=hashing.bytes, sha256=hashing.sha.hexdigest(), status=dict(status),
                rejects=rejects, converted=converted)
