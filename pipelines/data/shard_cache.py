"""WebDataset shards: the list (`ShardList`, from a manifest or a brace pattern), a forward
reader that names the damage it meets (`ShardReader`), a reader of single samples at their byte
spans in local files (`SpanReader`, for ``access="random"``), and an optional local cache.

The cache, for multi-epoch runs: remote shards are copied to a local
directory on first use and read from there afterwards; least recently used shards are
evicted once the directory exceeds its byte limit. Safe with many worker processes and ranks
sharing the directory: copies are atomic (temp + rename), each shard is fetched once per
directory, and a shard being read is never evicted (ShardCache: the per-shard locks)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import resource
import sys
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from braceexpand import braceexpand

from pipelines import storage
from pipelines.data.shard_names import shard_url
from pipelines.data.tar_reader import sample_spans, tar_samples


def is_remote(url: str) -> bool:
    """Read from an object store (the reads that pipelines/storage/traffic.py counts)."""
    return "://" in url and not url.startswith("file://")


@dataclass(frozen=True)
class ShardList:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...] = ()  # bytes per shard, from a manifest (empty: unknown)
    # The manifest's sample index (crossmae-prep writes it): per shard, the byte offsets of its samples
    # 0, every, 2 * every, ... (an empty tuple: that shard has none; ``index_every`` 0: no shard has).
    index_every: int = 0
    index: tuple[tuple[int, ...], ...] = ()
    # crossmae-prep --jpeg-restarts: (samples rewritten with restart markers, samples kept as they were);
    # None: the manifest says nothing (written without it, or by another tool)
    restarts: tuple[int, int] | None = None

    def index_start(self, shard: int, index: int) -> tuple[int, int]:
        """(sample, byte offset) to start reading ``shard`` at to reach its sample ``index``: the
        indexed sample at or before it, or (0, 0) without an index."""
        offsets = self.index[shard] if self.index_every and self.index else ()
        k = min(index // self.index_every, len(offsets) - 1) if offsets else 0
        return (k * self.index_every, offsets[k]) if k > 0 else (0, 0)

    @property
    def dataset_bytes(self) -> int | None:
        return sum(self.sizes) if self.sizes and len(self.sizes) == len(self.urls) else None

    @classmethod
    def from_manifest(cls, manifest_url: str) -> "ShardList":
        try:
            m = json.loads(storage.read_bytes(manifest_url))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{manifest_url}: not JSON ({e})") from None
        fmt = m.get("format") if isinstance(m, dict) else type(m).__name__
        if fmt != "webdataset":
            raise ValueError(f"{manifest_url}: not a WebDataset manifest (format={fmt!r})")
        try:
            shards = [(str(s["name"]), int(s["num_samples"])) for s in m["shards"]]
            sizes = tuple(int(s["bytes"]) for s in m["shards"]) if all("bytes" in s for s in m["shards"]) else ()
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{manifest_url}: malformed shard list ({type(e).__name__}: {e})") from None
        for name, n in shards:
            if n < 0:
                raise ValueError(f"{manifest_url}: bad shard entry {name!r} ({n} samples)")
        urls = tuple(shard_url(manifest_url, name) for name, _ in shards)  # refuses names leaving the folder
        every, index = _sample_index(manifest_url, m, shards, sizes)
        r = m.get("jpeg_restarts")
        try:
            restarts = (int(r["transcoded"]), sum(int(n) for n in r["kept"].values())) if r is not None else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{manifest_url}: malformed jpeg_restarts ({type(e).__name__}: {e})") from None
        return cls(urls, tuple(n for _, n in shards), sizes, every, index, restarts)

    @classmethod
    def from_pattern(cls, pattern: str) -> "ShardList":
        """Any WebDataset shards named by a brace pattern (``s3://b/train-{000000..000099}.tar``).
        Without a manifest the sample counts are unknown: each shard is streamed once to count
        its samples (write a manifest with crossmae-prep to skip this)."""
        urls = tuple(braceexpand(pattern))
        counts = []
        for url in urls:
            with storage.open_read(url) as f:
                counts.append(sum(1 for _ in tar_samples(f, url)))
        return cls(urls, tuple(counts))

    @classmethod
    def from_spec(cls, spec: str) -> "ShardList":
        """A manifest URL (``.../manifest.json``) or a brace pattern of tar URLs."""
        return cls.from_manifest(spec) if spec.endswith(".json") else cls.from_pattern(spec)


def _sample_index(manifest_url: str, m: dict, shards: list, sizes: tuple) -> tuple[int, tuple]:
    """The manifest's ``sample_index_every`` and per-shard ``sample_index``, checked: a damaged one is
    refused (it would start readers at the wrong bytes), a missing one is no index."""
    every = m.get("sample_index_every", 0)
    if not every:
        return 0, ()
    if type(every) is not int or every < 1:
        raise ValueError(f"{manifest_url}: bad sample_index_every {every!r} (a positive integer)")
    index = []
    for k, (entry, (name, n)) in enumerate(zip(m["shards"], shards)):
        offsets = entry.get("sample_index", []) if isinstance(entry, dict) else None
        if not isinstance(offsets, list) or any(type(o) is not int for o in offsets) or (offsets and (
                len(offsets) != -(-n // every) or offsets[0] != 0
                or any(b <= a for a, b in zip(offsets, offsets[1:]))
                or (sizes and offsets[-1] >= sizes[k]))):
            raise ValueError(f"{manifest_url}: bad sample_index of shard {name!r} (want {-(-n // every)} rising "
                             f"byte offsets from 0, one per {every} samples; `crossmae-prep finalize` rewrites the manifest)")
        index.append(tuple(offsets))
    return every, tuple(index)


class ShardReader:
    """Reads samples of one epoch's shard stream forward, skipping (not decoding) what it passes.
    ``store_reads``: the shards it read from the object store (not from the cache), in order."""

    def __init__(self, shards: ShardList, cache: ShardCache | None = None):
        self.shards, self.shard, self.next_index, self.samples, self.file = shards, None, 0, None, None
        self.cache, self.damage, self.store_reads = cache, "", []
        self.first, self.index_misses = 0, set()  # the sample the open started at; shards whose index failed

    def _open(self, shard: int, index: int = 0) -> None:
        """Open ``shard`` to read on to its sample ``index``: from the manifest's sample index at or
        before it (a ranged GET from the store, a seek in a local or cached file), else from the start."""
        self.close()
        url = self.shards.urls[shard]
        first, offset = (0, 0) if shard in self.index_misses else self.shards.index_start(shard, index)
        if self.cache:
            self.file = self.cache.open(url)
            from_store = self.cache.fetched
            if offset:
                self.file.seek(offset)
        else:
            self.file, from_store = storage.open_read(url, offset), is_remote(url)
        if from_store:
            self.store_reads.append(shard)
        self.samples = tar_samples(self.file, url)
        self.shard, self.next_index, self.first, self.damage = shard, first, first, ""

    def get(self, shard: int, index: int) -> dict | None:
        """The sample, or None past the readable end of the shard (``self.damage`` says why)."""
        if shard == self.shard and self.damage and index >= self.readable:
            return None  # known to be past the damage: no second read of the shard
        if shard != self.shard or index < self.next_index:
            self._open(shard, index)
        sample = None
        while self.next_index <= index:
            read, error = self.next_index, ""
            try:
                sample = next(self.samples, None)
            except (tarfile.TarError, ValueError) as e:  # truncated / damaged tar: the rest of the shard is unreadable
                sample, error = None, f" ({type(e).__name__}: {e})"
            if sample is None and read == self.first > 0:  # no sample where the manifest's index points
                self.index_misses.add(shard)
                print(f"warning: {self.shards.urls[shard]}: no sample {read} at the byte offset the manifest's "
                      f"sample_index gives{error}; reading the shard from its start instead (crossmae-prep "
                      "verify checks the index)", file=sys.stderr)
                self._open(shard)
                continue
            self.next_index += 1
            if sample is None:  # shard shorter than the manifest says
                self.next_index = self.shards.counts[shard] + 1
                self.readable = read
                self.damage = f"unreadable after {read} of its {self.shards.counts[shard]} samples{error}"
            if self.damage:
                return None
        return sample

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = None


class SpanReader:
    """Reads single samples of local shard files (a local dataset, or remote shards through the node's
    `ShardCache`) at their byte spans: a seek and one read per sample, in any order. Each shard's spans
    come from one walk over its headers (`sample_spans`: ~2 headers per sample sought over, never the
    data), once per process, kept as two int64 arrays (16 bytes per sample). Open files are kept in
    a least-recently-used set of at most ``max_open`` (a cached shard stays locked against eviction
    while open). ``get`` returns the sample dict, or `Unreadable` (reason, detail) for a sample the
    shard cannot give: past its damage or its end ("missing"), or a sample whose own bytes do not
    parse (the error's type name; the shard's other samples are still read)."""

    def __init__(self, shards: ShardList, cache: ShardCache | None = None, max_open: int = 256):
        self.shards, self.cache, self.store_reads = shards, cache, []
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_open = max(1, min(max_open, soft // 4 if soft > 0 else max_open))
        self.files: OrderedDict[int, object] = OrderedDict()
        self.spans: dict[int, tuple] = {}  # shard -> (starts, ends, damage)

    def _file(self, shard: int):
        f = self.files.pop(shard, None)
        if f is None:
            url = self.shards.urls[shard]
            if self.cache is not None:
                f = self.cache.open(url)
                if self.cache.fetched:
                    self.store_reads.append(shard)
            else:
                f = storage.open_read(url)
            while len(self.files) >= self.max_open:
                self.files.popitem(last=False)[1].close()
        self.files[shard] = f
        return f

    def _spans(self, shard: int, f) -> tuple:
        if shard not in self.spans:
            url = self.shards.urls[shard]
            try:
                spans, damage = sample_spans(f, url)
            except ValueError as e:  # a compressed tar, a pax global header that names members
                spans, damage = [], f" ({e})"
            arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
            self.spans[shard] = (arr[:, 0].copy(), arr[:, 1].copy(), damage)
        return self.spans[shard]

    def get(self, shard: int, index: int):
        try:
            f = self._file(shard)
        except FileNotFoundError as e:
            return Unreadable("missing", f"cannot be opened ({type(e).__name__}: {e})")
        starts, ends, damage = self._spans(shard, f)
        count = self.shards.counts[shard]
        if index >= len(starts):
            return Unreadable("missing", f"unreadable after {len(starts)} of its {count} samples{damage}")
        a, b = int(starts[index]), int(ends[index])
        f.seek(a)
        data = f.read(b - a)
        if len(data) < b - a:  # the file changed on disk since its walk
            return Unreadable("missing", f"sample {index} is no longer in the file (it changed since it was opened)")
        try:
            return next(tar_samples(io.BytesIO(data), self.shards.urls[shard]))
        except (tarfile.TarError, ValueError, StopIteration) as e:
            return Unreadable(type(e).__name__, f"sample {index} of the shard: {type(e).__name__}: {e}")

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


class Unreadable(NamedTuple):
    """A sample `SpanReader` could not give: ``reason`` is the ``loader.stats`` key."""
    reason: str
    detail: str


class ShardCache:
    """Locks, two files per shard under ``<directory>/.locks/`` (flock; they stay: removing a lock file
    another process has open would split the lock): a reader holds its shard's lock shared while
    the shard is open, a fetch holds the shard's fetch lock exclusive, and eviction takes the
    shard's lock exclusive without waiting, skipping the shard when it cannot. So each shard is fetched once per node (readers that miss
    the same shard at once wait for the first one's copy), and no shard is deleted while a worker
    or rank reads it: the cache can run over its limit by the shards open at once (one per reader)."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.locks = os.path.join(directory, ".locks")
        self.fetched = False  # whether the last open() read the shard from the store
        os.makedirs(self.locks, exist_ok=True)

    def path_for(self, url: str) -> str:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return os.path.join(self.directory, f"{digest}-{url.rsplit('/', 1)[-1]}")

    def _lock(self, path: str):
        return open(os.path.join(self.locks, os.path.basename(path) + ".lock"), "ab")

    def open(self, url: str):
        """A local reader for ``url``: cached copy if present (marked as used), else fetched; the
        shard's lock is held shared until the reader is closed."""
        self.fetched = False
        if not is_remote(url):
            return storage.open_read(url)  # already local: nothing to cache
        path = self.path_for(url)
        lock = self._lock(path)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)  # held while open; waits only while an eviction deletes it
            if not self._mark_used(path):
                # The fetch has a lock of its own: readers that miss the same shard wait for its copy,
                # not for every other reader's whole read, as a shared -> exclusive upgrade of the
                # shard's lock would (flock's upgrade waits for all the shared holders to close).
                with open(os.path.join(self.locks, os.path.basename(path) + ".fetch"), "ab") as fetch:
                    fcntl.flock(fetch, fcntl.LOCK_EX)
                    if not self._mark_used(path):
                        self.fetched = True
                        with storage.open_read(url) as src, storage.open_write(path) as dst:
                            while chunk := src.read(8 << 20):
                                dst.write(chunk)
            file = _Locked(path, lock)
        except BaseException:
            lock.close()
            raise
        if self.fetched:
            self.evict(keep=path)
        return file

    @staticmethod
    def _mark_used(path: str) -> bool:
        """Whether the shard is cached; if so, its mtime is now (last use: the LRU order)."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def shards(self) -> list[tuple[float, int, str]]:
        """The cached shards, (last use, bytes, path); locks and partial copies (dot names) are not."""
        entries = []
        for e in os.scandir(self.directory):
            if not e.name.startswith(".") and e.is_file():
                with contextlib.suppress(FileNotFoundError):  # evicted since the scan
                    st = e.stat()
                    entries.append((st.st_mtime, st.st_size, e.path))
        return entries

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used shards until the cache fits, skipping those being read or
        fetched now; returns bytes freed."""
        entries = self.shards()
        used, freed = sum(s for _, s, _ in entries), 0
        for _, size, path in sorted(entries):
            if used - freed <= self.max_bytes:
                break
            if path == keep:
                continue
            with self._lock(path) as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # open in a reader, or being fetched: it stays
                try:
                    os.unlink(path)
                    freed += size
                except FileNotFoundError:
                    pass
        return freed


class _Locked(io.BufferedReader):
    """A cached shard open for reading, holding its shared lock: closing it lets eviction have it."""

    def __init__(self, path: str, lock):
        super().__init__(io.FileIO(path, "rb"))
        self._lock = lock

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._lock.close()
