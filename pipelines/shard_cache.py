"""Optional local shard cache for multi-epoch runs: remote shards are copied to a local
directory on first use and read from there afterwards; least recently used shards are
evicted once the directory exceeds its byte limit. Safe with many worker processes: copies
are atomic (temp + rename), a shard is only ever replaced by identical bytes, and an evicted
file that is still open stays readable (POSIX unlink semantics)."""
from __future__ import annotations

import hashlib
import os

from . import storage


class ShardCache:
    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        os.makedirs(directory, exist_ok=True)

    def path_for(self, url: str) -> str:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return os.path.join(self.directory, f"{digest}-{url.rsplit('/', 1)[-1]}")

    def open(self, url: str):
        """A local reader for ``url``: cached copy if present (marked as used), else fetched."""
        if "://" not in url or url.startswith("file://"):
            return storage.open_read(url)  # already local: nothing to cache
        path = self.path_for(url)
        try:
            os.utime(path)  # mtime = last use: the LRU order
            return open(path, "rb")
        except FileNotFoundError:
            pass
        with storage.open_read(url) as src, storage.open_write(path) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        self.evict(keep=path)
        return open(path, "rb")

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used shards until the cache fits; returns bytes freed."""
        entries = []
        for e in os.scandir(self.directory):
            if e.is_file() and not e.name.startswith("."):
                st = e.stat()
                entries.append((st.st_mtime, st.st_size, e.path))
        used, freed = sum(s for _, s, _ in entries), 0
        for _, size, path in sorted(entries):
            if used - freed <= self.max_bytes:
                break
            if path != keep:
                try:
                    os.unlink(path)
                    freed += size
                except FileNotFoundError:
                    pass
        return freed
