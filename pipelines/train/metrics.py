"""Rank 0's view of a run: progress bar, metrics.jsonl, TensorBoard, reconstruction PNGs,
and the facts written next to them (code version, peak memory, model FLOPs utilisation)."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import Counter

import numpy as np
import torch

from pipelines.runtime import distributed

# Dense bf16 tensor-core peaks per device (vendor datasheets, SXM parts; no sparsity).
# MFU is reported against these; set run.peak_tflops for other parts or precisions.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "B200": 2250.0, "GH200": 989.0}


def peak_tflops(override: float | None = None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux



def process_start_time() -> float:
    """When this process started (wall clock, 10 ms resolution): /proc/self/stat's starttime
    (clock ticks after boot) plus the boot time; the time of this call where /proc has neither."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, counted after the comm field
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


class Observer:
    """Everything rank 0 reports. Other ranks get an Observer that does nothing."""

    def __init__(self, out: str, enabled: bool, total: int, initial: int, tensorboard: bool = True):
        self.out, self.enabled, self.total = out, enabled, total
        self.metrics = self.tb = self.bar = None
        if not enabled:
            return
        self.metrics = open(os.path.join(out, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=initial or None)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)

    def step(self, n: int = 1, **postfix) -> None:
        if self.bar:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items() if v is not None}, refresh=False)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
            self.tb.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar else lambda t: print(t, file=sys.stderr))(text)

    def recon(self, step: int, grid: torch.Tensor) -> str | None:
        if not self.enabled:
            return None
        path = os.path.join(self.out, "recon", f"step{step:08d}.png")
        write_png(path, grid.numpy())
        if self.tb:
            self.tb.add_image("recon", grid.numpy(), step, dataformats="HWC")
            self.tb.flush()
        return path

    def close(self) -> None:
        for h in (self.bar, self.tb, self.metrics):
            if h:
                h.close()


def model_flops_utilization(flops_per_image: float, images_per_s_per_device: float, peak: float | None) -> float | None:
    """Achieved model FLOPs (forward + backward of the tokens processed) over the device's dense
    bf16 peak; the trainer and benchmarks/gpu_throughput.py report the same number."""
    return round(flops_per_image * images_per_s_per_device / (peak * 1e12), 4) if peak else None


class DataLossError(RuntimeError):
    """More samples were damaged / undecodable than ``data.max_skipped_fraction`` allows."""


