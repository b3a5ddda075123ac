"""What ``crossmae-eval`` reads, checked before it is trusted: exports and manifests.

An export (pipelines/export.py writes them) is export.json, timm's config.json and
model.safetensors. config.json is checked against the sha256 export.json records when the export
is read; model.safetensors when a job loads it (Export.load: read once, hashed, then parsed from
the same bytes; crossmae.timm_export.load_export_tensors). A manifest (crossmae-prep) is hashed as
read; train and val must share a class map. Features an encoder gives must be finite.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from crossmae.interop import CheckpointError
from crossmae.timm_export import load_export_tensors

from pipelines.eval import knn
from pipelines import storage
from pipelines.storage.hashing import sha256_bytes


class UsageError(ValueError):
    """Bad input found before any work: one line, exit 2."""


class BadExport(ValueError):
    """An export whose encoder cannot give trustworthy numbers (non-finite features): exit 2."""


BAD_EXPORT = (BadExport, CheckpointError)  # CheckpointError: damaged (sha256), or does not fit timm


def read_json(url: str) -> dict:
    """A JSON object from storage; anything else is a ValueError naming the URL."""
    data = storage.read_bytes(url)
    try:
        value = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{url}: not a JSON object")
    return value


@dataclass
class Export:
    url: str
    config: dict  # timm config.json
    info: dict  # export.json (missing fields read as None)
    config_sha256: str | None = None  # of the config.json bytes read
    loaded: tuple | None = field(default=None, repr=False)  # load(): (tensors, sha256, verified) until release()

    @classmethod
    def read(cls, url: str) -> Export:
        """export.json and config.json; config.json is checked against export.json's sha256."""
        info, config_url = read_json(storage.join(url, "export.json")), storage.join(url, "config.json")
        data = storage.read_bytes(config_url)
        digest, meta = sha256_bytes(data), (info.get("files") or {}).get("config.json") or {}
        if meta.get("sha256") and meta["sha256"] != digest:
            raise CheckpointError(f"{url}: config.json does not match its export.json (sha256 {digest[:16]}, "
                                  f"recorded {str(meta['sha256'])[:16]}): damaged or replaced; export it again")
        try:
            config = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{config_url}: not valid JSON ({e})") from None
        return cls(url, config, info, digest)

    @property
    def step(self) -> int | None:
        return self.info.get("step")

    def load(self) -> tuple[dict, str, bool]:
        """(tensors, sha256 of the model.safetensors bytes read, verified against export.json): the
        file is read once and kept until release()."""
        if self.loaded is None:
            self.loaded = load_export_tensors(self.url, storage.read_bytes(storage.join(self.url, "model.safetensors")),
                                              self.info)
        return self.loaded

    def release(self) -> None:
        self.loaded = None

    @property
    def weights_sha256(self) -> str:
        """The weights' identity in cache names and result keys: as export.json records it (load()
        checks the file against it), or the read file's sha256 where nothing is recorded."""
        recorded = self.info.get("weights_sha256") or ((self.info.get("files") or {}).get("model.safetensors")
                                                       or {}).get("sha256")
        return recorded or self.load()[1]

    @property
    def image_size(self) -> int:
        try:
            return int(self.config["model_args"]["img_size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{storage.join(self.url, 'config.json')}: no model_args.img_size (not an export's "
                             "timm config)") from None

    def encoder(self) -> torch.nn.Module:
        from crossmae.timm_export import create_timm_encoder

        model, missing = create_timm_encoder(self.config, self.load()[0])
        if missing:
            raise ValueError(f"{self.url}: export lacks encoder weights {missing[:3]}")
        return model.eval().requires_grad_(False)


def find_exports(target: str) -> tuple[list[Export], dict[str, Exception], bool]:
    """(exports sorted by step then URL, {url: exception} of unreadable ones, whether ``target`` is
    itself an export rather than a prefix holding many)."""
    if storage.exists(storage.join(target, "export.json")):
        return [Export.read(target)], {}, True
    exports, broken = [], {}
    for url, _ in storage.list_objects(storage.join(target, "")):
        if url.endswith("/export.json"):
            try:
                exports.append(Export.read(url[:-len("/export.json")]))
            except (OSError, ValueError) as e:  # JSONDecodeError, CheckpointError are ValueErrors
                broken[url[:-len("/export.json")]] = e
    return sorted(exports, key=lambda e: (e.step is None, e.step or 0, e.url)), broken, False


@dataclass
class Dataset:
    manifest: str
    sha256: str
    split: str
    num_samples: int
    num_classes: int
    classes_sha256: str | None = None  # of the label -> class name list (the class map); None: the manifest has none

    @classmethod
    def read(cls, url: str) -> Dataset:
        try:
            data = storage.read_bytes(url)
            m = json.loads(data)
            classes = m.get("classes") or []
            return cls(url, sha256_bytes(data), m.get("split", "unknown"), int(m["num_samples"]),
                       len(classes), sha256_bytes(json.dumps(classes).encode()) if classes else None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"manifest {url}: {type(e).__name__}: {e} (write one with crossmae-prep)") from e


def check_same_classes(train: Dataset, val: Dataset) -> None:
    """Labels only mean the same class under one class map: a k-NN or probe across two maps
    gives a number (20% top-1 was seen) that means nothing."""
    if train.classes_sha256 and val.classes_sha256 and train.classes_sha256 != val.classes_sha256:
        raise UsageError(f"--train and --val have different class maps ({train.num_classes} vs {val.num_classes} "
                         f"classes; label i is a different class): {train.manifest} vs {val.manifest}")


def check_finite(export: Export, feats: knn.Features, data: Dataset, why: str) -> knn.Features:
    """NaN / inf features make every vote and probe meaningless (8% top-1 on 10 classes was
    reported for a damaged export): an error naming the export, never a number."""
    bad = int((~(torch.isfinite(feats.avg).all(1) & torch.isfinite(feats.cls).all(1))).sum())
    if bad:
        raise BadExport(f"{export.url}: the encoder gives non-finite features for {bad} of {len(feats.label)} "
                        f"{data.split} samples ({why}); nothing evaluated")
    return feats
