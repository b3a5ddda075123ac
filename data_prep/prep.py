"""Shard a split: plan -> (this worker's) shards -> part records -> manifest.

Layout written under ``DST/{split}/``::

    {split}-000000.tar ...    the shards
    _plan.json                the plan every worker derived (digest, shard names, classes, source)
    _parts/{shard}.json       one record per finished shard (count, bytes, sha256, rejects)
    manifest.json             written LAST by finalize: its presence marks the split complete

A shard counts as done when its part record carries the current plan digest and the shard
object has the recorded size; the record is written only after the shard is durable, so a
crash at any point leaves either a finished shard or one that is rewritten, byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
import tarfile
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

from tqdm import tqdm

from pipelines import storage
from pipelines.data.shard_names import ShardNameError, shard_url
from pipelines.data.tar_reader import sample_starts

from .errors import PrepError, as_prep_error
from .plan import Shard, make_plan, plan_digest, worker_slice
from .shards import SAMPLE_INDEX_EVERY, ImageOptions, write_shard
from .sources import SourceListing, read_item


@dataclass(frozen=True)
class PrepOptions:
    seed: int = 0
    shard_bytes: int | None = 1_000_000_000
    shard_samples: int | None = None
    image: ImageOptions = ImageOptions()
    processes: int = 1
    num_workers: int = 1
    worker_index: int = 0
    sample_index_every: int = SAMPLE_INDEX_EVERY  # the manifest's sample index (data_prep/shards.py); 0: none


def tool_version() -> str:
    try:
        return version("crossmae-pipeline")
    except PackageNotFoundError:
        return "unknown"


def _json(url: str, damaged_is_missing: bool = False) -> dict | None:
    """The JSON object at ``url``; None when it does not exist (or, with ``damaged_is_missing``,
    is not a JSON object: a part record that is redone rather than trusted)."""
    try:
        obj = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        if damaged_is_missing:
            return None
        raise PrepError(f"{url}: damaged, not JSON ({e}); delete it to redo that step") from None
    if not isinstance(obj, dict):
        if damaged_is_missing:
            return None
        raise PrepError(f"{url}: damaged, a JSON {type(obj).__name__} instead of an object; "
                        "delete it to redo that step")
    return obj


def _put_json(url: str, obj: dict) -> None:
    storage.write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def _is_done(split_url: str, shard: Shard, digest: str) -> bool:
    part = _json(storage.join(split_url, "_parts", shard.name + ".json"), damaged_is_missing=True)
    if not part or part.get("plan_digest") != digest:
        return False
    try:
        return storage.size(storage.join(split_url, shard.name)) == part.get("bytes")
    except FileNotFoundError:
        return False


def _write_one(args) -> dict:
    split_url, shard, items, digest, image_opts, index_every = args
    url = storage.join(split_url, shard.name)
    try:
        storage.remove_partial_writes(url)  # a killed earlier attempt's leftovers
        record = write_shard(url, items, read_item, image_opts, index_every=index_every)
        record.update(name=shard.name, index=shard.index, plan_digest=digest)
        _put_json(storage.join(split_url, "_parts", shard.name + ".json"), record)  # only after the shard is durable
    except (OSError, MemoryError) as e:  # a write to the open shard names no file: say which one
        raise as_prep_error(e, url) from None
    return record


def _write_parallel(jobs: list, processes: int, split_url: str):
    """Shard records as the processes finish them. A process the OS kills (out of memory, a
    signal) is an error at once: multiprocessing.Pool would wait for its result forever."""
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(_write_one, job) for job in jobs]
        try:
            for done in as_completed(futures):
                yield done.result()
        except BrokenProcessPool:
            raise PrepError(f"a crossmae-prep process writing shards of {split_url} died (killed by the OS: "
                            "out of memory? or by a signal); re-run the same command to resume") from None
        finally:
            for f in futures:
                f.cancel()


def prepare_split(listing: SourceListing, dst: str, opts: PrepOptions, progress: bool | None = None) -> dict:
    """Write this worker's shards of one split; finalize when it is the only worker."""
    t0 = time.time()
    split_url = storage.join(dst, listing.split)
    keys = [it.key for it in listing.items]
    shards = make_plan([it.size for it in listing.items], listing.split, opts.seed, opts.shard_bytes,
                       opts.shard_samples)
    options = dict(seed=opts.seed, shard_bytes=opts.shard_bytes, shard_samples=opts.shard_samples,
                   **asdict(opts.image))
    if not options["restarts"]:  # absent unless asked for: the digests of plans made before it stay the same
        del options["restarts"]
    digest = plan_digest(keys, shards, options)
    if _json(storage.join(split_url, "manifest.json")) is not None:
        existing = _json(storage.join(split_url, "manifest.json"))
        if existing.get("plan_digest") == digest:
            return dict(split=listing.split, skipped_shards=len(shards), written_shards=0, complete=True)
        raise PrepError(f"{split_url} already holds a finished dataset made with other inputs or options; "
                        "choose another destination")
    _put_json(storage.join(split_url, "_plan.json"), dict(
        split=listing.split, plan_digest=digest, options=options, classes=listing.classes,
        source=listing.description, listing_rejects=listing.rejects, tool=dict(name="crossmae-prep",
        version=tool_version()), shards=[dict(name=s.name, planned_samples=len(s.items)) for s in shards]))

    mine = worker_slice(shards, opts.num_workers, opts.worker_index)
    todo = [s for s in mine if not _is_done(split_url, s, digest)]
    jobs = [(split_url, s, [listing.items[i] for i in s.items], digest, opts.image,
             opts.sample_index_every) for s in todo]
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(len(s.items) for s in todo), unit="img", desc=f"{listing.split}", disable=not show)
    records = []
    parallel = opts.processes > 1 and len(jobs) > 1
    for rec in _write_parallel(jobs, opts.processes, split_url) if parallel else map(_write_one, jobs):
        records.append(rec)
        bar.update(sum(rec["status"].values()))
    bar.close()
    summary = dict(split=listing.split, planned_shards=len(shards), worker_shards=len(mine),
                   skipped_shards=len(mine) - len(todo), written_shards=len(records),
                   written_samples=sum(r["num_samples"] for r in records),
                   # listing-time rejects are every worker's, so only worker 0 counts them: the workers'
                   # summaries add up to the manifest's num_rejected
                   rejected=sum(len(r["rejects"]) for r in records) + (len(listing.rejects) if opts.worker_index == 0
                                                                       else 0),
                   converted=sum(len(r["converted"]) for r in records),
                   resized=sum(r.get("num_resized", 0) for r in records),
                   **(dict(restarts=merge_restarts(records)) if opts.image.restarts else {}),
                   seconds=round(time.time() - t0, 3))
    if opts.num_workers == 1:
        summary["manifest_samples"] = finalize(dst, listing.split)["num_samples"]
    return summary


