"""DevicePrefetcher: prepare batch i+1 on the device (decode, crop, resize) while step i runs.

    stream = DevicePrefetcher(batches, to_device_fn, device, state_source=loader)
    for out in stream:          # out = to_device_fn(batch), ready on the current stream
        ...
    stream.state_dict()         # the loader's state right after the batch of the last `out`

On CUDA, `to_device_fn` runs in one background thread on a side stream: torchvision's nvJPEG
call blocks its calling thread until the decode is done (it synchronises its stream) and
releases the GIL, so the trainer's thread keeps launching kernels meanwhile. The consumer's
stream waits for an event recorded after `to_device_fn`, and every device tensor handed out is
`record_stream`-ed on the consumer's stream, so the caching allocator does not reuse its memory
for the next batch while the step still reads it. On a CPU device it runs inline by default
(`background=False`: same results, no thread); tests pass background=True to run the threaded
path on the CPU.

Why `state_source`: the prefetcher pulls one batch ahead, so ``loader.state_dict()`` already
counts a batch the trainer has not trained on; resuming from it would skip that batch. The
prefetcher snapshots the loader's state right after pulling each batch and hands back the one
belonging to the last batch it yielded.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_END = object()


def _device_tensors(obj):
    """Every tensor in nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _device_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _device_tensors(v)


class DevicePrefetcher:
    """Iterates ``to_device_fn(batch)`` for each batch of `batches`, one batch ahead (see module)."""

    def __init__(self, batches, to_device_fn, device, state_source=None, background: bool | None = None):
        self.device = torch.device(device)
        self.background = self.device.type == "cuda" if background is None else background
        self._batches, self._fn, self._source = iter(batches), to_device_fn, state_source
        self._state = state_source.state_dict() if state_source is not None else None
        self.device_stats: Counter = Counter()  # samples substituted on the device, by reason
        self._pending: Future | object | None = None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="device-prefetch", initializer=self._init_thread)
                      if self.background else None)

    def _init_thread(self) -> None:
        if self.device.type == "cuda":  # the current device is per thread: rank r must not decode on cuda:0
            torch.cuda.set_device(self.device)

    def __iter__(self):
        return self

    def _snapshot(self):
        return self._source.state_dict() if self._source is not None else None

    def _run(self, batch):
        """In the background thread (or inline): to_device_fn on the side stream, plus an event."""
        if self._stream is None:
            return batch, self._fn(batch), None
        with torch.cuda.stream(self._stream):
            # torchvision's nvJPEG writes its outputs on its own stream: memory the caching
            # allocator recycles from this stream's last batch must be idle first.
            self._stream.synchronize()
            out = self._fn(batch)
            event = torch.cuda.Event()
            event.record(self._stream)
        return batch, out, event

    def _submit(self):
        """Pull the next batch (in this thread: the loader is never touched by another) and
        start its device work; _END when the batches are exhausted."""
        try:
            batch = next(self._batches)
        except StopIteration:
            return _END
        state = self._snapshot()
        if self._pool is None:
            fut = Future()
            try:
                fut.set_result(self._run(batch))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer with its batch
                fut.set_exception(e)
        else:
            fut = self._pool.submit(self._run, batch)
        return fut, state

    def __next__(self):
        if self._pending is None:
            self._pending = self._submit()
        if self._pending is _END:
            raise StopIteration
        fut, state = self._pending
        self._pending = None  # inline: no lookahead (identical results, nothing to overlap on a CPU)
        if self._pool is not None:
            try:
                self._pending = self._submit()
            except Exception as e:  # noqa: BLE001 - the loader failed: hand out this batch, raise next time
                failed = Future()
                failed.set_exception(e)
                self._pending = failed, None
        batch, out, event = fut.result()
        if event is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            for t in _device_tensors(out):
                if t.device.type == "cuda":
                    t.record_stream(consumer)
        self._state = state
        if isinstance(batch, dict) and batch.get("corrupt_device"):
            self.device_stats.update(batch["corrupt_device"])
        return out

    @property
    def stats(self) -> Counter:
        """The loader's stats as of the last batch handed out, plus device-side substitutions:
        what `loader.stats` means without a prefetcher (keys other than 'samples' are skips)."""
        base = Counter((self._state or {}).get("stats", {}))
        return base + self.device_stats

    @property
    def epoch(self) -> int | None:
        return None if self._state is None else self._state["epoch"]

    def state_dict(self) -> dict:
        """The state_source's state right after the last batch handed out, with device-side
        substitutions added to its stats (so a resumed run keeps counting them)."""
        if self._state is None:
            raise ValueError("DevicePrefetcher was built without state_source")
        state = dict(self._state)
        if "stats" in state:
            state["stats"] = dict(Counter(state["stats"]) + self.device_stats)
        return state

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
