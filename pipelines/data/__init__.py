"""Stage 3: from shards to batches: JPEG helpers, epoch order, shard cache, prefetch, worker-side transforms,
device-side decode and resize, the streaming WebDataset loader and the loader factory."""
