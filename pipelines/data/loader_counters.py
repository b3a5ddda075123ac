"""What a loader delivered, skipped and read from the object store on this rank: the counters
both formats share (`LoaderCounters`, a mixin of StreamingLoader and the FFCV loader)."""
from __future__ import annotations

import sys
from collections import Counter


class LoaderCounters:
    """What a loader delivered and skipped on this rank, for both formats: ``stats`` ("samples":
    batch entries delivered, plus skipped samples per reason), ``samples_seen`` (valid entries:
    new, readable samples), ``skipped_by_shard``; saved in ``state_dict()``.

    ``traffic``: this process's object-store reads per epoch, {epoch: Counter(gets, bytes, retries,
    shard_reads, shard_rereads)} (pipelines/storage/traffic.py; a re-read is a shard read from the
    store again after an earlier read in this process). Counted in the workers and carried to this
    process on the batches they cost (so a batch prefetched when the loader closes goes uncounted);
    not saved in state_dict(): a checkpoint holds rank 0's state, and a resumed process reads afresh."""

    dataset_bytes: int | None = None  # the shards' bytes, where the manifest says them

    def _reset_traffic(self) -> None:
        self.traffic: dict[int, Counter] = {}
        self._store_shards: set[int] = set()

    def traffic_total(self) -> Counter:
        return sum(self.traffic.values(), Counter())

    def _count_store(self, store: dict) -> None:
        epoch = self.traffic.setdefault(self.epoch, Counter())
        epoch.update({k: v for k, v in store.items() if k != "shards"})
        for shard in store["shards"]:
            epoch["shard_reads"] += 1
            epoch["shard_rereads"] += shard in self._store_shards
            self._store_shards.add(shard)

    def _reset_counters(self, state: dict | None = None) -> None:
        state = state or {}
        self.stats: Counter = Counter(state.get("stats", {}))
        self.samples_seen = state.get("samples_seen", 0)
        self.skipped_by_shard: dict[str, Counter] = {u: Counter(c) for u, c in state.get("skipped_by_shard", {}).items()}
        self._warned = set()

    def _counter_state(self) -> dict:
        return dict(stats=dict(self.stats), samples_seen=self.samples_seen,
                    skipped_by_shard={u: dict(c) for u, c in self.skipped_by_shard.items()})

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.stats.items() if k != "samples")

    @property
    def skipped_fraction(self) -> float:
        """Skipped samples / samples the loader tried to read (skipped + seen), on this rank."""
        return self.skipped / max(1, self.skipped + self.samples_seen)

    def _count(self, batch: dict) -> None:
        """Counters, and one stderr line per damaged shard and reason the first time this rank meets it."""
        store = batch.pop("store", None)
        if store is not None:
            self._count_store(store)
        for url, reason, count, detail in batch["skipped"]:
            self.stats[reason] += count
            self.skipped_by_shard.setdefault(url, Counter())[reason] += count
            if (url, reason) not in self._warned:
                self._warned.add((url, reason))
                print(f"crossmae loader: warning: rank {self.rank}: {url}: {detail}; its unreadable samples are "
                      f"replaced by other samples of their batch (counted as {reason!r} in loader.stats)",
                      file=sys.stderr, flush=True)
        self.stats["samples"] += len(batch["valid"])
        self.samples_seen += int(batch["valid"].sum())

    def summary(self) -> str:
        """One line for the end of a run: samples seen and skipped, per reason and shard."""
        shards = ", ".join(f"{u} ({sum(c.values())})" for u, c in sorted(self.skipped_by_shard.items()))
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()) if k != "samples")
        return (f"rank {self.rank}: {self.samples_seen} samples seen, {self.skipped} skipped "
                f"({100 * self.skipped_fraction:.2f}%)" + (f": {reasons}; shards: {shards}" if self.skipped else ""))