def merge_restarts(parts: list[dict]) -> dict | None:
    """The --jpeg-restarts counts of these part records, added up (None: none was written with it)."""
    recs = [p["restarts"] for p in parts if "restarts" in p]
    if not recs:
        return None
    kept = Counter()
    for r in recs:
        kept.update(r["kept"])
    return dict(transcoded=sum(r["transcoded"] for r in recs), kept=dict(sorted(kept.items())),
                bytes_before=sum(r["bytes_before"] for r in recs), bytes_after=sum(r["bytes_after"] for r in recs))


def finalize(dst: str, split: str) -> dict:
    """Assemble ``manifest.json`` from the plan and every part record; fail naming what is missing."""
    split_url = storage.join(dst, split)
    plan_url = storage.join(split_url, "_plan.json")
    plan = _json(plan_url)
    if plan is None:
        raise PrepError(f"no _plan.json under {split_url}: nothing was prepared there")
    try:
        names = [s["name"] for s in plan["shards"]]
        shards, missing = [], []
        for name in names:
            shard_url(plan_url, name)  # the manifest will list it: it must stay inside the split's folder
            part = _json(storage.join(split_url, "_parts", name + ".json"), damaged_is_missing=True)
            if not part or part.get("plan_digest") != plan["plan_digest"] or part.get("name") != name:
                missing.append(name)
            else:
                shards.append(part)
        if missing:
            raise PrepError(f"{len(missing)} of {len(names)} shards of {split_url} are not finished "
                            f"(first: {missing[0]}); run the missing workers, then finalize again")
        rejects = list(plan["listing_rejects"]) + [r for p in shards for r in p["rejects"]]
        return write_manifest(split_url, "webdataset", plan, shards, rejects,
                              [c for p in shards for c in p["converted"]], sum(p.get("num_resized", 0) for p in shards))
    except (KeyError, TypeError, AttributeError) as e:  # a record of another version, or edited by hand
        raise PrepError(f"{split_url}: damaged _plan.json or part record ({type(e).__name__}: {e}); "
                        "re-run the prep command to rewrite them") from None


