"""Which checkpoint ``--resume auto`` continues from, checked on every node before DeepSpeed
loads it.

1. The run's own record decides, never the highest step number: DeepSpeed's
   ``checkpoints/latest`` (global rank 0 writes it at the end of every ``save_checkpoint``) and the
   store's ``latest`` (written last by the mirror), the newer of the two. A complete checkpoint
   past that record was written by another run into the same directory, or its save was never
   recorded: it is ignored, said on stderr, and never pruned in place of this run's
   (pipelines/checkpoints/store.py ``resume_order``).
2. Each node's local rank 0 checks its copy against the manifests written at save time (sizes,
   sha256, then weights-only pickles: pipelines/checkpoints/integrity.py) before anything is
   unpickled. A damaged copy moves to ``checkpoints_damaged/<tag>`` (after every node has looked,
   so a shared filesystem is never pulled from under another node's check); where the store holds
   the tag it is fetched again, else the previous complete checkpoint is tried. Each skipped tag is
   said on stderr and counted (``fallbacks``); with none left the run stops with one line (exit 2),
   it never starts over silently.
3. Global rank 0 decides, every rank gets the same answer, and every rank raises the same error.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile

from pipelines.checkpoints import store as ckpt
from pipelines.checkpoints.store import TAG, complete_tags
from pipelines.runtime import distributed
from pipelines import storage
from pipelines.checkpoints.integrity import DamagedCheckpoint, verify_checkpoint



def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def say(message: str) -> None:
    print(f"crossmae-pretrain: {message}", file=sys.stderr, flush=True)


def _same_place(output: str, store: str) -> bool:
    return "://" not in store and os.path.realpath(store) == os.path.realpath(output)



def local_record(root: str) -> str | None:
    """The tag DeepSpeed's ``save_checkpoint`` wrote into ``<root>/latest``; None when there is
    none or it is cut short (a crash while DeepSpeed wrote it: then that save is not complete)."""
    try:
        with open(os.path.join(root, "latest")) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        return None
    return tag if TAG.fullmatch(tag) else None


def on_each_node(work) -> list:
    """``work()`` on each node's local rank 0; every rank gets the answers that are not None, a
    DamagedCheckpoint as ("damaged", message), any other StorageError / OSError as ("error",
    message). A collective: call it on every rank."""
    answer = None
    if local_rank() == 0:
        try:
            answer = work()
        except DamagedCheckpoint as e:
            answer = ("damaged", str(e))
        except (storage.StorageError, OSError) as e:
            answer = ("error", str(e))
    return [a for a in distributed.all_gather_object(answer) if a is not None]


class Selection:
    """``Selection(run, rank).choose()`` -> the tag to resume (None: nothing to resume), with
    ``fallbacks`` (damaged tags skipped, newest first) and ``ignored`` (complete tags past the
    record) on every rank."""

    def __init__(self, run, rank: int):
        self.run, self.rank = run, rank
        self.root = os.path.join(run.output, "checkpoints")
        self.store = run.store if run.store and not _same_place(run.output, run.store) else None
        self.fallbacks: list[str] = []
        self.ignored: list[str] = []
        self._damaged_here: tuple[str, str] | None = None  # (tag, where it moves) on this node

    def candidates(self) -> tuple[list[tuple[str, bool]], list[str]]:
        """Rank 0: ([(tag, in the store)] to try, newest first; the complete tags ignored)."""
        records, stored = {}, {}
        if local_record(self.root):
            records[os.path.join(self.root, "latest")] = local_record(self.root)
        if self.store:
            stored = ckpt.store_tags(self.store)[0]
            pointer = ckpt.latest_record(self.store)
            if pointer:
                records[storage.join(self.store, "latest")] = pointer["tag"]
        order, ignored, said = ckpt.resume_order(complete_tags(self.run.output), list(stored), records)
        for line in said:
            say(line)
        return [(t, t in stored) for t in order], ignored

    def choose(self) -> str | None:
        plan = None
        if self.rank == 0:
            try:
                plan = self.candidates()
            except storage.StorageError as e:  # raised on every rank below, not on rank 0 alone
                plan = str(e)
        plan = distributed.broadcast_object(plan, src=0)
        if isinstance(plan, str):
            raise storage.StorageError(plan)
        candidates, self.ignored = plan
        damaged = None
        for i, (tag, in_store) in enumerate(candidates):
            problems = on_each_node(lambda t=tag: self._check_local(t))
            if any(kind == "damaged" for kind, _ in problems):
                on_each_node(self._move_aside)  # after every node looked
                if in_store and self.rank == 0:
                    say(f"{next(m for k, m in problems if k == 'damaged')}; fetching it again from {self.store}")
            if problems and in_store:  # absent or damaged here, perhaps whole in the store
                problems = on_each_node(lambda t=tag: self._fetch(t))
            errors = [m for kind, m in problems if kind != "damaged"]
            if errors:
                raise storage.StorageError(errors[0])
            if not problems:
                if self.rank == 0 and local_record(self.root) != tag:  # the record follows what this run continues
                    storage.write_bytes(os.path.join(self.root, "latest"), tag.encode())
                distributed.barrier()
                return tag
            damaged = next(m for kind, m in problems if kind == "damaged")
            self.fallbacks.append(tag)
            if self.rank == 0 and i + 1 < len(candidates):
                say(f"{damaged}; resuming from the previous complete checkpoint, {candidates[i + 1][0]}, instead")
        if damaged:
            where = self.root + (f" or {self.store}" if self.store else "")
            raise storage.StorageError(f"{damaged}; no earlier complete checkpoint in {where} to fall back on "
                                       f"({len(self.fallbacks)} damaged: {', '.join(self.fallbacks)})")
        distributed.barrier()
        return None

    def _check_local(self, tag: str):
        """None when this node's copy of ``tag`` is complete and whole, else ("absent", ...) or
        ("damaged", ...); a damaged directory moves aside in ``_move_aside``."""
        self._damaged_here = None
        if tag not in complete_tags(self.run.output):
            where = "" if self.rank == 0 else f" on the node of rank {self.rank}"
            return ("absent", f"checkpoint {tag} is not in {self.root}{where} and run.store has no copy")
        try:
            verify_checkpoint(os.path.join(self.root, tag))
            return None
        except DamagedCheckpoint as e:
            dst_root = os.path.normpath(self.root) + "_damaged"
            dst, n = os.path.join(dst_root, tag), 1
            while os.path.exists(dst):
                dst, n = os.path.join(dst_root, f"{tag}.{n}"), n + 1
            self._damaged_here = (tag, dst)
            return ("damaged", f"{e}; moved to {dst}")

    def _move_aside(self) -> None:
        """Kept for a look, never loaded or counted again; a later save of the step gets a fresh
        directory."""
        if self._damaged_here:
            tag, dst = self._damaged_here
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.rename(os.path.join(self.root, tag), dst)
            except FileNotFoundError:  # another node on the same filesystem moved it first
                pass

    def _fetch(self, tag: str):
        """Download ``tag`` where this node lacks a whole copy: into a private staging directory,
        checked, marked COMPLETE, then renamed into place, so neither a crash nor another node on a
        shared filesystem leaves a half copy that looks complete. A half copy left by an earlier
        download is not reused: its same-sized files may hold other bytes."""
        if tag in complete_tags(self.run.output):
            return None
        os.makedirs(self.root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{tag}.{socket.gethostname()}.", dir=self.root)
        try:
            built = ckpt.download(self.store, tag, staging)
            try:
                verify_checkpoint(built)
            except DamagedCheckpoint as e:
                return ("damaged", f"{e} (the copy in {self.store}, left there as it is)")
            with open(os.path.join(built, "COMPLETE"), "w") as f:
                f.write(tag[4:])
            dst = os.path.join(self.root, tag)
            if os.path.isdir(dst) and not os.path.exists(os.path.join(dst, "COMPLETE")):
                shutil.rmtree(dst, ignore_errors=True)  # a save or a download cut short
            try:
                os.rename(built, dst)
            except OSError:
                if tag not in complete_tags(self.run.output):  # lost a race only if the winner is complete
                    raise
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
