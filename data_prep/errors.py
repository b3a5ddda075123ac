"""crossmae-prep's failures as one line each: what went wrong, in plain words, and the file or URL.

`PrepError` is a failure the user can act on (exit 1); `UsageError` is bad input found before
or while reading it, e.g. another run holds the destination or a manifest names a shard
outside its folder (exit 2). `describe` turns an error of the OS or a library into one line.
"""
from __future__ import annotations

import errno
import os
import tarfile

# errno -> plain words; the rest keep the OS's own text (os.strerror)
_PLAIN = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the file system's or this process's file size limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
    errno.ENFILE: "too many open files on this machine",
    errno.ENOMEM: "out of memory",
    errno.ESTALE: "stale network file handle (the file changed on the server)",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the other side",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


class PrepError(RuntimeError):
    """A data-prep failure the user can act on (one line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UsageError(PrepError):
    """Bad input or a busy destination: one line, exit 2."""


def plain_cause(e: BaseException) -> str:
    """The cause of an OS error in plain words (no '[Errno 28]')."""
    if isinstance(e, OSError) and e.errno in _PLAIN:
        return _PLAIN[e.errno]
    if isinstance(e, OSError) and e.errno:
        return e.strerror or os.strerror(e.errno)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def describe(e: BaseException, where: str | None = None) -> str:
    """One line for an error of the OS or a library: '<file or URL>: <cause in plain words>'.
    Errors that already are one line naming their URL (StorageError, PrepError, SourceError) keep it."""
    from pipelines.storage import StorageError

    if isinstance(e, StorageError):
        cause = e.__cause__
        if isinstance(cause, OSError) and cause.errno in _PLAIN and e.url:  # a local error: plain words
            return f"{e.url}: {_PLAIN[cause.errno]}"
        return str(e)
    if isinstance(e, OSError):
        where = where or " -> ".join(os.fsdecode(f) for f in (e.filename, e.filename2) if f is not None) or None
        return f"{where}: {plain_cause(e)}" if where else plain_cause(e)
    if isinstance(e, MemoryError):
        return f"{where + ': ' if where else ''}out of memory"
    if isinstance(e, (tarfile.TarError, EOFError, UnicodeError)):
        return f"{where + ': ' if where else ''}{type(e).__name__}: {e}"
    return " ".join(str(e).split()) if not where else f"{where}: {' '.join(str(e).split())}"


def as_prep_error(e: BaseException, where: str) -> PrepError:
    """An OS / library error met while working on ``where``, as a one-line PrepError."""
    return PrepError(describe(e, where))
