"""Walking a source folder: image files and class folders, one stat per file, and what the
walk leaves out (hidden files, non-images, links), counted and named.

Symbolic links are not followed: each is counted as ignored and named (``ignored_links``), so a
link such as ``train/1/back -> ..`` can never read the tree again under another class, and a
file link can never read a file outside the source. With ``--follow-links`` a link is followed
only to a target inside the folder being listed (real paths compared), a folder link never to a
folder that contains it (a cycle) nor twice, and a file reached through a link is dropped when
the walk also reaches it directly or through an earlier link (same device and inode): no file
is read twice.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import NamedTuple

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})
_UNSAFE = re.compile(r"[./\s\udc80-\udcff]")  # \udc80-\udcff: bytes of a file name that is not UTF-8
NOT_FOLLOWED = "not followed"


def make_key(name: str) -> str:
    """File name -> sample key: the stem, with '.', '/', whitespace and non-UTF-8 bytes replaced by '_'."""
    return _UNSAFE.sub("_", os.path.splitext(os.path.basename(name))[0]) or "_"


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or below it."""
    return os.path.commonpath([path, folder]) == folder


class Entry(NamedTuple):
    key: str
    path: str  # the file read (for a followed link: its real target), or the outer archive
    size: int
    offset: int = 0
    in_archive: bool = False
    cls: str | None = None  # class name, None: no class folder (labelled later or rejected)
    via: str | None = None  # the link the walk followed to reach it, None: reached directly
    ident: tuple[int, int] | None = None  # (st_dev, st_ino) of a file on disk


class Acc:
    """Entries plus rejects, ignored paths and the links among them (path, target, reason)."""

    def __init__(self):
        self.entries, self.rejects, self.ignored, self.links = [], [], [], []

    def reject(self, path: str, reason: str, key: str | None = None, **extra):
        self.rejects.append(dict(key=key or make_key(path), path=path, reason=reason, **extra))

    def skip_link(self, path: str, reason: str, target: str | None = None):
        if target is None:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
        self.ignored.append(path)
        self.links.append(dict(path=path, target=target, reason=reason))

    def merge(self, other: Acc) -> Acc:
        self.entries += other.entries
        self.rejects += other.rejects
        self.ignored += other.ignored
        self.links += other.links
        return self


@dataclass(frozen=True)
class Walk:
    """How links are treated while listing below ``boundary`` (the real path of the folder listed)."""
    follow: bool
    boundary: str

    @classmethod
    def below(cls, folder: str, follow: bool) -> Walk:
        return cls(follow, os.path.realpath(folder))

    def target(self, link: str) -> tuple[str | None, str | None]:
        """(real target to follow, None) or (None, why the link is not followed)."""
        if not self.follow:
            return None, NOT_FOLLOWED
        real = os.path.realpath(link)
        if not inside(real, self.boundary):
            return None, "points outside the source"
        if not os.path.exists(real):
            return None, "broken: the target does not exist"
        if os.path.isdir(real) and inside(os.path.realpath(os.path.dirname(link)), real):
            return None, "a folder that contains it: a cycle"
        return real, None


def subdirs(path: str, walk: Walk) -> list[str]:
    """Class folder names under ``path``: its folders, and (when followed) links to folders."""
    names = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_symlink():
                real = walk.target(e.path)[0]
                if real is not None and os.path.isdir(real):
                    names.append(e.name)
            elif e.is_dir():
                names.append(e.name)
    return sorted(names)


def scan(top: str, cls: str | None, walk: Walk, recurse: bool = True, via: str | None = None) -> Acc:
    """Image files under ``top`` (recursively unless not ``recurse``), one stat each."""
    acc, stack, seen = Acc(), [(top, via)], {os.path.realpath(top)}
    while stack:
        d, via = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as e:
            acc.reject(d, f"unreadable directory: {e.strerror or e}")
            continue
        with it:
            for e in it:
                if e.name.startswith("."):  # hidden files, incl. macOS '._x.JPEG' resource forks
                    acc.ignored.append(e.path)
                    continue
                try:
                    st, reached_by = None, via
                    if e.is_symlink():
                        real, why = walk.target(e.path)
                        if why:
                            acc.skip_link(e.path, why)
                            continue
                        if os.path.isdir(real):
                            if not recurse:
                                acc.ignored.append(e.path)
                            elif real in seen:
                                acc.skip_link(e.path, "a folder already listed")
                            else:
                                seen.add(real)
                                stack.append((real, e.path))
                            continue
                        path, st, reached_by = real, os.stat(real), e.path
                    elif e.is_dir():
                        if recurse:
                            stack.append((e.path, via))
                        else:
                            acc.ignored.append(e.path)
                        continue
                    else:
                        path = e.path
                    if not is_image(e.name):
                        acc.ignored.append(e.path)
                    elif not (stat.S_ISREG(st.st_mode) if st else e.is_file()):
                        acc.reject(e.path, "not a regular file")
                    else:
                        st = st or e.stat()
                        acc.entries.append(Entry(make_key(e.name), path, st.st_size, cls=cls, via=reached_by,
                                                 ident=(st.st_dev, st.st_ino)))
                except OSError as err:
                    acc.reject(e.path, f"unreadable: {err.strerror or err}")
    return acc


def read_once(acc: Acc) -> Acc:
    """Drop files reached through a followed link that the walk also reached directly or through
    an earlier link (links in path order): each is named in ``acc.links``."""
    if not any(e.via for e in acc.entries):
        return acc
    direct = {e.ident for e in acc.entries if e.via is None and e.ident is not None}
    first: dict = {}
    kept = []
    for e in sorted(acc.entries, key=lambda e: (e.via is not None, e.via or "", e.path)):
        if e.via is not None and e.ident is not None:
            if e.ident in direct or e.ident in first:
                acc.skip_link(e.via, f"reaches {e.path} again (already read)", target=e.path)
                continue
            first[e.ident] = e.path
        kept.append(e)
    acc.entries = kept
    return acc
