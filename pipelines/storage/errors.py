"""Storage errors: one line naming the URL and the cause. Own module so the S3 backend imports them without a circle."""
from __future__ import annotations

import errno


class StorageError(OSError):
    """A storage operation failed; str() is one line naming the URL and the cause."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(" ".join(str(message).split()))  # never multi-line
        self.url = url


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object does not exist (also catchable as FileNotFoundError)."""

    def __init__(self, message: str, url: str | None = None):
        super().__init__(message, url)
        self.errno = errno.ENOENT