def write_manifest(split_url: str, fmt: str, plan: dict, shards: list[dict], rejects: list, converted: list,
                   num_resized: int = 0) -> dict:
    """The one manifest schema (WebDataset and FFCV), written LAST: it marks the split complete.
    Rejects and conversions are listed (key, source path, reason); --max-size re-encodes are only
    counted (with --max-size most of ImageNet's 1.28 M images are re-encoded: a list would be huge)."""
    # the sample index's stride: that of most shards (a resumed prep may hold parts written with another
    # --sample-index-every, or none: those shards get no index, and are streamed from their start)
    every = Counter(p.get("sample_index_every", 0) for p in shards).most_common(1)[0][0] if shards else 0
    manifest = dict(
        format=fmt, split=plan["split"], plan_digest=plan["plan_digest"],
        num_samples=sum(p["num_samples"] for p in shards), num_shards=len(shards),
        shards=[dict(name=p["name"], num_samples=p["num_samples"], bytes=p["bytes"], sha256=p["sha256"],
                     **({"sample_index": p["sample_index"]} if every and p.get("sample_index_every") == every else {}))
                for p in shards],
        **({"sample_index_every": every} if every else {}),
        classes=plan["classes"], class_map={c: i for i, c in enumerate(plan["classes"])},
        source=plan["source"], options=plan["options"], tool=plan["tool"],
        num_rejected=len(rejects), rejects=rejects, num_converted=len(converted), converted=converted,
        num_resized=num_resized,
        # --jpeg-restarts: samples rewritten with restart markers, and those kept as they were (reason -> n)
        **({"jpeg_restarts": merge_restarts(shards)} if any("restarts" in p for p in shards) else {}),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _put_json(storage.join(split_url, "manifest.json"), manifest)
    return manifest


def prepare_ffcv(listing: SourceListing, dst: str, opts: PrepOptions, ffcv_opts) -> dict:
    """One .beton for the split, then its manifest; skipped when an identical one is complete."""
    from .ffcv_out import ffcv_plan, write_ffcv_split

    if opts.num_workers > 1:
        raise PrepError("FFCV output is one file per split: use --processes, not --num-workers")
    split_url = storage.join(dst, listing.split)
    existing = _json(storage.join(split_url, "manifest.json"))
    if existing is not None:
        if existing.get("plan_digest") == ffcv_plan(listing, opts.seed, opts.image.validate, ffcv_opts)[2]:
            return dict(split=listing.split, written_shards=0, skipped_shards=1, complete=True)
        raise PrepError(f"{split_url} already holds a finished dataset made with other inputs or options; "
                        "choose another destination")
    try:
        rec = write_ffcv_split(listing, dst, opts.seed, opts.image.validate, ffcv_opts, opts.processes)
    except ImportError as e:
        raise PrepError(f"--format ffcv needs the ffcv package, not installed here ({e}): "
                        "pip install 'crossmae-pipeline[ffcv]'") from None
    except (OSError, MemoryError) as e:  # FFCV writes a local temp file, then uploads it
        raise as_prep_error(e, storage.join(split_url, f"{listing.split}.beton")) from None
    plan = dict(split=listing.split, plan_digest=rec["plan_digest"], options=rec["options"],
                classes=listing.classes, source=listing.description, tool=dict(name="crossmae-prep",
                version=tool_version()))
    manifest = write_manifest(split_url, "ffcv", plan, [rec], rec["rejects"], rec["converted"])
    return dict(split=listing.split, written_shards=1, skipped_shards=0, written_samples=manifest["num_samples"],
                rejected=manifest["num_rejected"], converted=manifest["num_converted"], seconds=rec["seconds"])


def prepared_splits(dst: str) -> dict[str, set[str]]:
    """{split: which of manifest.json / _plan.json it holds} for every split folder directly under ``dst``."""
    found: dict[str, set[str]] = {}
    for url, _ in storage.list_objects(storage.join(dst, "")):
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] in ("manifest.json", "_plan.json"):
            split = urllib.parse.unquote(parts[-2]) if url.startswith("file://") else parts[-2]
            if storage.exists(storage.join(dst, split, parts[-1])):  # directly under dst, not deeper
                found.setdefault(split, set()).add(parts[-1])
    return dict(sorted(found.items()))


def verify(dst: str, split: str, progress: bool | None = None) -> dict:
    """Re-read every shard of a finished split; compare sizes and sha256 with the manifest, and its
    sample index (if it has one) with the samples' first headers."""

    split_url = storage.join(dst, split)
    manifest_url = storage.join(split_url, "manifest.json")
    manifest = _json(manifest_url)
    if manifest is None:
        raise PrepError(f"no manifest.json under {split_url}: the split is missing or unfinished")
    try:
        listed = [(shard_url(manifest_url, s["name"]), s["name"], int(s["bytes"]), str(s["sha256"]))
                  for s in manifest["shards"]]
        num_samples = manifest["num_samples"]
    except ShardNameError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise PrepError(f"{manifest_url}: malformed shard list ({type(e).__name__}: {e})") from None
    every = manifest.get("sample_index_every", 0)
    indexes = [s.get("sample_index") if every and isinstance(s, dict) else None for s in manifest["shards"]]
    missing, corrupt, bad_index = [], [], []
    show = sys.stderr.isatty() if progress is None else progress
    for (url, name, nbytes, sha256), index in tqdm(list(zip(listed, indexes)), desc=f"verify {split}", unit="shard",
                                                   disable=not show):
        try:
            with storage.open_read(url) as f:
                f = _Hashing(f)
                starts = None
                if index is not None:  # the sample index must name the samples' first headers
                    try:
                        starts = sample_starts(f)[::every]
                    except (tarfile.TarError, ValueError):
                        pass  # damaged: the hash says so
                while chunk := f.read(1 << 20):
                    pass
        except FileNotFoundError:
            missing.append(name)
            continue
        if f.n != nbytes or f.sha.hexdigest() != sha256:
            corrupt.append(name)
        elif index is not None and starts != index:
            bad_index.append(name)
    return dict(split=split, shards=len(listed), num_samples=num_samples, missing=missing, corrupt=corrupt,
                bad_index=bad_index, ok=not missing and not corrupt and not bad_index)


class _Hashing:
    """A reader that hashes and counts every byte read through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.n += len(data)
        return data
