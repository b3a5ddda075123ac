"""Sample sources for ``crossmae-prep``: ImageNet (extracted tree or the original archives, read
in place) and any labelled image folder -> a sorted, deterministic list of ``SourceItem``s.

Listing never opens or decodes an image: directories are walked with ``os.scandir`` (one stat
per file for its size) and tars are indexed from their headers, so ``read_item`` can seek+read
each image's bytes straight out of the outer archive. Bytes are validated later, by the writer.
Keys are file stems, identical for the extracted and the archive form of the same data.
Symbolic links in a folder are not followed unless asked (``follow_links``; data_prep/walk.py).
"""
from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from .imagenet_labels import LABELS_EXPECTED, SourceError, find_val_labels
from .walk import IMAGE_EXTENSIONS, Acc, Entry, Walk, is_image, make_key, read_once, scan, subdirs

__all__ = ["SourceItem", "SourceListing", "SourceError", "read_item", "list_imagenet", "list_image_folder",
           "IMAGE_EXTENSIONS", "make_key"]

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
_LINKS_LISTED = 1000  # ignored links named in the manifest (all are counted): a tree of 10^6 links stays readable
# Directory / inner-tar scans run in threads to overlap I/O latency (cold caches, network file
# systems); on a warm local cache one thread is ~1.5x faster (GIL): CROSSMAE_PREP_LIST_THREADS=1.
_THREADS = max(1, int(os.environ.get("CROSSMAE_PREP_LIST_THREADS", "8")))


@dataclass(frozen=True)
class SourceItem:
    key: str  # file stem, sanitised ('.', '/', whitespace -> '_'), unique within a split
    label: int  # index into the sorted class list
    size: int  # bytes of the stored image
    path: str  # the file, or the OUTER archive holding its bytes
    offset: int = 0  # absolute offset of the bytes inside ``path`` when in_archive
    in_archive: bool = False

    @property
    def location(self) -> str:
        """Where the bytes are, as the manifest's rejects / converted name it: the file, or archive@offset."""
        return f"{self.path}@{self.offset}" if self.in_archive else self.path


@dataclass
class SourceListing:
    split: str
    items: list[SourceItem]  # sorted by key
    classes: list[str]  # label i -> classes[i]
    description: dict  # JSON-serialisable: kind, source paths, label source, counts
    rejects: list[dict]  # {"key", "path", "reason"} found at listing time but unusable


def read_item(item: SourceItem) -> bytes:
    """The raw stored bytes of one item (a seek+read for archive members)."""
    with open(item.path, "rb") as f:
        if not item.in_archive:
            return f.read()
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise OSError(f"short read: {len(data)} of {item.size} bytes at offset {item.offset} of {item.path}")
    return data


def _scan_classes(root: str, names: list[str], walk: Walk, recurse: bool = True) -> Acc:
    acc = scan(root, None, walk, recurse=False)  # files directly under root: no class folder
    scanned = {os.path.join(root, c) for c in names}  # hidden folders stay ignored (and counted)
    acc.ignored = [p for p in acc.ignored if p not in scanned]

    def one(c: str) -> Acc:
        path = os.path.join(root, c)
        if os.path.islink(path):  # a followed class-folder link: its files are reached through it
            return scan(os.path.realpath(path), c, walk, recurse, via=path)
        return scan(path, c, walk, recurse)

    with ThreadPoolExecutor(_THREADS) as pool:
        for sub in pool.map(one, names):
            acc.merge(sub)
    return read_once(acc)