class RunMetrics:
    """The trainer's metrics component: every ``run.log_every`` steps one record (loss, lr, grad
    norm, img/s, data-wait share, peak memory, MFU, skipped samples) to metrics.jsonl and
    TensorBoard, reduced over ranks in ONE collective; the skipped-sample budget; the
    end-of-run summary line."""

    def __init__(self, cfg, obs: Observer, loader, world: int, device: torch.device, flops_per_image: float,
                 samples_per_epoch: int = 0, store=None):
        self.cfg, self.obs, self.loader, self.world, self.device = cfg, obs, loader, world, device
        self.store = store  # the loader itself (``loader`` is its prefetcher): its object-store traffic
        self.first_batch: dict = {}  # report_first_batch(): logged on the first log line and in the summary
        self.samples_per_epoch = samples_per_epoch
        self.flops_per_image, self.peak = flops_per_image, peak_tflops(cfg.run.peak_tflops)
        self.imgs_per_step = cfg.effective_batch(world)
        self.t_start = self.t_last = time.perf_counter()
        self.data_wait, self.window, self.losses = 0.0, 0, []
        self.steps_run = self.skipped_nonfinite = 0
        self.last_loss = None

    def skipped_step(self, step: int, ranks: int, in_row: int, total: int) -> None:
        self.skipped_nonfinite = total
        self.obs.message(f"step {step}: non-finite loss on {ranks} rank(s); micro-batch skipped "
                         f"({in_row} in a row, {total} in total)")

    def _loader_counts(self) -> tuple[int, int]:
        """(replaced, good) samples so far: the loader's counts as of the last batch trained on
        (``self.loader`` is the trainer's prefetcher, one batch ahead of the loader itself)."""
        skipped = sum(v for k, v in self.loader.stats.items() if k != "samples")
        return skipped, self.loader.state_dict().get("samples_seen", 0)

    def step(self, step: int, result, lr: float, engine=None) -> None:
        """``result`` is the TrainStep's StepResult (its grad_norm included); ``engine`` is unused."""
        self.steps_run += 1
        self.window += 1
        self.data_wait += result.data_wait
        self.losses.append(result.loss)
        self.last_loss = result.loss
        self.obs.step(loss=result.loss, lr=lr)
        if step % self.cfg.run.log_every and step != self.obs.total:
            return
        now = time.perf_counter()
        seconds = now - self.t_last
        skipped, seen = self._loader_counts()
        share = self.data_wait / seconds
        # log steps only: the counts summed, the slowest rank's data-wait share
        skipped_all, seen_all, *traffic = distributed.all_reduce_values([skipped, seen, *self._traffic()])
        share_max = distributed.all_reduce(torch.tensor([share], dtype=torch.float64), op="max").item()
        ips = self.window * self.imgs_per_step / seconds
        grad_norm = result.grad_norm  # a device tensor until here: the one read of it per log step
        stats = self.loader.stats
        self.obs.log(dict(step=step, epoch=self.loader.epoch, loss=sum(self.losses) / len(self.losses),
                          lr=lr, grad_norm=None if grad_norm is None else float(grad_norm),
                          images_per_s=round(ips, 2), images_per_s_per_rank=round(ips / self.world, 2),
                          data_wait_share=round(share, 4), data_wait_share_max=round(share_max, 4),
                          peak_memory_gb=round(peak_memory_gb(self.device), 3),
                          mfu=model_flops_utilization(self.flops_per_image, ips / self.world, self.peak),
                          skipped_nonfinite=self.skipped_nonfinite, skipped_samples=int(skipped_all),
                          samples_seen=int(seen_all),
                          skipped_samples_rank0={k: v for k, v in stats.items() if k != "samples"},
                          **self._traffic_fields(traffic), **self.first_batch, seconds=round(seconds, 4)))
        self.first_batch = {k: v for k, v in self.first_batch.items() if k == "first_batch_summary"}
        self.t_last, self.data_wait, self.window, self.losses = now, 0.0, 0, []
        limit = self.cfg.data.max_skipped_fraction
        drawn = skipped_all + seen_all  # samples_seen counts the good ones only
        # the budget is a share of at least one epoch: one bad batch early on is not 1% of the data
        if drawn and skipped_all / max(drawn, self.samples_per_epoch) > limit:
            raise DataLossError(f"{int(skipped_all)} of {int(drawn)} samples drawn so far were "
                                f"damaged or undecodable and replaced: more than data.max_skipped_fraction={limit:g} "
                                f"of an epoch ({self.samples_per_epoch} samples); "
                                "run `crossmae-prep verify` on the shards")

    def report_first_batch(self, at: float, loader_built: float, process_started: float, rank: int, resumed: bool,
                           data_s: float) -> None:
        """Time to first batch on the device, on every rank (ONE collective: each rank fills its own
        slots); rank 0 says the slowest rank's. Three spans: from process start (imports, joining
        the job, everything), from loader construction (that plus the DeepSpeed engine, a resume's
        checkpoint load and the run files), and ``data_s``, the loader's own part (building it:
        the manifest; then the wait for the first batch: workers, plan, shard reads, decode)."""
        mine = [0.0] * (3 * self.world)
        mine[3 * rank:3 * rank + 3] = at - process_started, at - loader_built, data_s
        every = distributed.all_reduce_values(mine)
        total, from_loader, data = (every[k::3] for k in range(3))
        slowest = max(range(self.world), key=lambda r: total[r])
        start = "resume" if resumed else "cold start"
        self.first_batch = dict(first_batch_s=round(total[slowest], 3),
                                first_batch_loader_s=round(from_loader[slowest], 3),
                                first_batch_data_s=round(data[slowest], 3), first_batch_slowest_rank=slowest,
                                first_batch_start=start, first_batch_rank_s=[round(t, 3) for t in total],
                                first_batch_loader_rank_s=[round(t, 3) for t in from_loader],
                                first_batch_data_rank_s=[round(t, 3) for t in data])
        self.first_batch["first_batch_summary"] = (f"first batch after {total[slowest]:.2f} s (loader "
                                                   f"{from_loader[slowest]:.2f} s), slowest rank {slowest}, {start}")
        self.obs.message(f"crossmae-pretrain: {self.first_batch['first_batch_summary']}")

    def _traffic(self) -> list[float]:
        """This rank's store traffic since the process started: gets, bytes, retries, re-reads, and
        the bytes of the current epoch (pipelines/data/loader.py LoaderCounters.traffic)."""
        by_epoch = getattr(self.store, "traffic", None) or {}
        total = sum(by_epoch.values(), Counter())
        epoch = by_epoch.get(self.loader.epoch, Counter())
        return [total["gets"], total["bytes"], total["retries"], total["shard_rereads"], epoch["bytes"]]

    def _traffic_fields(self, summed: list[float]) -> dict:
        gets, read, retries, rereads, epoch_bytes = (int(v) for v in summed)
        dataset = getattr(self.store, "dataset_bytes", None)
        return dict(store_gets=gets, store_bytes=read, store_retries=retries, shard_rereads=rereads,
                    store_bytes_epoch=epoch_bytes,
                    bytes_read_per_dataset_epoch=round(epoch_bytes / dataset, 4) if dataset else None)

    def recon(self, step: int, module, fixed) -> None:
        from crossmae.visualize import reconstruction_grid

        self.obs.recon(step, reconstruction_grid(module, *fixed, title=f"step {step}"))

    def finish(self, step: int, checkpointer) -> dict:
        skipped, seen = self._loader_counts()
        skipped_all, seen_all, *traffic = distributed.all_reduce_values([skipped, seen, *self._traffic()])
        store = self._traffic_fields(traffic)
        seconds = time.perf_counter() - self.t_start
        ips = self.steps_run * self.imgs_per_step / seconds if seconds > 0 else 0.0
        latest = os.path.join(self.cfg.run.output, "checkpoints", f"step{step:08d}")
        where = f"{latest}" + (f" (mirrored to {self.cfg.run.store})" if self.cfg.run.store else "")
        loss = "n/a" if self.last_loss is None else f"{self.last_loss:.4f}"
        line = (f"crossmae-pretrain: done: step {step} ({self.steps_run} this run), final loss {loss}, "
                f"{ips:.1f} img/s, checkpoint {where}")
        if skipped_all:
            line += (f"; {int(skipped_all)} of {int(skipped_all + seen_all)} samples damaged and replaced "
                     "(see the warnings above; `crossmae-prep verify` names the shards)")
        dataset = getattr(self.store, "dataset_bytes", None)
        line += (f"; store: {store['store_gets']} GETs, {store['store_bytes'] / 2**20:.1f} MiB"
                 + (f" ({store['store_bytes'] / dataset:.2f}x the dataset)" if dataset else "")
                 + f", {store['store_retries']} retries, {store['shard_rereads']} shard re-reads (all ranks)")
        if "first_batch_summary" in self.first_batch:
            line += f"; {self.first_batch['first_batch_summary']}"
        fallbacks = getattr(checkpointer, "fallbacks", None) or []
        if fallbacks:
            line += (f"; resumed past {len(fallbacks)} damaged checkpoint(s) ({', '.join(fallbacks)}; "
                     "see the lines above)")
        self.obs.message(line)
        self.obs.close()
        by_epoch = getattr(self.store, "traffic", None) or {}
        return dict(final_loss=self.last_loss, images_per_s=ips, skipped_samples=int(skipped_all),
                    resume_fallbacks=len(fallbacks), **store,
                    store_traffic_rank={str(e): dict(c) for e, c in sorted(by_epoch.items())},
                    **{k: v for k, v in self.first_batch.items() if k != "first_batch_summary"})
