"""Checks the trainer makes before it writes or loads anything, and what it says when a run's
settings change between launches: one line each, naming the numbers. A run directory belongs to
one run: ``run.json`` names it (run_id, created, host, pid), every checkpoint carries its run_id,
``--resume none`` never starts a second run on top of a first one, and OS errors (a full disk, a
read-only or misplaced ``run.output``) end in one line naming the path and the cause."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import sys
import shutil
import socket
import time
import uuid

import yaml

from pipelines.checkpoints import store as ckpt
from pipelines.runtime import config_loader
from pipelines.runtime import distributed
from pipelines import storage

# Settings a checkpoint's weights, loader position and file layout depend on: a resume must not
# change them (another world size is fine: pipelines/checkpoints/reshard.py converts).
RESUME_FIXED = ("model.", "data.image_size", "deepspeed.zero_stage")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _saved_config(cfg) -> dict | None:
    """The run's config.yaml as the checkpoint's run wrote it: local, else in the store."""
    local = os.path.join(cfg.run.output, "config.yaml")
    if os.path.exists(local):
        with open(local) as f:
            return yaml.safe_load(f)
    if cfg.run.store and storage.exists(storage.join(cfg.run.store, "config.yaml")):
        return yaml.safe_load(storage.read_bytes(storage.join(cfg.run.store, "config.yaml")))
    return None


def resume_config_differences(cfg, saved: dict) -> list[str]:
    """``key: saved -> asked`` for every model / data setting that differs. Keys the saved config
    lacks (added to the project after that run started) are not differences."""
    now, before = _flatten(config_loader.to_dict(cfg)), _flatten(saved)
    keys = sorted(k for k in before if k.startswith(RESUME_FIXED))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def check_resume_config(cfg, ckpt_root: str, tag: str, rank: int) -> None:
    """Rank 0 compares the config asked for with the one the checkpoint's run saved; every rank
    raises the same one-line ConfigError when they differ (before anything is written)."""
    message, old_decay_rule = None, False
    if rank == 0:
        saved = _saved_config(cfg)
        diffs = resume_config_differences(cfg, saved) if saved else []
        if diffs:
            message = (f"cannot resume {tag} from {cfg.run.output}: its run used other settings ("
                       + "; ".join(diffs) + f"); {start_over_hint(cfg)}")
        # a run begun before optim.decay_tokens existed exempted the tokens from weight decay: its
        # optimizer state has those groups, so it keeps that rule (README "Where this differs")
        old_decay_rule = bool(saved) and "decay_tokens" not in (saved.get("optim") or {})
    message, old_decay_rule = distributed.broadcast_object((message, old_decay_rule), src=0)
    if message:
        raise config_loader.ConfigError(message)
    if old_decay_rule and cfg.optim.decay_tokens:
        cfg.optim.decay_tokens = False
        if rank == 0:
            print(f"crossmae-pretrain: note: {tag} was written with the earlier weight-decay rule (cls/mask tokens "
                  "and position tables exempt); the resumed run keeps it (optim.decay_tokens=false)", file=sys.stderr)


def describe_schedule_change(client: dict, schedule, samples: int) -> list[str]:
    """Lines to print when the effective batch differs from the checkpoint's (another world size
    or micro batch): the peak lr follows the batch, the schedule continues in samples."""
    before = client.get("effective_batch")
    if before is None or before == schedule.effective_batch:
        return []
    lines = [f"resume: effective batch {before} -> {schedule.effective_batch} "
             f"(world size {client.get('world_size', '?')} -> {schedule.world_size})"]
    if client.get("lr") is not None and abs(client["lr"] - schedule.lr) > 1e-12:
        lines.append(f"resume: peak lr {client['lr']:.4g} -> {schedule.lr:.4g} (optim.blr x effective batch / 256; "
                     "set optim.lr to keep it)")
    lines.append(f"resume: the schedule continues in samples: {samples} of {schedule.total_samples} seen, "
                 f"warm-up ends at sample {schedule.warmup_samples}")
    return lines


def short_run_warning(cfg, schedule, step: int) -> str | None:
    """A run whose max_steps ends inside the warm-up barely trains: say which lr it reaches."""
    from pipelines.train.optim import lr_at

    end = schedule.max_steps
    if not schedule.warmup_steps or end >= schedule.warmup_steps:
        return None
    reached = lr_at(end * schedule.effective_batch, schedule.lr, schedule.warmup_samples,
                    schedule.total_samples, cfg.optim.min_lr)
    return (f"crossmae-pretrain: note: the run stops at step {end}, inside the {schedule.warmup_steps}-step warm-up "
            f"(optim.warmup_epochs={cfg.optim.warmup_epochs}): the lr only reaches {reached:.3g} of its peak "
            f"{schedule.lr:.3g}; for a short run set optim.epochs / optim.warmup_epochs to fit run.max_steps")


# ------------------------------------------------------------------------- paths and OS errors
PLAIN_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file, not a directory",
                errno.EEXIST: "a file is in the way", errno.EISDIR: "a directory is in the way",
                errno.EFBIG: "file too large (a file size limit)", errno.ENOENT: "no such file or directory",
                errno.EIO: "input/output error (a failing disk or network filesystem)"}


def say(message: str) -> None:
    import sys

    print(f"crossmae-pretrain: {message}", file=sys.stderr, flush=True)


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def describe_os_error(e: OSError, path: str | None = None) -> str:
    """``<file>: <cause in plain words>`` (a full disk adds the space left there)."""
    where = str(e.filename) if e.filename is not None else path
    cause = PLAIN_CAUSES.get(e.errno) or e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and where:
        with contextlib.suppress(OSError):
            cause += f" ({shutil.disk_usage(_existing_ancestor(where)).free / 2**20:.1f} MiB free there)"
    return f"{where}: {cause}" if where else cause


def check_run_paths(run) -> None:
    """Before DeepSpeed starts, without writing: ``run.output`` is a local directory this process
    may write (a URL belongs in ``run.store``); ``~`` is expanded in both."""
    out = run.output
    if not out:
        raise config_loader.ConfigError("run.output is empty: set the local run directory")
    if "://" in out or out.startswith("pipe:"):
        raise config_loader.ConfigError(
            f"run.output={out} is a URL, but run.output is the local run directory (logs, local checkpoints); "
            f"put the URL in run.store (e.g. run.store={out} run.output=/scratch/<run>)")
    run.output = os.path.expanduser(out)
    if run.store and "://" not in run.store:
        run.store = os.path.expanduser(run.store)
    if not run.lock_lease_s > 0:
        raise config_loader.ConfigError(f"run.lock_lease_s must be > 0, got {run.lock_lease_s}")
    if os.path.lexists(run.output) and not os.path.isdir(run.output):
        raise config_loader.ConfigError(f"run.output {run.output} is a file, not a directory")
    base = _existing_ancestor(run.output)
    if not os.path.isdir(base):
        raise config_loader.ConfigError(f"run.output {run.output}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        cause = "read-only file system" if os.statvfs(base).f_flag & os.ST_RDONLY else "permission denied"
        raise config_loader.ConfigError(f"run.output {run.output}: cannot write in {base} ({cause})")


@contextlib.contextmanager
def writing_checkpoint(path: str):
    """torch.save reports a failed write as '[enforce fail at inline_container.cc:672] . unexpected
    pos 576 vs 534' (a full disk): find the OSError behind it by writing 1 MiB into ``path``."""
    try:
        yield
    except RuntimeError as e:
        if not any(s in str(e) for s in ("inline_container", "PytorchStreamWriter", "file write failed")):
            raise
        probe = os.path.join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(path, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * (1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as cause:
            raise OSError(cause.errno, cause.strerror, path) from e
        finally:
            with contextlib.suppress(OSError):
                os.remove(probe)
        free = shutil.disk_usage(path).free / 2**20
        raise OSError(errno.EIO, f"torch.save failed ({str(e).splitlines()[0]}) though a 1 MiB test write there "
                                 f"worked ({free:.0f} MiB free)", path) from e


# ------------------------------------------------------------------- one run per run directory
RUN_RECORD = "run.json"
# What a trainer writes into run.output (observe.py, checkpointer.py, reshard.py, keys-rank*.jsonl):
# an old run that is moved aside. run.lock and ffcv-cache/ (a cache of the data) stay where they are.
RUN_FILES = ("run.json", "config.yaml", "deepspeed.json", "version.json", "metrics.jsonl", "tensorboard", "recon",
             "checkpoints", "checkpoints_universal", "checkpoints_damaged")


class RunDirError(Exception):
    """A run directory or store that holds another run (one line)."""


def _other_store(cfg) -> str | None:
    store = cfg.run.store
    same = store and "://" not in store and os.path.realpath(store) == os.path.realpath(cfg.run.output)
    return None if not store or same else store


def start_over_hint(cfg) -> str:
    if _other_store(cfg):
        return "use another run.output and run.store (a run.store holds one run)"
    return (f"use another run.output, or start over in this one with --resume none --move-old-run (the old run "
            f"moves into {cfg.run.output}/previous-<UTC time>/)")


def run_files(out: str) -> list[str]:
    names = [n for n in RUN_FILES if os.path.lexists(os.path.join(out, n))]
    return names + sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out), "keys-rank*.jsonl")))


