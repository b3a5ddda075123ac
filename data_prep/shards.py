"""Write one WebDataset shard: ``{key}.jpg`` (original JPEG bytes) + ``{key}.cls`` (ASCII
class index) per sample, as a deterministic tar (fixed mtime, owner and mode), so a re-run
produces byte-identical shards. The shard streams through the storage layer's atomic
writer while its sha256 is computed."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import queue
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from pipelines import storage
from pipelines.data.crop_decode import add_restarts

from .images import Checked, check_image

TAR_MTIME = 946684800  # 2000-01-01: any fixed value; real mtimes would make re-runs differ
# The manifest's sample index: the byte offset of every 64th sample of each shard (``sample_index``),
# so a streaming reader that starts mid-shard GETs from the block before its first sample (at most
# 63 samples early) instead of from the shard's start. At ImageNet size (1,252-sample shards) that is
# 20 offsets per shard: the manifest grows 0.20 -> 0.42 MB. Without a shard cache, per epoch, it cuts
# the bytes read from 1.446x to 1.205x the dataset at 64 ranks x 8 workers, 1.060x -> 1.025x at 8 x 8
# (benchmarks/store_reads.py; the rest is blocks that straddle two readers, streamed by both).
SAMPLE_INDEX_EVERY = 64


class _HashingWriter:
    """Hash and write in a second thread while the caller reads and checks the next images.

    hashlib and file writes release the GIL, so the sha256 (0.11 s per 150 MB) and the write
    run beside the reading. A local shard is also pushed to disk as it grows: a third thread
    calls fdatasync every FLUSH_BYTES, so the final fsync before the rename (which still
    runs, and still precedes the part record) waits only for the last few MB.
    """

    FLUSH_BYTES = 16 << 20
    QUEUE_ITEMS = 64  # ~5 MB of samples in flight at 75 KB each

    def __init__(self, sink):
        self.sink, self.sha, self.bytes = sink, hashlib.sha256(), 0
        # a local file: flush as we go. Not an S3 spool: its fileno() would move it to disk.
        fd = sink.fileno() if isinstance(sink, io.BufferedWriter) else None
        self._queue, self._flushes, self._error = queue.Queue(self.QUEUE_ITEMS), queue.Queue(1), None
        self._threads = [threading.Thread(target=self._write_all, name="shard-writer", daemon=True)]
        if fd is not None:
            self._threads.append(threading.Thread(target=self._flush_all, args=(fd,), name="shard-flush", daemon=True))
        for t in self._threads:
            t.start()

    def _write_all(self):
        unflushed = 0
        while (pieces := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain until the caller sees the error
            try:
                for b in pieces:
                    self.sha.update(b)
                    self.sink.write(b)
                    unflushed += len(b)
                if unflushed >= self.FLUSH_BYTES and len(self._threads) > 1:
                    self.sink.flush()
                    with contextlib.suppress(queue.Full):  # one flush pending is enough
                        self._flushes.put_nowait(True)
                    unflushed = 0
            except BaseException as e:  # ENOSPC, EIO: raised in the caller's thread
                self._error = e
        if len(self._threads) > 1:
            self._flushes.put(None)

    def _flush_all(self, fd: int):
        while self._flushes.get() is not None:
            try:
                os.fdatasync(fd)
            except OSError as e:
                self._error = self._error or e

    def write(self, *pieces: bytes) -> None:
        if self._error is not None:
            self.close()
        self._queue.put(pieces)
        self.bytes += sum(map(len, pieces))

    def close(self) -> None:
        """Wait until every byte is written and hashed; raise the writer's error, if any."""
        if self._threads[0].is_alive():
            self._queue.put(None)
        for t in self._threads:
            t.join()
        if self._error is not None:
            raise self._error


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data + padding), as one bytes object."""
    return tar_header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header of one ustar member with fixed mtime, owner and mode.

    Packed by hand rather than through tarfile.addfile: tarfile deep-copies the TarInfo and
    writes in small pieces; this halves the per-sample cost of sharding (2,000 JPEGs of 75 KB:
    0.72 s -> 0.41 s together with the JPEG fast path). Names over 100 bytes fall back to
    tarfile's GNU long-name form.
    """
    encoded = name.encode()
    if len(encoded) > 100:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, TAR_MTIME, 0o444, 0, 0, "", ""
        header = ti.tobuf(tarfile.GNU_FORMAT)
    else:
        header = bytearray(512)
        header[0:len(encoded)] = encoded
        header[100:108] = b"0000444\0"
        header[108:116] = header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % size
        header[136:148] = b"%011o\0" % TAR_MTIME
        header[148:156] = b" " * 8
        header[156:157] = b"0"
        header[257:265] = b"ustar\x0000"
        header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@dataclass(frozen=True)
class ImageOptions:
    validate: str = "header"  # "header" | "decode"
    max_size: int | None = None  # longer side; None keeps originals
    quality: int = 90
    restarts: bool = False  # --jpeg-restarts: lossless rewrite with restart markers (pipelines/data/crop_decode.py)


def write_shard(url: str, items: list, read: Callable, opts: ImageOptions, progress: Callable[[int], None] = None,
                index_every: int = SAMPLE_INDEX_EVERY) -> dict:
    """Write the items (SourceItems) to ``url``; return the shard's part record (with the byte offset of
    every ``index_every``-th sample; 0: none)."""
    status, rejects, converted, count, resized, index = Counter(), [], [], 0, 0, []
    restarts = dict(transcoded=0, kept={}, bytes_before=0, bytes_after=0)
    with storage.open_write(url) as sink:
        out = _HashingWriter(sink)
        try:
            for item in items:
                try:
                    checked = check_image(read(item), opts.validate, opts.max_size, opts.quality)
                except OSError as e:
                    checked = Checked(None, "rejected", f"unreadable: {e}")
                status[checked.status] += 1
                resized += checked.resized
                if checked.status == "rejected":
                    rejects.append(dict(key=item.key, path=item.location, reason=checked.reason))
                elif checked.status == "converted":
                    converted.append(dict(key=item.key, path=item.location, reason=checked.reason))
                if checked.data is not None:
                    data = checked.data  # written in pieces: no copy of the JPEG bytes
                    if opts.restarts:
                        data = _with_restarts(data, restarts)
                    if index_every and count % index_every == 0:
                        index.append(out.bytes)
                    out.write(tar_header(f"{item.key}.jpg", len(data)), data, b"\0" * (-len(data) % 512),
                              tar_member(f"{item.key}.cls", str(item.label).encode()))
                    count += 1
                if progress:
                    progress(1)
            out.write(b"\0" * 1024)  # end of archive: two zero blocks
        finally:
            out.close()  # every byte written (or the writer's error raised) before the shard is made durable
    return dict(num_samples=count, bytes=out.bytes, sha256=out.sha.hexdigest(), status=dict(status),
                **(dict(sample_index=index, sample_index_every=index_every) if index_every else {}),
                **(dict(restarts=restarts) if opts.restarts else {}),
                rejects=rejects, converted=converted, num_resized=resized)


def _with_restarts(data: bytes, counts: dict) -> bytes:
    """The JPEG with restart markers (lossless), or the original bytes when it cannot have them;
    counted in the part record either way (kept: reason -> samples)."""
    out = add_restarts(data)
    counts["bytes_before"] += len(data)
    if isinstance(out, str):
        reason = out.split(":", 1)[0]
        counts["kept"][reason] = counts["kept"].get(reason, 0) + 1
        out = data
    else:
        counts["transcoded"] += 1
    counts["bytes_after"] += len(out)
    return out
