"""Checkpoint mirroring to any storage URL, selection for resume, and pruning.

Layout under a store ``S`` (local path or ``s3://``)::

    S/checkpoints/<tag>/...        every file of the DeepSpeed checkpoint directory, with each
                                   node's MANIFEST.<node>.json (sizes, sha256: checkpoint_integrity.py)
    S/checkpoints/<tag>/COMPLETE   written after all of the tag's files are durable
    S/latest                       {"tag": ..., "step": ...}: written last, names a COMPLETE tag
    S/metrics.jsonl, S/tensorboard/..., S/recon/*.png    the run's history (global rank 0)

A crash at any point leaves ``latest`` naming the previous complete checkpoint. The history is
append-only: a stored file is only replaced by a local one that is further along.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys

from pipelines import storage

METRICS = "metrics.jsonl"
TAG = re.compile(r"(step\d{8,}|epoch\d{4,})")  # pretraining steps, fine-tuning epochs
HISTORY_DIRS = {"tensorboard": "", "recon": ".png"}  # folder -> name suffix mirrored ("" = every file)


def complete_tags(run: str) -> list[str]:
    """Complete checkpoint tags under RUN/checkpoints/, oldest first: a tag counts once its COMPLETE
    marker exists. RUN is a local run directory or a store URL (s3://...)."""
    if "://" in run:
        prefix = storage.join(run, "checkpoints") + "/"
        tags = {u[len(prefix):].split("/")[0] for u, _ in storage.list_objects(prefix) if u.endswith("/COMPLETE")}
    else:
        root = os.path.join(run, "checkpoints")
        tags = {t for t in os.listdir(root) if os.path.exists(os.path.join(root, t, "COMPLETE"))} \
            if os.path.isdir(root) else set()
    return sorted(t for t in tags if TAG.fullmatch(t))


def files(local_dir: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(local_dir):
        out += [os.path.relpath(os.path.join(dirpath, n), local_dir) for n in names]
    return sorted(f for f in out if f != "COMPLETE")


def upload(local_root: str, tag: str, store: str, names: list[str] | None = None) -> None:
    """Copy ``names`` (default: all files) of local_root/tag into the store. Call from every node
    (each uploads what its ranks wrote), then ``publish`` once from global rank 0."""
    local_dir = os.path.join(local_root, tag)
    for rel in names if names is not None else files(local_dir):
        with open(os.path.join(local_dir, rel), "rb") as src, \
                storage.open_write(storage.join(store, "checkpoints", tag, rel)) as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)


def publish(store: str, tag: str, step: int, expected_files: list[str]) -> None:
    """Mark the tag complete and point ``latest`` at it, after checking every file arrived."""
    prefix = storage.join(store, "checkpoints", tag) + "/"
    present = {url[len(prefix):] for url, _ in storage.list_objects(prefix)}
    missing = sorted(set(expected_files) - present)
    if missing:
        raise storage.StorageError(f"checkpoint {tag} is missing {len(missing)} files in {store} (first: {missing[0]})")
    storage.write_bytes(storage.join(store, "checkpoints", tag, "COMPLETE"), str(step).encode())
    storage.write_bytes(storage.join(store, "latest"), json.dumps(dict(tag=tag, step=step)).encode())


def latest_record(store: str) -> dict | None:
    """The store's ``latest`` as written ({"tag", "step"}), whether or not its tag is still
    complete; None when there is none. A file that is not a record is a StorageError."""
    try:
        pointer = json.loads(storage.read_bytes(storage.join(store, "latest")))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise storage.StorageError(f"{storage.join(store, 'latest')}: not a checkpoint record ({e})") from None
    try:
        return dict(tag=str(pointer["tag"]), step=int(pointer["step"]))
    except (KeyError, TypeError, ValueError):
        raise storage.StorageError(f"{storage.join(store, 'latest')}: not a checkpoint record ({pointer!r:.80})") from None


def latest(store: str) -> dict | None:
    """The store's ``latest`` when it names a complete tag."""
    pointer = latest_record(store)
    if pointer and storage.exists(storage.join(store, "checkpoints", pointer["tag"], "COMPLETE")):
        return pointer
    return None


def download(store: str, tag: str, local_root: str) -> str:
    """Fetch a complete tag into local_root/tag (skipping files already there with the same size)."""
    prefix = storage.join(store, "checkpoints", tag) + "/"
    for url, size in storage.list_objects(prefix):
        path = os.path.join(local_root, tag, url[len(prefix):])
        if os.path.exists(path) and os.path.getsize(path) == size:
            continue
        with storage.open_read(url) as src, storage.open_write(path) as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
    return os.path.join(local_root, tag)


def resume_order(local: list[str], stored: list[str], records: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """The complete checkpoints a resume tries, newest first: those at or before the run's own
    record (the newer of ``records``, {where: tag}: DeepSpeed's ``checkpoints/latest`` and the
    store's ``latest``), never one past it: a checkpoint newer than every record was written by
    another run into the same directory (or its save never got recorded), and resuming it would
    continue someone else's run. Returns (order, ignored newer tags, lines to say)."""
    every = sorted(set(local) | set(stored), key=lambda t: int(t[4:]), reverse=True)
    if not records:
        said = [f"no record of the newest checkpoint (checkpoints/latest): trying the newest complete one, "
                f"{every[0]}"] if every else []
        return every, [], said
    where, record = max(records.items(), key=lambda kv: int(kv[1][4:]))
    ignored = sorted(t for t in every if int(t[4:]) > int(record[4:]))
    order = [t for t in every if int(t[4:]) <= int(record[4:])]
    said = []
    if ignored:
        said.append(f"ignoring checkpoint(s) {', '.join(ignored)}: newer than the run's record ({where} names "
                    f"{record}), so not this run's (another run wrote into this directory, or the save was never "
                    "recorded)")
    if order[:1] != [record]:
        said.append(f"{where} names {record}, which is not complete (its save or upload was cut short); "
                    + (f"trying {order[0]}" if order else "no earlier complete checkpoint"))
    return order, ignored, said


def tags_to_delete(tags: list[str], steps: dict[str, int], keep_last: int, keep_every: int) -> list[str]:
    """Keep the newest ``keep_last`` tags and every tag whose step is a multiple of ``keep_every``."""
    ordered = sorted(tags, key=lambda t: steps[t])
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every:
        keep |= {t for t in ordered if steps[t] % keep_every == 0}
    return [t for t in ordered if t not in keep]


def store_tags(store: str) -> tuple[dict[str, int], list[str]]:
    """({complete tag: step}, [tags with files but no COMPLETE]) in the store."""
    prefix = storage.join(store, "checkpoints") + "/"
    seen, complete = set(), {}
    for url, _ in storage.list_objects(prefix):
        tag, _, rest = url[len(prefix):].partition("/")
        seen.add(tag)
        if rest == "COMPLETE":
            complete[tag] = int(tag[4:])
    return complete, sorted(seen - set(complete))


def delete_tag(store: str, tag: str) -> None:
    """Remove a tag's objects, COMPLETE first (so a half-deleted tag is never chosen)."""
    prefix = storage.join(store, "checkpoints", tag)
    storage.delete(storage.join(prefix, "COMPLETE"))
    for url, _ in list(storage.list_objects(prefix + "/")):
        storage.delete(url)


def prune(store: str, steps: dict[str, int], keep_last: int, keep_every: int) -> list[str]:
    """Delete old complete tags from the store (COMPLETE first, so a half-deleted tag is never chosen)."""
    gone = tags_to_delete(list(steps), steps, keep_last, keep_every)
    for tag in gone:
        delete_tag(store, tag)
    return gone


def prune_abandoned(store: str, published_step: int, incomplete: list[str]) -> list[str]:
    """Delete the files of tags older than the one just published that never got COMPLETE
    (failed or superseded uploads): only global rank 0 publishes, in step order, so none of
    them can become complete any more."""
    gone = [t for t in incomplete if int(t[4:]) < published_step]
    for tag in gone:
        delete_tag(store, tag)
    return gone


# ---------------------------------------------------------------------------------- history
def copy(src_url: str, dst_url: str) -> None:
    """One object or file to another URL, in 16 MiB chunks; the target appears complete or not at all."""
    with storage.open_read(src_url) as src, storage.open_write(dst_url) as dst:
        while chunk := src.read(16 << 20):
            dst.write(chunk)


def _complete_lines(data: bytes) -> bytes:
    """Up to the last newline: a line being appended right now is left for the next mirror."""
    return data[: data.rfind(b"\n") + 1]


def _step_of(lines) -> int:
    """The step of the first readable line of ``lines`` (-1 when none is)."""
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return int(json.loads(line)["step"])
    return -1


def _last_step(data: bytes) -> int:
    return _step_of(reversed(_complete_lines(data).splitlines()))


def _first_step(data: bytes) -> int:
    return _step_of(_complete_lines(data).splitlines())


def history_files(output: str) -> dict[str, int]:
    """{path relative to output: size} of the TensorBoard events and reconstruction PNGs."""
    out = {}
    for folder, suffix in HISTORY_DIRS.items():
        for dirpath, _, names in os.walk(os.path.join(output, folder)):
            for name in names:
                if name.endswith(suffix) and not name.startswith(".") and not name.endswith((".tmp", storage.TMP_SUFFIX)):
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        out[os.path.relpath(path, output)] = os.path.getsize(path)
    return out


def _stored(store: str, folder: str) -> dict[str, int]:
    prefix = storage.join(store, folder) + "/"
    return {folder + "/" + url[len(prefix):]: size for url, size in storage.list_objects(prefix)}


def upload_history(output: str, store: str) -> list[str]:
    """Mirror metrics.jsonl, TensorBoard events and recon PNGs; returns what was uploaded.
    Append-safe: events files and PNGs go up when missing or grown; metrics.jsonl (complete
    lines only) when it starts no later than the stored one and ends further along (or at the
    same step with more bytes): a shorter local history never replaces the stored one."""
    sent = []
    local_metrics = os.path.join(output, METRICS)
    if os.path.exists(local_metrics):
        with open(local_metrics, "rb") as f:
            data = _complete_lines(f.read())
        url = storage.join(store, METRICS)
        try:
            stored_size = storage.size(url)
            stored_first = _first_step(storage.read_range(url, 0, 65536))
            stored_last = _last_step(storage.read_range(url, max(0, stored_size - 65536), None))
        except FileNotFoundError:
            stored_size, stored_first, stored_last = -1, float("inf"), -2
        first, last = _first_step(data), _last_step(data)
        # further along, and from as early on: a node whose history was not restored would
        # otherwise replace the stored history with only its own later part
        if first <= stored_first and (last > stored_last or (last == stored_last and len(data) > stored_size)):
            storage.write_bytes(url, data)
            sent.append(METRICS)
    remote = {}
    for folder in HISTORY_DIRS:
        remote.update(_stored(store, folder))
    for rel, size in sorted(history_files(output).items()):
        if size > remote.get(rel, -1):
            copy(os.path.join(output, rel), storage.join(store, rel))
            sent.append(rel)
    return sent


def _lines_upto(data: bytes, step: int) -> tuple[bytes, int, int]:
    """(lines of steps <= step, lines dropped past it, unreadable lines, e.g. cut by a crash)."""
    kept, dropped, damaged = [], 0, 0
    for line in data.splitlines():
        try:
            line_step = int(json.loads(line)["step"])
        except (ValueError, TypeError, KeyError):
            damaged += 1
            continue
        if line_step > step:
            dropped += 1
        else:
            kept.append(line + b"\n")
    return b"".join(kept), dropped, damaged


def restore_history(output: str, store: str | None, step: int) -> dict[str, int]:
    """At resume from ``step``: fetch the TensorBoard events and recon PNGs the local output
    lacks; metrics.jsonl becomes whichever of the local and the stored copy reaches further
    (up to ``step``), without its lines past ``step`` (those steps are logged again)."""
    counts = dict(downloaded=0, dropped_lines=0, damaged_lines=0)
    path = os.path.join(output, METRICS)
    local = b""
    if os.path.exists(path):
        with open(path, "rb") as f:
            local = f.read()
    best, dropped, damaged = _lines_upto(local, step)
    source = path
    if store:
        url = storage.join(store, METRICS)
        if storage.exists(url):
            remote, r_dropped, r_damaged = _lines_upto(storage.read_bytes(url), step)
            if _last_step(remote) > _last_step(best):
                best, dropped, damaged, source = remote, r_dropped, r_damaged, url
                counts["downloaded"] += 1
        for folder in HISTORY_DIRS:
            for rel in _stored(store, folder):
                if not os.path.exists(os.path.join(output, rel)):
                    copy(storage.join(store, rel), os.path.join(output, rel))
                    counts["downloaded"] += 1
    counts.update(dropped_lines=dropped, damaged_lines=damaged)
    if best != local:
        storage.write_bytes(path, best)
        replaced = f", replacing a local copy that reached step {_last_step(local)}" if local and source != path else ""
        print(f"crossmae-pretrain: {path}: history to step {step} from {source}{replaced}; dropped {dropped} "
              f"line(s) past step {step} and {damaged} unreadable line(s)", file=sys.stderr)
    return counts
