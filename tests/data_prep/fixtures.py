"""Small, realistic data-prep fixtures generated in the test itself: real JPEGs written by Pillow
from synthetic content, in ImageNet's extracted layout, its original archives (nested train tar,
flat val tar, devkit with shuffled ILSVRC2012_IDs, Kaggle LOC csv), generic image folders and
broken images. The tree and the archive builders produce the same images (same bytes).
"""
from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n02102040")  # tench, goldfish, English springer
NON_LEAVES = (("n00001740", "entity"), ("n01440160", "fish"))  # synsets with children: never classes
DEVKIT = "ILSVRC2012_devkit_t12"
GT = f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt"
META = f"{DEVKIT}/data/meta.mat"


def synthetic_image(rng: np.random.Generator, lo: int = 40, hi: int = 120, mode: str = "RGB") -> Image.Image:
    """Gradients, a blob and a little noise at a random size in [lo, hi]: compresses like a photo."""
    h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    f, phase, (cx, cy) = rng.uniform(2, 9, 3), rng.uniform(0, 6.3, 3), rng.uniform(0.2, 0.8, 2)
    blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) * 20)
    chans = [np.sin(f[c] * (xs + ys * (c + 1) / 3) + phase[c]) * 0.4 + blob * 0.5 + 0.3 for c in range(3)]
    arr = np.stack(chans, -1) + rng.normal(0, 0.03, (h, w, 3))
    return Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).convert(mode)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class ImageNetFixture:
    root: Path
    classes: list[str]  # sorted wnids: label i -> classes[i]
    train: dict[str, tuple[str, bytes]]  # key "n01440764_10026" -> (wnid, JPEG bytes)
    val: dict[str, tuple[str, bytes]]  # key "ILSVRC2012_val_00000001" -> (wnid, JPEG bytes)
    devkit_ids: dict[str, int]  # wnid -> devkit ILSVRC2012_ID (deliberately not sorted-wnid order)
    files: dict[str, Path] = field(default_factory=dict)  # what was written: "train", "val", "devkit", ...

    def label(self, wnid: str) -> int:
        return self.classes.index(wnid)


def imagenet_images(classes=CLASSES, per_class: int = 4, val_per_class: int = 2, seed: int = 0) -> ImageNetFixture:
    """The images only (no files): same arguments -> same keys, labels and bytes."""
    rng = np.random.default_rng(seed)
    classes = sorted(classes)
    train = {}
    for wnid in classes:
        for n in sorted(rng.choice(np.arange(1, 20000), per_class, replace=False)):
            train[f"{wnid}_{n}"] = (wnid, jpeg_bytes(synthetic_image(rng), int(rng.integers(75, 96))))
    val_wnids = [w for w in classes for _ in range(val_per_class)]
    val = {f"ILSVRC2012_val_{i:08d}": (w, jpeg_bytes(synthetic_image(rng)))
           for i, w in enumerate(rng.permutation(val_wnids).tolist(), 1)}
    # devkit IDs: a rotation of the sorted order, so no class has ID == sorted index + 1
    ids = {w: (i + 1) % len(classes) + 1 for i, w in enumerate(classes)}
    return ImageNetFixture(Path(), classes, train, val, ids)


def write_meta_mat(path: Path, fx: ImageNetFixture) -> None:
    """meta.mat as the devkit has it: a struct array ``synsets`` (leaves and non-leaves, shuffled)."""
    from scipy.io import savemat

    n = len(fx.classes)
    rows = [(n + 1 + j, w, words, 2) for j, (w, words) in enumerate(NON_LEAVES)]
    rows += sorted(((i, w, f"class {w}", 0) for w, i in fx.devkit_ids.items()), reverse=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(rows), 1), dtype=dtype)
    for r, (i, w, words, nc) in enumerate(rows):
        synsets[r, 0] = (np.array([[i]], dtype=np.uint16), w, words, np.array([[nc]], dtype=np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})


def ground_truth(fx: ImageNetFixture) -> str:
    return "".join(f"{fx.devkit_ids[fx.val[k][0]]}\n" for k in sorted(fx.val))


def write_devkit(root: Path, fx: ImageNetFixture, form: str = "dir") -> Path:
    """``ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}`` or its .tar.gz."""
    if form == "dir":
        write_meta_mat(root / META, fx)
        (root / GT).write_text(ground_truth(fx))
        return root / DEVKIT
    tmp = root / "_meta_tmp.mat"
    write_meta_mat(tmp, fx)
    out = root / f"{DEVKIT}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        _add(tar, META, tmp.read_bytes())
        _add(tar, GT, ground_truth(fx).encode())
        _add(tar, f"{DEVKIT}/readme.txt", b"ILSVRC2012 devkit (test fixture)\n")
    tmp.unlink()
    return out


