"""What a manifest may name as a shard: a path relative to the manifest's folder that stays
inside it. Every reader of a manifest (the trainer's and evaluation's loaders, crossmae-prep
finalize and verify) turns a shard name into a URL through `shard_url` and nothing else, so a
manifest cannot send a reader to ``/etc/passwd``, ``../other-dataset/x.tar``, ``file:///...``,
``s3://other-bucket/...`` or ``pipe:cmd``, whether the manifest itself is local or on S3.

Kept free of heavy imports: crossmae-prep calls it too (webdataset alone takes ~1-3 s to import).
"""
from __future__ import annotations

import re

from pipelines import storage

__all__ = ["ShardNameError", "shard_url", "dataset_folder"]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # file:, s3:, http:, pipe:, C: (a drive)


class ShardNameError(ValueError):
    """A manifest names a shard outside its dataset's folder; str() is one line naming both."""


def _problem(name) -> str | None:
    """Why ``name`` does not stay inside the manifest's folder, or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a file name"
    if not name:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains control characters"
    if _SCHEME.match(name):
        return f"is a URL ({name.split(':', 1)[0]}: scheme), not a name inside the dataset's folder"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    for c in "%?#":  # file:// URLs unescape %2e%2e to '..' and cut the path at '?' or '#'
        if c in name:
            return f"contains {c!r} (no URL escapes, queries or fragments)"
    parts = name.split("/")
    if ".." in parts:
        return "climbs out of the dataset's folder with '..'"
    if "" in parts or "." in parts:
        return "has an empty or '.' path part"
    return None


def dataset_folder(manifest_url: str) -> str:
    """The folder a manifest's shard names are relative to ('' for a bare local file name)."""
    return manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else ""


def shard_url(manifest_url: str, name) -> str:
    """The URL of shard ``name`` listed in ``manifest_url``; ShardNameError when the name would
    leave the manifest's folder."""
    problem = _problem(name)
    if problem:
        raise ShardNameError(f"{manifest_url}: shard {name!r} {problem}; a manifest's shard names are file names "
                             "relative to its folder (re-create it with crossmae-prep)")
    return storage.join(dataset_folder(manifest_url), name)
