"""ImageNet validation labels: the ILSVRC2012 devkit (directory or tarball, never extracted) or
Kaggle's ``LOC_val_solution.csv``.

The devkit's ground-truth file holds one ILSVRC2012_ID per line (line i = image
``ILSVRC2012_val_{i:08d}``). Those IDs (1..1000) are the devkit's own numbering, NOT indices
into the sorted wnid list: they are mapped to WNIDs through ``meta.mat``'s ``synsets`` struct
(the 1000 leaf classes have ``num_children == 0``); the caller maps wnid -> sorted index.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from dataclasses import dataclass

DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_TARS = ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12.tgz", "ILSVRC2012_devkit_t12.tar")
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
LOC_CSV = "LOC_val_solution.csv"
VAL_KEY = re.compile(r"ILSVRC2012_val_(\d+)")


class SourceError(ValueError):
    """Bad input (missing split, unreadable archive, inconsistent labels): one clear line."""


@dataclass
class ValLabels:
    wnids: dict[str, str]  # sample key ("ILSVRC2012_val_00000001") -> wnid
    classes: list[str] | None  # the devkit's sorted leaf wnids; None for the CSV (use the wnids seen)
    source: str  # "devkit" | "devkit-tar" | "loc-csv"
    path: str


def val_key(index: int) -> str:
    return f"ILSVRC2012_val_{index:08d}"


def _scalar(x):
    """loadmat wraps scalars and strings in (0-d or 1-element) arrays, more or less deeply."""
    while hasattr(x, "shape") and hasattr(x, "dtype"):
        if x.size != 1:
            raise ValueError(f"expected one value, got shape {x.shape}")
        x = x.reshape(-1)[0]
    return x.item() if hasattr(x, "item") and not isinstance(x, str) else x


def leaf_synsets(meta, where: str) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} for the leaf synsets (num_children == 0) of a devkit meta.mat."""
    import numpy as np
    from scipy.io import loadmat

    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
    except KeyError:
        raise SourceError(f"{where}: no 'synsets' struct in meta.mat") from None
    except Exception as e:  # scipy raises ValueError / MatReadError / TypeError on bad files
        raise SourceError(f"{where}: cannot read meta.mat: {e}") from None
    names = synsets.dtype.names or ()
    missing = {"ILSVRC2012_ID", "WNID", "num_children"} - set(names)
    if missing:
        raise SourceError(f"{where}: meta.mat synsets lack field(s) {sorted(missing)}")
    leaves = {}
    for rec in np.atleast_1d(synsets).reshape(-1):
        if int(_scalar(rec["num_children"])) == 0:
            leaves[int(_scalar(rec["ILSVRC2012_ID"]))] = str(_scalar(rec["WNID"])).strip()
    if not leaves:
        raise SourceError(f"{where}: meta.mat has no leaf synsets (num_children == 0)")
    return leaves


def devkit_labels(ground_truth: str, leaves: dict[int, str], where: str) -> dict[str, str]:
    out = {}
    for i, line in enumerate(ground_truth.split(), 1):
        try:
            wnid = leaves[int(line)]
        except (ValueError, KeyError):
            raise SourceError(f"{where}: line {i}: {line!r} is not the ILSVRC2012_ID of a leaf synset "
                              "in meta.mat") from None
        out[val_key(i)] = wnid
    if not out:
        raise SourceError(f"{where}: empty validation ground truth")
    return out


def _from_devkit_dir(path: str) -> ValLabels:
    with open(os.path.join(path, META), "rb") as f:
        leaves = leaf_synsets(f, path)
    with open(os.path.join(path, GROUND_TRUTH)) as f:
        labels = devkit_labels(f.read(), leaves, os.path.join(path, GROUND_TRUTH))
    return ValLabels(labels, sorted(set(leaves.values())), "devkit", path)


def _from_devkit_tar(path: str) -> ValLabels:
    """Read meta.mat and the ground truth straight out of the tarball (nothing is extracted)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            found = {}
            for m in tar:
                name = m.name.lstrip("./")
                for want in (META, GROUND_TRUTH):
                    if m.isfile() and (name == want or name.endswith("/" + want)):
                        found[want] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"cannot read devkit archive {path}: {e}") from None
    if len(found) < 2:
        lacking = " and ".join(w for w in (META, GROUND_TRUTH) if w not in found)
        raise SourceError(f"devkit archive {path} lacks {lacking}")
    leaves = leaf_synsets(io.BytesIO(found[META]), path)
    labels = devkit_labels(found[GROUND_TRUTH].decode(), leaves, f"{path}:{GROUND_TRUTH}")
    return ValLabels(labels, sorted(set(leaves.values())), "devkit-tar", path)


def _from_loc_csv(path: str) -> ValLabels:
    """Kaggle: ``ImageId,PredictionString`` with the wnid as the first token of PredictionString."""
    labels = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: expected the header 'ImageId,PredictionString'")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if row["ImageId"] and tokens:
                labels[row["ImageId"].strip()] = tokens[0]
    if not labels:
        raise SourceError(f"{path}: no labelled rows")
    return ValLabels(labels, None, "loc-csv", path)


def find_val_labels(dirs: list[str]) -> ValLabels | None:
    """The first label source found under ``dirs``: devkit directory, devkit tarball, LOC csv."""
    for d in dirs:
        p = os.path.join(d, DEVKIT_DIR)
        if os.path.isfile(os.path.join(p, META)) and os.path.isfile(os.path.join(p, GROUND_TRUTH)):
            return _from_devkit_dir(p)
    for d in dirs:
        for name in DEVKIT_TARS:
            if os.path.isfile(os.path.join(d, name)):
                return _from_devkit_tar(os.path.join(d, name))
    for d in dirs:
        if os.path.isfile(os.path.join(d, LOC_CSV)):
            return _from_loc_csv(os.path.join(d, LOC_CSV))
    return None


LABELS_EXPECTED = (f"{DEVKIT_DIR}/{GROUND_TRUTH} with {DEVKIT_DIR}/{META}, {DEVKIT_TARS[0]} or {LOC_CSV}")