def write_loc_csv(root: Path, fx: ImageNetFixture, seed: int = 0) -> Path:
    """Kaggle's ``LOC_val_solution.csv``: rows in random order, PredictionString = boxes with the wnid."""
    rng = np.random.default_rng(seed)
    out = root / "LOC_val_solution.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for k in rng.permutation(sorted(fx.val)).tolist():
            wnid = fx.val[k][0]
            w.writerow([k, f"{wnid} 0 0 10 10 {wnid} 5 5 20 20 "])
    return out


def _labels(root: Path, fx: ImageNetFixture, labels: str | None) -> None:
    if labels in ("devkit", "devkit-tar"):
        fx.files["devkit"] = write_devkit(root, fx, "dir" if labels == "devkit" else "tar")
    elif labels == "loc":
        fx.files["loc"] = write_loc_csv(root, fx)
    elif labels is not None:
        raise ValueError(f"labels: 'devkit', 'devkit-tar', 'loc' or None, not {labels!r}")


def make_imagenet_tree(root, classes=CLASSES, per_class: int = 4, val_per_class: int = 2, val_layout: str = "flat",
                       labels: str | None = "devkit", seed: int = 0) -> ImageNetFixture:
    """Extracted ImageNet: ``train/<wnid>/<wnid>_<n>.JPEG``; ``val/`` flat (labels from ``labels``) or
    in class folders ``val/<wnid>/ILSVRC2012_val_*.JPEG``."""
    fx = imagenet_images(classes, per_class, val_per_class, seed)
    fx.root = root = Path(root)
    for key, (wnid, data) in fx.train.items():
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "train" / wnid / f"{key}.JPEG").write_bytes(data)
    for key, (wnid, data) in fx.val.items():
        d = root / "val" / (wnid if val_layout == "folders" else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.JPEG").write_bytes(data)
    fx.files.update(train=root / "train", val=root / "val")
    _labels(root, fx, labels)
    return fx


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_338_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_imagenet_archives(root, classes=CLASSES, per_class: int = 4, val_per_class: int = 2,
                           labels: str | None = "devkit-tar", seed: int = 0, train: bool = True,
                           val: bool = True) -> ImageNetFixture:
    """The original archives: ``ILSVRC2012_img_train.tar`` (GNU outer tar of per-class ``<wnid>.tar``,
    each a PAX tar of ``<wnid>_<n>.JPEG``) and the flat ``ILSVRC2012_img_val.tar``, same images as
    ``make_imagenet_tree`` with the same arguments."""
    fx = imagenet_images(classes, per_class, val_per_class, seed)
    fx.root = root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if train:
        fx.files["train"] = root / "ILSVRC2012_img_train.tar"
        with tarfile.open(fx.files["train"], "w", format=tarfile.GNU_FORMAT) as outer:
            for wnid in fx.classes:
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as inner:
                    for key, (w, data) in fx.train.items():
                        if w == wnid:
                            _add(inner, f"{key}.JPEG", data)
                _add(outer, f"{wnid}.tar", buf.getvalue())
    if val:
        fx.files["val"] = root / "ILSVRC2012_img_val.tar"
        with tarfile.open(fx.files["val"], "w", format=tarfile.GNU_FORMAT) as tar:
            for key, (_, data) in fx.val.items():
                _add(tar, f"{key}.JPEG", data)
    _labels(root, fx, labels)
    return fx


def make_image_folder(root, classes=("cat", "dog", "eel"), per_class: int = 3, seed: int = 0) -> dict:
    """``root/<class>/<class>_<i>.jpg``; returns {key: (class, bytes)}."""
    rng, out, root = np.random.default_rng(seed), {}, Path(root)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            data = jpeg_bytes(synthetic_image(rng))
            (root / c / f"{c}_{i:04d}.jpg").write_bytes(data)
            out[f"{c}_{i:04d}"] = (c, data)
    return out


def make_bad_images(directory, seed: int = 0) -> dict[str, str]:
    """Broken and odd images as they occur in the wild (ImageNet has CMYK, grayscale and a PNG
    named .JPEG); returns {file name: kind}."""
    rng, d = np.random.default_rng(seed), Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(synthetic_image(rng))
    png = io.BytesIO()
    synthetic_image(rng).save(png, format="PNG")
    files = {
        "truncated.JPEG": ("truncated", good[: len(good) // 2]),
        "empty.JPEG": ("empty", b""),
        "cmyk.JPEG": ("cmyk", jpeg_bytes(synthetic_image(rng, mode="CMYK"))),
        "gray.JPEG": ("grayscale", jpeg_bytes(synthetic_image(rng, mode="L"))),
        "png_named.JPEG": ("png", png.getvalue()),
        "random.JPEG": ("random", rng.bytes(700)),
    }
    for name, (_, data) in files.items():
        (d / name).write_bytes(data)
    return {name: kind for name, (kind, _) in files.items()}