def _newest_checkpoints(cfg) -> tuple[str | None, str | None]:
    """(newest complete tag in run.output, newest complete tag in run.store)."""
    from pipelines.checkpoints.store import complete_tags

    local = complete_tags(cfg.run.output)
    store = _other_store(cfg)
    stored = ckpt.store_tags(store)[0] if store else {}
    return (local[-1] if local else None), (max(stored, key=stored.get) if stored else None)


def _move_aside(out: str, name: str) -> list[str]:
    names = run_files(out)
    os.makedirs(os.path.join(out, name))
    for n in names:
        os.rename(os.path.join(out, n), os.path.join(out, name, n))  # same filesystem: instant, nothing copied
    return names


def _claim(cfg, resume: str, move_old_run: bool) -> tuple[str, str] | None:
    out, store = cfg.run.output, _other_store(cfg)
    local, stored = _newest_checkpoints(cfg)
    if resume == "none" and stored:
        return ("error", f"--resume none: run.store {store} already holds a run (newest checkpoint {stored}), "
                         "and a new run there would mix with it (objects in a store are not moved aside): continue "
                         "it with --resume auto, or use another run.store and run.output")
    if resume == "none" and local and not move_old_run:
        return ("error", f"--resume none: run.output {out} already holds a run (newest checkpoint {local}), and a "
                         f"new run there would mix with it: continue it with --resume auto, add --move-old-run to "
                         f"move it into {out}/previous-<UTC time>/ first, or use another run.output")
    if (resume == "none" or not (local or stored)) and run_files(out):
        why = (f"--move-old-run: the run in {out} (newest checkpoint {local})" if local else
               f"{out} holds files of an earlier run that saved no checkpoint")
        base = name = "previous-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for i in range(2, 1000):
            if not os.path.lexists(os.path.join(out, name)):
                break
            name = f"{base}-{i}"
        moved = _move_aside(out, name)
        say(f"{why}: moved {', '.join(moved)} into {os.path.join(out, name)}/; this run starts at step 0")
        return ("aside", name)
    return None


