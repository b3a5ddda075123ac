"""The trainer's checkpointing component: choose the checkpoint to resume from, save DeepSpeed
checkpoints (with the loader position and step as client state) into ``run.output``, and
mirror each one into ``run.store`` in the background.

Layout: ``<output>/checkpoints/<tag>/`` (tag ``step00001000``), a ``COMPLETE`` marker once
every rank's files are written; in the store the same files, one receipt per node, then
``COMPLETE`` and ``latest`` (pipelines/checkpoints.py).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

from . import checkpoints as ckpt
from . import distributed, reshard, storage


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def complete_tags(out: str) -> list[str]:
    """Complete checkpoint tags, oldest first: a tag counts once its marker file exists."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if os.path.exists(os.path.join(root, t, "COMPLETE")))


class Mirror:
    """Copies each checkpoint into ``run.store`` in a background thread, so training goes on
    while it uploads. Each node's local rank 0 uploads the files its ranks wrote and then a
    receipt (checkpoints/<tag>/_nodes/<node>.json); global rank 0 waits for every node's
    receipt, checks every listed file is in the store, and only then writes COMPLETE and
    ``latest`` and prunes. One upload in flight: the next save waits for the previous one."""

    def __init__(self, run, rank: int, world: int):
        self.run, self.rank = run, rank
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.uploader = local_rank() == 0
        self.node, self.nodes = rank // local_world, max(1, world // local_world)
        self.thread: threading.Thread | None = None
        self.failures = 0

    def start(self, tag: str, step: int) -> None:
        self.join()
        if not self.run.store or not self.uploader:
            return
        if self.run.async_upload:
            self.thread = threading.Thread(target=self._run, args=(tag, step), name=f"upload-{tag}", daemon=True)
            self.thread.start()
        else:
            self._run(tag, step)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _run(self, tag: str, step: int) -> None:
        store, root = self.run.store, os.path.join(self.run.output, "checkpoints")
        try:
            names = ckpt.files(os.path.join(root, tag))
            ckpt.upload(root, tag, store, names)
            storage.write_bytes(storage.join(store, "checkpoints", tag, "_nodes", f"{self.node}.json"),
                                json.dumps(names).encode())
            if self.rank == 0:
                expected = self._wait_for_receipts(store, tag)
                ckpt.publish(store, tag, step, expected)
                prefix = storage.join(store, "checkpoints") + "/"
                tags = {u[len(prefix):].split("/")[0] for u, _ in storage.list_objects(prefix) if u.endswith("/COMPLETE")}
                ckpt.prune(store, {t: int(t[4:]) for t in tags}, self.run.keep_last, self.run.keep_every)
        except Exception as e:  # noqa: BLE001 - reported, counted; the local checkpoint still stands
            self.failures += 1
            print(f"crossmae-pretrain: checkpoint {tag} not mirrored to {store}: {e}", file=sys.stderr)

    def _wait_for_receipts(self, store: str, tag: str, timeout: float = 3600.0) -> list[str]:
        deadline = time.monotonic() + timeout
        receipts = [storage.join(store, "checkpoints", tag, "_nodes", f"{n}.json") for n in range(self.nodes)]
        while True:
            missing = [r for r in receipts if not storage.exists(r)]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise storage.StorageError(f"{len(missing)} node(s) did not finish uploading {tag} in {timeout:.0f} s")
            time.sleep(1.0)
        names = set()
        for r in receipts:
            names |= set(json.loads(storage.read_bytes(r)))
        return sorted(names)


class Checkpointer:
    """``resume_tag`` -> ``load`` at start; ``save`` every ``run.save_every`` steps; ``close``
    at the end (waits for the last upload). ``failures`` counts checkpoints not mirrored."""

    def __init__(self, run, rank: int, world: int):
        self.run, self.rank, self.world = run, rank, world
        self.root = os.path.join(run.output, "checkpoints")
        self.mirror = Mirror(run, rank, world)

    @property
    def failures(self) -> int:
        return self.mirror.failures

    def resume_tag(self) -> str | None:
        """The newest complete checkpoint, local or in the store (downloaded when only there).
        Global rank 0 decides and broadcasts, so every rank loads the same tag."""
        best = None
        if self.rank == 0:
            local = complete_tags(self.run.output)
            best = local[-1] if local else None
            remote = ckpt.latest(self.run.store) if self.run.store else None
            if remote and (best is None or int(remote["tag"][4:]) > int(best[4:])):
                best = remote["tag"]
        best = distributed.broadcast_object(best, src=0)
        if best and local_rank() == 0 and best not in complete_tags(self.run.output):
            ckpt.download(self.run.store, best, self.root)
            with open(os.path.join(self.root, best, "COMPLETE"), "w") as f:
                f.write(best[4:])
        distributed.barrier()
        return best

    def prepare(self, tag: str) -> "reshard.ResumePlan":
        """Check the checkpoint's files (before DeepSpeed unpickles them) and, when it was saved
        by another world size, convert it once per node to a universal checkpoint. Returns the
        plan whose ``ds_config_patch`` goes into the DeepSpeed config before ``initialize``."""
        if local_rank() == 0:  # DeepSpeed loads with weights_only=False: refuse anything else first
            ckpt.check_weights_only(os.path.join(self.root, tag))
        plan = reshard.prepare_resume(self.root, tag, self.world, convert=local_rank() == 0)
        distributed.barrier()
        return plan

    def load(self, engine, plan) -> dict:
        """Load weights, optimizer and client state ({"step", "loader"}) into ``engine``."""
        return reshard.load_checkpoint(engine, plan)

    def save(self, engine, step: int, client_state: dict) -> str:
        """DeepSpeed checkpoint + client state into the local directory; COMPLETE once every
        rank's files are written; then the store mirror starts (in the background by default)."""
        tag = f"step{step:08d}"
        engine.save_checkpoint(self.root, tag=tag, client_state=dict(client_state, step=step))
        distributed.barrier()
        self.mirror.join()  # the previous upload must finish before its local copy may be pruned
        if local_rank() == 0:  # each node marks and prunes its own directory
            with open(os.path.join(self.root, tag, "COMPLETE"), "w") as f:
                f.write(str(step))
            steps = {t: int(t[4:]) for t in complete_tags(self.run.output)}
            for old in ckpt.tags_to_delete(list(steps), steps, self.run.keep_last, self.run.keep_every):
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        distributed.barrier()
        self.mirror.start(tag, step)
        return tag

    def close(self) -> None:
        self.mirror.join()
