"""What the streaming loader will read from the store, before a run: the read rule of
pipelines/data/loader.py applied to a manifest's shard list, by the same EpochOrder / Partition
(pure arithmetic, no shard is opened). Shown by ``crossmae-prep loader-stats``.

The rule: each reader (one DataLoader worker of one rank) reads one contiguous stretch of the
epoch order G, which is a run of whole blocks plus a part of a block at each end; it streams each
shard those samples fall in forward once, from the shard's start (or, with the manifest's sample
index, from the indexed sample at or before its first sample) to the last sample it needs.
Without a cache that is one GET per reader and touched shard, and the bytes from that start to
that sample (the end estimated as the shard's bytes x the share of its samples up to it, samples
taken as equal in size; the start is the index's exact offset), rounded up to the reader's 1 MiB
read-ahead (pipelines/storage/s3.py READ_BUFFER): a shard smaller than that is read to its end.
With a shard cache that holds the data, a node (``ranks_per_node`` consecutive ranks sharing one
cache directory) GETs each shard its readers touch once, whole, over the whole run."""
from __future__ import annotations

import numpy as np

from pipelines.data.epoch_order import EpochOrder, Partition
from pipelines.data.shard_cache import ShardList


def _reader_touch(order: EpochOrder, a: int, b: int) -> dict[int, tuple[int, int]]:
    """{manifest shard index: (first, last) sample index read} for one reader's stretch [a, b) of G."""
    bs, starts = order.block_size, np.asarray(order._starts)
    ranges, edges = [], []  # stream positions: the blocks inside [a, b) whole, the edge blocks' permuted parts
    for blk in range(a // bs, -(-b // bs)):
        lo, hi = max(a, blk * bs), min(b, (blk + 1) * bs)
        if lo == blk * bs and hi == min((blk + 1) * bs, order.num_samples):
            ranges.append((lo, hi))
        else:
            edges.append(blk * bs + order.block_permutation(blk)[lo - blk * bs:hi - blk * bs])
    touch: dict[int, tuple[int, int]] = {}

    def note(k: int, first: int, last: int) -> None:
        shard = order.shard_order[k]
        was = touch.get(shard, (first, last))
        touch[shard] = (min(was[0], first), max(was[1], last))

    for lo, hi in ranges:
        k0, k1 = (int(np.searchsorted(starts, v, "right")) - 1 for v in (lo, hi - 1))
        for k in range(k0, k1 + 1):
            note(k, max(lo, int(starts[k])) - int(starts[k]), min(hi, int(starts[k + 1])) - 1 - int(starts[k]))
    if edges:
        s = np.concatenate(edges)
        ks = np.searchsorted(starts, s, "right") - 1
        for k in np.unique(ks):
            mine = s[ks == k] - starts[k]
            note(int(k), int(mine.min()), int(mine.max()))
    return touch


def _stream_bytes(shards: ShardList, sizes, counts, shard: int, first: int, last: int,
                  read_ahead: int | None) -> float:
    """Bytes a reader streams of ``shard`` to read its samples first..last (see the module's rule):
    from its start offset to the end of the read-ahead buffer that holds its last sample.
    ``read_ahead`` None: the shards' sizes are unknown and samples stand in for bytes."""
    end = sizes[shard] * (last + 1) / counts[shard]
    if read_ahead is None:
        return end
    offset = shards.index_start(shard, first)[1]
    span = max(end - offset, sizes[shard] / counts[shard])
    return min(sizes[shard] - offset, -(-span // read_ahead) * read_ahead)


def expected_reads(shards: ShardList, world: int, workers: int, batch: int, block_size: int = 512,
                   ranks_per_node: int | None = None, epochs: int = 3, seed: int = 0, access: str = "stream") -> dict:
    """Expected store reads per epoch (no cache) and per node over ``epochs`` (with a cache that
    holds the data), and the shuffle's shape: shards per batch on rank 0 and the block in shards.
    ``access="random"``: the order is one permutation of the epoch and a reader touches exactly
    the shards of its samples; remote shards are read only through a cache (no_cache is None)."""
    n, readers, per_node = sum(shards.counts), max(1, workers), ranks_per_node or world
    if access == "random":
        block_size = n
    from pipelines.storage.s3 import READ_BUFFER  # here, not at import: loader-stats on local data needs no boto3

    known = shards.dataset_bytes is not None
    read_ahead = READ_BUFFER if known else None
    sizes = np.asarray(shards.sizes if known else shards.counts, dtype=np.float64)
    counts = np.maximum(np.asarray(shards.counts, dtype=np.float64), 1)
    part = Partition(((0, n),), world, readers, batch, True)
    if part.batches_per_rank == 0:
        raise ValueError(f"an epoch gives no batch: {n} samples over {world} rank(s) are fewer than one batch of "
                         f"{batch} per rank")
    gets = nbytes = 0.0
    node_shards: list[set[int]] = [set() for _ in range(-(-world // per_node))]
    per_batch = []
    for epoch in range(epochs):
        order = EpochOrder(shards.counts, seed, epoch, block_size)
        for rank in range(world):
            for worker in range(readers):
                runs = [iv for batch_ivs in part.worker_batches(rank, worker) for iv in batch_ivs]
                if not runs:
                    continue
                if access == "random":
                    hit = order.samples([g for a, b in runs for g in range(a, b)])[0]
                    touch = {int(k): (0, int(shards.counts[k]) - 1) for k in np.unique(hit)}  # fetched whole
                else:
                    touch = _reader_touch(order, min(a for a, _ in runs), max(b for _, b in runs))
                node_shards[rank // per_node].update(touch)
                if epoch == 0:
                    gets += len(touch)
                    nbytes += sum(_stream_bytes(shards, sizes, counts, k, i, j, read_ahead)
                                  for k, (i, j) in touch.items())
                    if rank == 0:
                        per_batch += [len({order.sample(g)[0] for a, b in ivs for g in range(a, b)})
                                      for ivs in part.worker_batches(0, worker)]
    dataset = float(sizes.sum())
    node_bytes = [sum(sizes[k] for k in s) for s in node_shards]
    return dict(
        shards=len(shards.urls), samples=n, dataset_bytes=shards.dataset_bytes, world=world, workers=readers,
        batch=batch, block_size=block_size, access=access, ranks_per_node=per_node, nodes=len(node_shards),
        sample_index_every=shards.index_every if any(shards.index) else 0,
        epochs=epochs,
        no_cache=None if access == "random" else dict(
            gets_per_epoch=int(gets), bytes_per_epoch=int(nbytes) if shards.dataset_bytes else None,
            bytes_per_dataset_per_epoch=round(nbytes / dataset, 3)),
        cache=dict(gets_per_node=max(len(s) for s in node_shards),
                   bytes_per_dataset_per_node=round(max(node_bytes) / dataset, 3)),
        shards_per_batch=dict(mean=round(float(np.mean(per_batch)), 2), min=min(per_batch), max=max(per_batch)),
        block_shards=round(block_size / (n / len(shards.urls)), 2))