def _open_tar(path: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # uncompressed only: offsets must be positions in the file
    except (tarfile.TarError, OSError) as e:
        try:
            with open(path, "rb") as f:
                magic = f.read(3)
        except OSError:
            magic = b""
        hint = " (it is compressed: recompress as a plain .tar)" if magic in (b"\x1f\x8b\x08", b"BZh") else ""
        raise SourceError(f"cannot index {path} as an uncompressed tar: {e}{hint}") from None


def _tar_members(path: str, tar: tarfile.TarFile, limit: int, base: int, cls: str | None, acc: Acc, where: str):
    """Index a tar's image members: absolute offset = ``base`` + member's offset_data."""
    try:
        for m in tar:
            if m.isdir():
                continue
            name = os.path.basename(m.name)
            if not m.isfile() and is_image(name) and not name.startswith("."):
                acc.reject(f"{where}:{m.name}", "link member in archive", make_key(name))  # no bytes of its own
            elif not m.isfile() or name.startswith(".") or not is_image(name):
                acc.ignored.append(f"{where}:{m.name}")
            elif m.issparse() or m.offset_data + m.size > limit:
                acc.reject(f"{where}:{m.name}", "sparse tar member" if m.issparse() else "truncated archive member",
                           make_key(name))
            else:
                acc.entries.append(Entry(make_key(name), path, m.size, base + m.offset_data, True, cls))
    except (tarfile.TarError, OSError, EOFError) as e:
        acc.reject(where, f"unreadable tar: {e}")


def _index_inner(path: str, m: tarfile.TarInfo, cls: str) -> Acc:
    acc = Acc()
    with _open_tar(path) as outer:  # one handle per thread; the member's offsets are file positions
        try:
            inner = tarfile.open(fileobj=outer.extractfile(m), mode="r:")
        except (tarfile.TarError, OSError, EOFError) as e:
            acc.reject(f"{path}:{m.name}", f"unreadable inner tar: {e}")
            return acc
        with inner:
            _tar_members(path, inner, m.size, m.offset_data, cls, acc, f"{path}:{m.name}")
    return acc


def _index_train_tar(path: str) -> tuple[Acc, list[str]]:
    """ILSVRC2012_img_train.tar: an outer tar of per-class tars ``<wnid>.tar``, read in place."""
    acc, inner = Acc(), []
    with _open_tar(path) as outer:
        try:
            for m in outer:
                if m.isfile() and m.name.endswith(".tar"):
                    inner.append((os.path.basename(m.name)[:-4], m))
                elif m.isfile():
                    acc.ignored.append(f"{path}:{m.name}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SourceError(f"cannot index {path}: {e}") from None
    with ThreadPoolExecutor(_THREADS) as pool:
        for sub in pool.map(lambda cm: _index_inner(path, cm[1], cm[0]), inner):
            acc.merge(sub)
    return acc, sorted({c for c, _ in inner})


def _finish(split: str, acc: Acc, classes: list[str], description: dict, where: str) -> SourceListing:
    """Entries -> labelled, deduplicated, key-sorted items; the description gets the counts."""
    index, items = {c: i for i, c in enumerate(classes)}, []
    for key, path, size, offset, in_archive, cls, *_ in acc.entries:
        loc = SourceItem(key, 0, size, path, offset, in_archive).location
        if cls is None:
            acc.reject(loc, "no label", key)
        elif cls not in index:
            acc.reject(loc, "unknown class", key, **{"class": cls})
        elif size == 0:
            acc.reject(loc, "empty file", key)
        else:
            items.append(SourceItem(key, index[cls], size, path, offset, in_archive))
    items.sort(key=lambda it: (it.key, it.path, it.offset))
    taken, seen, renamed, unique = {it.key for it in items}, set(), 0, []
    for it in items:  # duplicate stems: the first (by path) keeps the key, the others get _1, _2 ...
        if it.key in seen:
            n = 1
            while f"{it.key}_{n}" in taken:
                n += 1
            taken.add(f"{it.key}_{n}")
            it, renamed = replace(it, key=f"{it.key}_{n}"), renamed + 1
        seen.add(it.key)
        unique.append(it)
    unique.sort(key=lambda it: it.key)
    rejects = sorted(acc.rejects, key=lambda r: (r["key"], r["path"]))
    links = sorted(acc.links, key=lambda r: (r["path"], r["target"]))
    if not unique:
        first = f" (e.g. {rejects[0]['path']}: {rejects[0]['reason']})" if rejects else ""
        linked = (f"; {len(links)} links left out (e.g. {links[0]['path']}: {links[0]['reason']})" if links else "")
        raise SourceError(f"no usable images for split {split} under {where}: {len(rejects)} rejected{first}{linked}")
    counts = [0] * len(classes)
    for it in unique:
        counts[it.label] += 1
    description.update(split=split, num_items=len(unique), num_classes=len(classes), num_rejects=len(rejects),
                       ignored_files=len(acc.ignored), ignored_examples=sorted(acc.ignored)[:5],
                       num_ignored_links=len(links), ignored_links=links[:_LINKS_LISTED],
                       # kept in the class map: dropping one would shift every later class index
                       empty_classes=[c for c, n in zip(classes, counts) if n == 0],
                       renamed_duplicate_keys=renamed, class_counts=dict(zip(classes, counts)))
    return SourceListing(split, unique, list(classes), description, rejects)


def _existing_dir(src: str, what: str) -> str:
    if not os.path.isdir(src):
        raise SourceError(f"{what} source not found: {src} is not a directory")
    return os.path.abspath(src)


def list_image_folder(src: str, split: str, classes: list[str] | None = None,
                      follow_links: bool = False) -> SourceListing:
    """``src/<class>/**/*.{jpg,jpeg,png,webp,...}``; classes = sorted subfolders or the given list
    (kept in its order; images of other classes become "unknown class" rejects). Links are
    ignored (counted, named) unless ``follow_links``: then followed inside ``src`` only."""
    root = _existing_dir(src, "image folder")
    walk = Walk.below(root, follow_links)
    names = subdirs(root, walk)
    if classes is None and not names:
        raise SourceError(f"no class folders under {root}: expected {root}/<class>/*.jpg")
    if classes is not None and len(set(classes)) != len(classes):
        raise SourceError(f"duplicate class names in the given class list for {root}")
    cls = list(names if classes is None else classes)
    acc = _scan_classes(root, names, walk)
    desc = dict(kind="image-folder", src=root, label_source="folder names",
                class_source="subfolders" if classes is None else "given list", follow_links=follow_links)
    return _finish(split, acc, cls, desc, root)


def _roots(src: str) -> list[str]:
    kaggle = os.path.join(src, "ILSVRC", "Data", "CLS-LOC")  # Kaggle's layout, labels csv at the top
    return [src] + ([kaggle] if os.path.isdir(kaggle) else [])


def _split_source(roots: list[str], split: str) -> tuple[str, str] | None:
    """("dir", path) for an extracted split that has any entries, else ("tar", path), else None."""
    for r in roots:
        d = os.path.join(r, split)
        if os.path.isdir(d):
            with os.scandir(d) as it:
                if any(not e.name.startswith(".") for e in it):
                    return "dir", d
    for r in roots:
        t = os.path.join(r, TRAIN_TAR if split == "train" else VAL_TAR)
        if os.path.isfile(t):
            return "tar", t
    return None


def _train_classes(kind: str, path: str, follow_links: bool) -> list[str]:
    if kind == "dir":
        return subdirs(path, Walk.below(path, follow_links))
    with _open_tar(path) as outer:
        return sorted({os.path.basename(m.name)[:-4] for m in outer if m.isfile() and m.name.endswith(".tar")})


def list_imagenet(src: str, split: str, follow_links: bool = False) -> SourceListing:
    """ImageNet under ``src``: ``train/<wnid>/*.JPEG`` or ``ILSVRC2012_img_train.tar`` (per-class tars);
    ``val/`` flat or in class folders, or ``ILSVRC2012_img_val.tar``, flat images labelled from the
    devkit (directory or tarball) or ``LOC_val_solution.csv``. Archives are read in place.
    ``train/`` and ``val/`` are found by name (either may be a link); links inside them are
    ignored (counted, named) unless ``follow_links``: then followed inside that folder only."""
    root = _existing_dir(src, "ImageNet")
    if split not in ("train", "val"):
        raise SourceError(f"unknown ImageNet split {split!r} for {root}: expected 'train' or 'val'")
    roots = _roots(root)
    found = _split_source(roots, split)
    if found is None:
        expected = ("train/<wnid>/*.JPEG or " + TRAIN_TAR if split == "train"
                    else "val/*.JPEG, val/<wnid>/*.JPEG or " + VAL_TAR)
        raise SourceError(f"no ImageNet {split} split under {root}: expected {expected}")
    kind, path = found
    desc = dict(kind="imagenet-folder" if kind == "dir" else "imagenet-archive", src=root, path=path,
                follow_links=follow_links)
    walk = Walk.below(path, follow_links)
    if split == "train":
        if kind == "dir":
            classes = subdirs(path, walk)
            acc = _scan_classes(path, classes, walk, recurse=False)
        else:
            acc, classes = _index_train_tar(path)
        desc.update(label_source="class folders" if kind == "dir" else "per-class tar names",
                    class_source="train split")
        return _finish(split, acc, classes, desc, root)

    if kind == "dir":
        folders = subdirs(path, walk)
        acc = _scan_classes(path, folders, walk, recurse=False)
    else:
        folders, acc = [], Acc()
        with _open_tar(path) as tar:
            _tar_members(path, tar, os.path.getsize(path), 0, None, acc, path)
    flat = [e for e in acc.entries if e.cls is None]
    desc["layout"] = "mixed" if flat and folders else "flat" if flat else "folders"
    train = _split_source(roots, "train")
    labels = find_val_labels(list(dict.fromkeys([root, *roots]))) if flat or train is None else None
    if flat and labels is None:
        raise SourceError(f"no ImageNet val labels under {root} for the flat val images: expected {LABELS_EXPECTED}")
    if flat:
        acc.entries = [e if e.cls is not None else e._replace(cls=labels.wnids.get(e.key)) for e in acc.entries]
        desc.update(label_source=labels.source, label_path=labels.path)
    else:
        desc["label_source"] = "class folders"
    if train is not None:
        classes, desc["class_source"] = _train_classes(*train, follow_links), "train split"
    elif labels is not None and labels.classes is not None:
        classes, desc["class_source"] = labels.classes, "devkit leaf synsets"
    else:
        classes = sorted(set(folders) | set(labels.wnids.values() if labels is not None else ()))
        desc["class_source"] = "wnids seen in " + ("LOC csv" if labels is not None else "val folders")
    return _finish(split, acc, classes, desc, root)