def claim_run_directory(cfg, resume: str, move_old_run: bool, rank: int) -> None:
    """Right after the lock, before the trainer writes anything: refuse ``--resume none`` on a
    run.output or run.store that holds a run's checkpoints, unless ``move_old_run`` asks to move
    a local one aside (a store's objects are not moved: refused); move the files of an earlier run
    that saved no checkpoint aside. Global rank 0 decides and moves its folder; every other node's
    local rank 0 then moves its own, unless it is the same (shared) folder."""
    answer = None
    if rank == 0:
        try:
            answer = _claim(cfg, resume, move_old_run)
        except OSError as e:
            answer = ("error", f"cannot set the old run aside: {describe_os_error(e, cfg.run.output)}")
    answer = distributed.broadcast_object(answer, src=0)
    if answer and answer[0] == "error":
        raise RunDirError(answer[1])
    if answer and rank != 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0 \
            and not os.path.isdir(os.path.join(cfg.run.output, answer[1])) and run_files(cfg.run.output):
        _move_aside(cfg.run.output, answer[1])  # a node-local run.output


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _read_record(url: str) -> dict | None:
    try:
        record = json.loads(storage.read_bytes(url))
    except storage.StorageNotFoundError:
        return None
    except ValueError:
        record = None
    if not isinstance(record, dict) or not record.get("run_id"):
        raise RunDirError(f"{url} is not a run record (JSON with a run_id): a run directory's run.json is the "
                          "trainer's; restore it or move it away")
    return record


