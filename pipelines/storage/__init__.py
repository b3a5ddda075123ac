"""The project's one storage layer: objects addressed by URL, local or on S3.

    local path, file:///abs/path     plain files (parent directories are created on write)
    s3://bucket/key                  boto3 (pipelines/storage/s3.py): standard credential chain,
                                     AWS_ENDPOINT_URL / CROSSMAE_S3_ENDPOINT for S3-compatible
                                     stores (SeaweedFS, MinIO; path-style addressing there)

API: read_bytes, read_range, open_read (streaming, seekable; S3 resumes a broken read at the
byte it stopped), write_bytes, open_write (atomic: the object appears complete or not at all),
exists, list (alias of list_objects), delete, size, join.

Errors are StorageError (an OSError) with a one-line message naming the URL and the cause;
missing objects raise StorageNotFoundError, which is also a FileNotFoundError. boto3 is only
imported when an s3:// URL is used.
"""
from __future__ import annotations

import contextlib
import os
import urllib.parse
import uuid
from typing import BinaryIO, Iterator

from pipelines.storage.errors import StorageError, StorageNotFoundError

__all__ = ["StorageError", "StorageNotFoundError", "read_bytes", "read_range", "open_read", "write_bytes",
           "open_write", "remove_partial_writes", "exists", "list_objects", "list", "delete", "size", "join"]

# Local atomic writes go to "<dir>/.<name>.<random>.crossmae-tmp" and are renamed over the
# target; list() hides such files so an in-progress write is invisible, as on S3.
TMP_SUFFIX = ".crossmae-tmp"


def _parse(url) -> tuple[str, str | None, str]:
    """('s3', bucket, key) or ('file', None, path)."""
    url = os.fspath(url)
    if url.startswith("s3://"):
        bucket, _, key = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"S3 URL without a bucket: {url!r}")
        return "s3", bucket, key
    if url.startswith("file://"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL with a remote host: {url!r}")
        return "file", None, urllib.parse.unquote(parsed.path)
    if "://" in url or url.startswith("pipe:"):
        raise ValueError(f"unsupported storage URL {url!r}: use a local path, file:// or s3://")
    return "file", None, url


def _s3_key(url) -> tuple[str, str]:
    _, bucket, key = _parse(url)
    if not key or key.endswith("/"):
        raise ValueError(f"S3 URL does not name an object: {os.fspath(url)!r}")
    return bucket, key


def _s3():
    from pipelines.storage import s3  # lazy: local-only users never import boto3
    return s3


def _local_error(url, e: OSError) -> StorageError:
    cause = e.strerror or type(e).__name__
    if isinstance(e, FileNotFoundError):
        return StorageNotFoundError(f"{os.fspath(url)}: no such file ({cause})", os.fspath(url))
    return StorageError(f"{os.fspath(url)}: {cause}", os.fspath(url))


@contextlib.contextmanager
def _local_errors(url):
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise _local_error(url, e) from e


def read_bytes(url) -> bytes:
    """The whole object."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().read(url, *_s3_key(url), 0, None)
    with _local_errors(url), open(path, "rb") as f:
        return f.read()


def read_range(url, start: int, end: int | None) -> bytes:
    """Bytes [start, end) like a slice: end=None means to the end; clipped to the object size."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad byte range [{start}, {end}) for {os.fspath(url)}")
    if end == start:
        return b""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().read(url, *_s3_key(url), start, end)
    with _local_errors(url), open(path, "rb") as f:
        f.seek(start)
        return f.read() if end is None else f.read(end - start)


def open_read(url, start: int = 0) -> BinaryIO:
    """A buffered, seekable binary reader positioned at `start`; close it (or use `with`)."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().open_read(url, *_s3_key(url), start)
    with _local_errors(url):
        f = open(path, "rb")
        f.seek(start)
        return f


def write_bytes(url, data: bytes, *, multipart_threshold: int | None = None, part_size: int | None = None) -> None:
    """Write the object atomically (replaces an existing one)."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().write(url, *_s3_key(url), data, multipart_threshold, part_size)
    with open_write(url) as f:
        f.write(data)


@contextlib.contextmanager
def open_write(url, *, multipart_threshold: int | None = None, part_size: int | None = None) -> Iterator[BinaryIO]:
    """`with open_write(url) as f: f.write(...)`: the object appears when the block exits
    normally, complete; if the block raises, nothing appears (and nothing is left behind)."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        with _s3().open_write(url, *_s3_key(url), multipart_threshold, part_size) as f:
            yield f
        return
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    with _local_errors(url):
        os.makedirs(directory, exist_ok=True)
        # os.open rather than mkstemp: mode 0o666 & ~umask like open() (mkstemp gives 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            with _local_errors(url):
                os.fsync(f.fileno())  # data on disk before the rename makes it visible
        with _local_errors(url):
            os.replace(tmp, path)  # atomic within one filesystem: same directory guarantees that
            with contextlib.suppress(OSError):  # the rename itself durable (POSIX only)
                dfd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_partial_writes(url) -> int:
    """Clean up what a killed writer of this object left behind (local temp files; S3
    incomplete multipart uploads). Only call it for objects no one else is writing now."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().abort_partial_uploads(url, *_s3_key(url))
    directory, name = os.path.split(os.path.abspath(path))
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(f".{name}.") and entry.name.endswith(TMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def exists(url) -> bool:
    """Whether the object exists (a directory is not an object)."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().exists(url, *_s3_key(url))
    return os.path.isfile(path)


def size(url) -> int:
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().size(url, *_s3_key(url))
    with _local_errors(url):
        return os.stat(path).st_size


def delete(url) -> None:
    """Remove the object; a missing object is not an error (S3 cannot tell the difference)."""
    scheme, _, path = _parse(url)
    if scheme == "s3":
        return _s3().delete(url, *_s3_key(url))
    with _local_errors(url), contextlib.suppress(FileNotFoundError):
        os.remove(path)


def list_objects(prefix_url) -> Iterator[tuple[str, int]]:
    """(url, size) of every object whose URL starts with prefix_url, recursively, sorted.
    Like S3, the prefix is a string prefix: 'shards/train-' matches 'shards/train-000.tar';
    locally a prefix naming a directory lists that directory (not also 'shards2/' next to it)."""
    scheme, bucket, prefix = _parse(prefix_url)
    if scheme == "s3":
        yield from _s3().list_objects(bucket, prefix)
        return
    as_url = os.fspath(prefix_url).startswith("file://")
    root = prefix if prefix.endswith("/") or os.path.isdir(prefix) else os.path.dirname(prefix)
    found = []
    for dirpath, _dirs, files in os.walk(root or "."):
        for name in files:
            path = os.path.join(dirpath, name) if root else os.path.normpath(os.path.join(dirpath, name))
            if name.endswith(TMP_SUFFIX) or not path.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted while listing
                found.append((path, os.stat(path).st_size))
    for path, nbytes in sorted(found):
        yield ("file://" + urllib.parse.quote(os.path.abspath(path)) if as_url else path), nbytes


list = list_objects  # noqa: A001 - the API name; nothing in this module calls the builtin list()


def join(base, *parts) -> str:
    """'s3://b/x' + 'y/' + 'z' -> 's3://b/x/y/z' (one '/' between parts, for any scheme)."""
    out = os.fspath(base)
    for part in parts:
        part = os.fspath(part)
        out = f"{out.rstrip('/')}/{part.lstrip('/')}" if out else part
    return out
