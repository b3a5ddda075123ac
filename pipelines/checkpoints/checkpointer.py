"""The trainer's checkpointing component: choose the checkpoint to resume from, save DeepSpeed
checkpoints (with the loader position and step as client state) into ``run.output``, mirror
each one and the run's history (metrics.jsonl, TensorBoard events, recon PNGs) into
``run.store`` in the background, and bring the history back on a fresh node.

Layout: ``<output>/checkpoints/<tag>/`` (tag ``step00001000``), each node's
``MANIFEST.<node>.json`` (sizes, sha256) and a ``COMPLETE`` marker once every rank's files are
written; in the store the same files, one receipt per node, then ``COMPLETE`` and ``latest``
(pipelines/checkpoints/store.py). Resume follows the run's own record (DeepSpeed's
``checkpoints/latest``, the store's ``latest``), checks the files against the manifests before
anything is unpickled, and falls back to the previous complete checkpoint when one is damaged
(said on stderr, counted in ``fallbacks``; the damaged copy moves to ``checkpoints_damaged/``).

A hung store never holds training for long: a save waits for the previous upload at most
``run.upload_wait_s`` seconds, then goes on; the new checkpoint stays local and the mirror
catches up with the newest one when the store answers again (each S3 request also ends within
its own bound, pipelines/storage/s3.py). ``failures`` counts the checkpoints that never reached the store.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

from pipelines.checkpoints import store as ckpt
from pipelines.runtime import distributed
from pipelines.checkpoints import reshard, resume_select
from pipelines import storage
from pipelines.checkpoints.integrity import clear_markers, verify_checkpoint, write_manifest
from pipelines.checkpoints.resume_select import _same_place, local_rank, on_each_node, say
from pipelines.checkpoints.store import complete_tags

# A save waits this long for the previous upload (back-pressure while the store is just slower
# than the save interval); past it, training goes on and the mirror skips to the newest tag.
UPLOAD_WAIT_S = 120.0
# At the end of the run, the last upload gets this long: a ViT-L checkpoint with its optimizer
# state is ~4 GB, ~40 s at 100 MB/s, so 15 min only runs out when the store is really down.
CLOSE_WAIT_S = 900.0


class Mirror:
    """Copies checkpoints into ``run.store`` from one background thread. Each node's local rank 0
    uploads the files its ranks wrote and then a receipt (checkpoints/<tag>/_nodes/<node>.json);
    global rank 0 waits for every node's receipt, checks every listed file is in the store, and
    only then writes COMPLETE and ``latest``, prunes, and mirrors the history. At most one tag
    uploads and one waits: a newer save replaces the waiting one (counted, said on stderr)."""

    def __init__(self, run, rank: int, world: int):
        self.run, self.rank, self.store = run, rank, run.store
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        self.uploader = bool(run.store) and local_rank() == 0
        self.node, self.nodes = rank // local_world, max(1, world // local_world)
        self.history = rank == 0 and bool(run.store) and not _same_place(run.output, run.store)
        self.mirrored: str | None = None  # newest tag this node uploaded (rank 0: published)
        self.not_mirrored: list[str] = []
        self.history_error: str | None = None
        self._cv = threading.Condition()
        self._queued: tuple[str, int] | None = None
        self._current: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def failures(self) -> int:
        return len(self.not_mirrored)

    def pending(self) -> list[str]:
        """Tags uploading now or waiting to: their local copies must not be pruned."""
        with self._cv:
            return [t for t in (self._current, self._queued and self._queued[0]) if t]

    def wait(self, timeout: float, why: str) -> bool:
        """Wait until nothing is pending, at most ``timeout`` s. A wait longer than a moment
        (1 s, or half the bound) says so on stderr when it starts and when it ends.
        True when the mirror is idle."""
        t0, quiet = time.monotonic(), min(1.0, timeout / 2)
        idle = lambda: self._current is None and self._queued is None  # noqa: E731
        with self._cv:
            if self._cv.wait_for(idle, quiet):
                return True
        pending = self.pending()
        if not pending:  # finished between the two looks
            return True
        say(f"{why}: waiting up to {timeout:g} s for the upload of {', '.join(pending)} to {self.store}")
        with self._cv:
            self._cv.wait_for(idle, max(0.0, t0 + timeout - time.monotonic()))
        left = self.pending()
        if not left:
            say(f"{why}: upload finished after {time.monotonic() - t0:.1f} s")
            return True
        say(f"{why}: gave up waiting after {timeout:g} s, {', '.join(left)} still uploading to {self.store}; "
            "training goes on, local checkpoints stand and the store gets the newest one when it answers")
        return False

    def submit(self, tag: str, step: int) -> None:
        if not self.uploader:
            return
        if not self.run.async_upload:
            self._upload(tag, step)
            return
        with self._cv:
            if self._queued is not None:
                self._skip(self._queued[0], f"replaced by {tag} before its upload started")
            self._queued = (tag, step)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint-mirror", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cv:
                if self._queued is None:
                    self._thread = None
                    self._cv.notify_all()
                    return
                (tag, step), self._queued = self._queued, None
                self._current = tag
            try:
                self._upload(tag, step)
            finally:
                with self._cv:
                    self._current = None
                    self._cv.notify_all()

    def _skip(self, tag: str, why: str) -> None:
        if tag not in self.not_mirrored:
            self.not_mirrored.append(tag)
        say(f"checkpoint {tag} not mirrored to {self.store}: {why}")

    def _upload(self, tag: str, step: int) -> None:
        store, root = self.store, os.path.join(self.run.output, "checkpoints")
        try:
            names = ckpt.files(os.path.join(root, tag))
            ckpt.upload(root, tag, store, names)
            storage.write_bytes(storage.join(store, "checkpoints", tag, "_nodes", f"{self.node}.json"),
                                json.dumps(names).encode())
            if self.rank == 0:
                expected = self._wait_for_receipts(store, tag)
                ckpt.publish(store, tag, step, expected)
                complete, incomplete = ckpt.store_tags(store)
                # only this run's line counts: a newer tag (another run's, or a damaged one a resume
                # fell back from) is neither kept in place of this run's nor deleted
                ckpt.prune(store, {t: s for t, s in complete.items() if s <= step}, self.run.keep_last,
                           self.run.keep_every)
                ckpt.prune_abandoned(store, step, incomplete)
            self.mirrored = tag
        except Exception as e:  # noqa: BLE001 - reported, counted; the local checkpoint still stands
            self._skip(tag, str(e))
            return
        if self.history:
            try:
                ckpt.upload_history(self.run.output, store)
                self.history_error = None
            except Exception as e:  # noqa: BLE001 - retried at the next save, reported at close
                self.history_error = str(e)
                say(f"run history (metrics.jsonl, tensorboard/, recon/) not mirrored to {store}: {e}")

    def _wait_for_receipts(self, store: str, tag: str, timeout: float = 3600.0) -> list[str]:
        deadline = time.monotonic() + timeout
        receipts = [storage.join(store, "checkpoints", tag, "_nodes", f"{n}.json") for n in range(self.nodes)]
        while True:
            missing = [r for r in receipts if not storage.exists(r)]
            if not missing:
                break
            if self._queued is not None:  # this node moved on; the others do the same
                raise storage.StorageError(f"{len(missing)} node(s) had not uploaded it when {self._queued[0]} "
                                           "was saved")
            if time.monotonic() > deadline:
                raise storage.StorageError(f"{len(missing)} node(s) did not finish uploading {tag} in {timeout:.0f} s")
            time.sleep(1.0)
        names = set()
        for r in receipts:
            names |= set(json.loads(storage.read_bytes(r)))
        return sorted(names)


class Checkpointer:
    """``resume_tag`` -> ``prepare`` -> ``load`` (and ``restore_history`` on rank 0) at start;
    ``save`` every ``run.save_every`` steps; ``close`` at the end. ``failures`` counts
    checkpoints not mirrored to the store; ``fallbacks`` the damaged checkpoints a resume skipped,
    ``ignored`` the complete ones past the run's record."""

    def __init__(self, run, rank: int, world: int):
        self.run, self.rank, self.world = run, rank, world
        self.root = os.path.join(run.output, "checkpoints")
        self.mirror = Mirror(run, rank, world)
        self.upload_wait_s = float(getattr(run, "upload_wait_s", UPLOAD_WAIT_S))
        self.close_wait_s = float(getattr(run, "close_wait_s", CLOSE_WAIT_S))
        self.resumed_step: int | None = None
        self.fallbacks: list[str] = []  # damaged tags skipped by the resume, newest first
        self.ignored: list[str] = []  # complete tags newer than the run's record
        self.verified: str | None = None  # the tag resume_tag checked on every node
        self.closed = False

    @property
    def failures(self) -> int:
        return self.mirror.failures

    def resume_tag(self) -> str | None:
        """The newest complete checkpoint at or before the run's record, local or in the store
        (downloaded when only there), whose files match the manifests written when it was saved;
        a damaged one is moved aside and the previous one tried (pipelines/checkpoints/resume_select.py).
        Global rank 0 decides and broadcasts, so every rank loads the same tag."""
        choice = resume_select.Selection(self.run, self.rank)
        tag = choice.choose()
        self.fallbacks, self.ignored, self.verified = choice.fallbacks, choice.ignored, tag
        self.resumed_step = int(tag[4:]) if tag else None
        return tag

    def restore_history(self, step: int | None = None) -> dict | None:
        """Rank 0, at resume, before metrics.jsonl is opened: fetch metrics.jsonl, TensorBoard
        events and recon PNGs from the store where the output lacks them, and drop metrics
        lines past the resumed step (they are logged again)."""
        if self.rank != 0 or self.resumed_step is None:  # a fresh start (or --resume none) appends as before
            return None
        step = self.resumed_step if step is None else step
        store = None if not self.run.store or _same_place(self.run.output, self.run.store) else self.run.store
        try:
            return ckpt.restore_history(self.run.output, store, step)
        except storage.StorageError as e:  # the history is not worth the run; the store's copy stays intact
            say(f"run history not restored from {store}: {e}; training goes on, and the stored history is "
                "kept (a local one that does not reach back as far never replaces it)")
            return None

    def prepare(self, tag: str) -> "reshard.ResumePlan":
        """Check the checkpoint's files before DeepSpeed unpickles them (``resume_tag`` did for its
        tag) and, when it was saved by another world size, convert it once per node to a universal
        checkpoint. Returns the plan whose ``ds_config_patch`` goes into the DeepSpeed config
        before ``initialize``."""
        if tag != self.verified:  # DeepSpeed loads with weights_only=False: refuse anything else first
            problems = on_each_node(lambda: verify_checkpoint(os.path.join(self.root, tag)))
            if problems:
                raise storage.StorageError(problems[0][1])
        plan = reshard.prepare_resume(self.root, tag, self.world, convert=local_rank() == 0)
        distributed.barrier()
        return plan

    def load(self, engine, plan) -> dict:
        """Load weights, optimizer and client state ({"step", "loader"}) into ``engine``."""
        return reshard.load_checkpoint(engine, plan)

    def save(self, engine, step: int, client_state: dict) -> str:
        """DeepSpeed checkpoint + client state into the local directory; the node's manifest and
        COMPLETE once every rank's files are written; then the store mirror takes it (in the
        background by default). Waits for the previous upload at most ``run.upload_wait_s``."""
        tag = f"step{step:08d}"
        if local_rank() == 0:  # the same step saved again (after a fallback): not complete while rewritten
            clear_markers(os.path.join(self.root, tag))
        engine.save_checkpoint(self.root, tag=tag, client_state=dict(client_state, step=step))
        distributed.barrier()
        if local_rank() == 0:  # each node records, marks and prunes its own directory
            write_manifest(os.path.join(self.root, tag), self.mirror.node)  # ViT-B ZeRO-2, 2 GB: ~1 s
            with open(os.path.join(self.root, tag, "COMPLETE"), "w") as f:
                f.write(str(step))
            self.mirror.wait(self.upload_wait_s, f"checkpoint {tag}")
            # this run's line only: a newer tag (another run's) is neither counted nor deleted
            steps = {t: int(t[4:]) for t in complete_tags(self.run.output) if int(t[4:]) <= step}
            keep = set(self.mirror.pending()) | {tag}  # never delete what the mirror still reads
            for old in ckpt.tags_to_delete(list(steps), steps, self.run.keep_last, self.run.keep_every):
                if old not in keep:
                    shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        distributed.barrier()
        self.mirror.submit(tag, step)
        return tag

    def close(self, wait_s: float | None = None) -> None:
        """Give the last uploads ``wait_s`` (default ``run.close_wait_s``), then say in one line
        what did not reach the store; those count in ``failures``."""
        if self.closed:  # the trainer closes at the end of the loop and again in its finally
            return
        self.closed = True
        m = self.mirror
        m.wait(self.close_wait_s if wait_s is None else wait_s, "end of run")
        m.not_mirrored += [t for t in m.pending() if t not in m.not_mirrored]  # said in the line below
        if m.not_mirrored or m.history_error:
            history = f"; history not mirrored: {m.history_error}" if m.history_error else ""
            say(f"{len(m.not_mirrored)} checkpoint(s) not mirrored to {self.run.store}: "
                f"{', '.join(sorted(set(m.not_mirrored))) or 'none'}; newest there from this run: "
                f"{m.mirrored or 'none'}; local copies in {self.root}{history}")