def _identity(cfg, tag: str | None) -> str:
    out, store = cfg.run.output, _other_store(cfg)
    urls = [os.path.join(out, RUN_RECORD)] + ([storage.join(store, RUN_RECORD)] if store else [])
    records = [None] * len(urls) if tag is None else [_read_record(u) for u in urls]
    if len(records) == 2 and records[0] and records[1] and records[0]["run_id"] != records[1]["run_id"]:
        raise RunDirError(f"run.output {out} belongs to run {records[0]['run_id']} but run.store {store} to run "
                          f"{records[1]['run_id']} ({urls[1]}): two runs; use the run.output and run.store of one run")
    record = next((r for r in records if r), None)
    if record is None:  # a fresh run, or one from before run ids: a new id
        now = time.time()
        record = dict(run_id=f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}-{uuid.uuid4().hex[:8]}",
                      created=_utc(now), host=socket.gethostname(), pid=os.getpid(),
                      output=os.path.abspath(out), store=cfg.run.store)
    for url, have in zip(urls, records):
        if not have:  # a fresh node gets the store's record; the store gets the run's
            storage.write_bytes(url, json.dumps(record, indent=1).encode())
    return record["run_id"]


def run_identity(cfg, tag: str | None, rank: int) -> str:
    """The run's id: a new ``run.json`` (in run.output and run.store) when the run starts fresh
    (``tag`` None), else the id run.output's (on a fresh node: run.store's) run.json names.
    Global rank 0 decides; every rank gets the id or raises the same RunDirError."""
    answer = None
    if rank == 0:
        try:
            answer = ("id", _identity(cfg, tag))
        except RunDirError as e:
            answer = ("error", str(e))
        except storage.StorageError as e:
            answer = ("error", f"cannot write the run record: {e}")
        except OSError as e:
            answer = ("error", f"cannot write the run record: {describe_os_error(e)}")
    kind, value = distributed.broadcast_object(answer, src=0)
    if kind == "error":
        raise RunDirError(value)
    return value


def check_checkpoint_run(cfg, tag: str, client: dict, run_id: str) -> None:
    """Every rank, after loading: a checkpoint saved by another run is refused (one that predates
    run ids carries none and is accepted)."""
    saved = client.get("run_id")
    if saved is not None and saved != run_id:
        raise RunDirError(f"cannot resume {tag}: it was saved by run {saved}, but {cfg.run.output}/{RUN_RECORD} "
                          f"names run {run_id}: the checkpoint belongs to another run (copied in, or a run.store "
                          f"shared by two runs); move it out of {cfg.run.output}/checkpoints"
                          + (" and the store" if _other_store(cfg) else "") + ", or resume that run from its own "
                          "run.output")
