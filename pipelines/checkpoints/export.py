"""The export job behind ``crossmae-export`` (pipelines/export.py): a run's DeepSpeed checkpoints -> timm-compatible
encoders.

SOURCE is a run directory (``run.output``) or a checkpoint store (``run.store``), local or
``s3://``; checkpoints that are only in a store are downloaded to a temporary directory. Each
export is a directory ``OUT/<tag>/``:

    model.safetensors   encoder only, timm key names (crossmae.export_encoder)
    config.json         timm config: architecture, model_args, pretrained_cfg (eval preprocessing);
                        crossmae.timm_export.load_timm(dir) loads the export strictly
    full.safetensors    with --full: encoder + decoder, library key names (reconstruction demos)
    export.json         provenance, written LAST: its presence marks the export complete

Every file is written atomically (storage.open_write); an old export.json is deleted before a
redo, so a crash leaves a directory without export.json, which the next run redoes. An export
whose export.json names the same source (URL and file sizes) and whose files still hash as
recorded is skipped. Consolidation is DeepSpeed's own (zero_to_fp32) for ZeRO 1-3; a ZeRO-0
checkpoint holds the whole module already.

export.json: source (checkpoint URL) and source_files (name: bytes), tag, step, epoch (the
loader's epoch in progress) and epochs_done (fractional), zero_stage, world_size, preset,
model_config (rebuilds the MaskedAutoencoder for full.safetensors), config_url / config_sha256
(the run's resolved config.yaml), data_manifest {url, sha256, reason when null}, weights_sha256
(crossmae.timm_export.tensors_sha256 of the encoder), files {name: sha256, bytes}, time, code_version.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from pipelines.checkpoints import store as ckpt
from pipelines import storage
from pipelines.storage.hashing import sha256_bytes, sha256_of
from pipelines.checkpoints.store import complete_tags
from pipelines.runtime.versions import describe



class ExportError(ValueError):
    """Bad input for the whole batch (one line; exit 2)."""


@dataclass
class Job:
    """One export; plain data so it pickles into a worker process."""
    source: str  # checkpoint directory URL, or a released .pth URL
    out: str  # export directory URL
    tag: str
    full: bool = False
    run: dict | None = None  # run_info(): model config, preset, digests (None: a released file)
    preset: str | None = None  # released files: head counts from this preset
    code_version: str | None = None


def _url(source: str) -> str:
    source = source.rstrip("/")
    return source if "://" in source else os.path.abspath(source)


def complete_steps(source: str) -> dict[str, int]:
    """{tag: step} of the complete pretraining checkpoints under SOURCE/checkpoints/."""
    return {t: int(t[4:]) for t in complete_tags(source) if t.startswith("step")}


def check_select(spec: str) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if (kind in ("all", "latest") and not arg) or (kind == "every" and arg.isdigit() and int(arg) > 0) or \
            (kind == "tags" and arg.strip(", ")):
        return kind, arg
    raise ExportError(f"bad --select {spec!r}: use all, latest, every:N or tags:TAG,TAG")


def select(tags: dict[str, int], spec: str) -> list[str]:
    """``all`` | ``latest`` | ``every:N`` (steps divisible by N) | ``tags:a,b``; oldest first."""
    kind, arg = check_select(spec)
    ordered = sorted(tags, key=tags.get)
    if kind == "every":
        return [t for t in ordered if tags[t] % int(arg) == 0]
    if kind == "tags":
        wanted = {t.strip() for t in arg.split(",") if t.strip()}
        unknown = sorted(wanted - set(tags))
        if unknown:
            raise ExportError(f"no complete checkpoint {unknown[0]} (complete: {', '.join(ordered)})")
        return [t for t in ordered if t in wanted]
    return ordered[-1:] if kind == "latest" else ordered


def run_info(source: str, config: str | None = None) -> dict:
    """What every export of a run shares: model config and preset from the run's resolved
    config.yaml (SOURCE/config.yaml or --config), its sha256, and the data manifest's sha256."""
    import yaml

    from pipelines.runtime.config_loader import ConfigError, from_dict
    from pipelines.train.config import PretrainConfig

    url = config or storage.join(source, "config.yaml")
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        if config:
            raise ExportError(f"config {config} not found") from None
        # e.g. a store holds checkpoints only: the architecture comes from the weights
        return dict(config_url=None, config_sha256=None, preset=None, model_config=None,
                    data_manifest=dict(url=None, sha256=None, reason="no run config.yaml next to the checkpoints"))
    try:
        cfg = from_dict(PretrainConfig, yaml.safe_load(raw) or {})
        model_config = dataclasses.asdict(cfg.model_config())
    except (ConfigError, yaml.YAMLError, ValueError) as e:
        raise ExportError(f"{url}: not a pretraining config ({str(e).splitlines()[0]})") from None
    manifest = dict(url=cfg.data.train or None, sha256=None, reason=None)
    if not cfg.data.train.endswith(".json"):
        manifest["reason"] = "data.train is not a manifest (a shard pattern or unset)"
    else:
        try:
            manifest["sha256"] = sha256_of(cfg.data.train)
        except (OSError, ValueError) as e:  # moved, another machine's path, no credentials
            manifest["reason"] = f"manifest not readable here: {str(e).splitlines()[0]}"
    return dict(config_url=_url(url), config_sha256=sha256_bytes(raw), preset=cfg.model.preset,
                model_config=model_config, data_manifest=manifest)


def _listing(prefix: str) -> dict[str, int]:
    """{relative name: size} of a checkpoint directory's files: identifies the source cheaply."""
    prefix = prefix.rstrip("/") + "/"
    return {u[len(prefix):]: n for u, n in storage.list_objects(prefix)}


def _up_to_date(job: Job, source_files: dict[str, int]) -> bool:
    try:
        record = json.loads(storage.read_bytes(storage.join(job.out, "export.json")))
        if record.get("source") != job.source or record.get("source_files") != source_files:
            return False
        if job.full and "full.safetensors" not in record["files"]:
            return False
        return all(sha256_of(storage.join(job.out, name)) == meta["sha256"]
                   for name, meta in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or foreign: redo
        return False


def consolidate(ckpt_dir: str) -> tuple[dict, dict]:
    """(fp32 state dict, client state) of a local DeepSpeed checkpoint directory."""
    import torch
    from deepspeed.utils import zero_to_fp32 as z

    from pipelines.checkpoints.integrity import verify_checkpoint

    verify_checkpoint(ckpt_dir)  # sizes + sha256 against the save-time manifests, then weights-only pickles
    client = torch.load(z.get_model_state_files(ckpt_dir)[0], map_location="cpu", weights_only=True)
    if not any(n.endswith("_optim_states.pt") for n in os.listdir(ckpt_dir)):  # ZeRO-0: nothing sharded
        return {k: v.float() for k, v in client["module"].items()}, client
    # zero_to_fp32 prints progress (stdout, tqdm on stderr): keep the CLI's output to its own lines
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        state = z.get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir))
    # ZeRO-1 records no frozen parameters (DeepSpeed 0.19.8: frozen_param_shapes is None), so the
    # fixed sin-cos position embeddings are missing; they are whole in the module state. Only
    # non-trainable names are taken from there (ZeRO-3 keeps empty placeholders in it).
    trainable = {k for group in client.get("param_shapes") or () for k in group}
    for k, v in client["module"].items():
        if k not in state and k not in trainable and v.numel():
            state[k] = v.float()
    return state, client


def _load_run_model(job: Job, local_dir: str):
    from crossmae import MaskedAutoencoder, ModelConfig, config_from_released, load_into

    state, client = consolidate(local_dir)
    cfg = ModelConfig(**job.run["model_config"]) if job.run["model_config"] else config_from_released(state)
    model = MaskedAutoencoder(cfg)
    load_into(model, state)  # strict; CheckpointError names what does not fit
    loader = client.get("loader") or {}
    left = sum(b - a for a, b in loader.get("remaining", ()))
    epoch = loader.get("epoch")
    extra = dict(step=client.get("step"), epoch=epoch,
                 epochs_done=round(epoch + 1 - left / loader["num_samples"], 6) if epoch is not None else None,
                 zero_stage=client.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0),
                 world_size=client.get("dp_world_size"), architecture="from config" if job.run["model_config"]
                 else "inferred from the weights (no run config)")
    return model, extra


def _load_released(job: Job):
    from crossmae import import_released, model_config

    heads = {}
    if job.preset:  # head counts are not in the weights
        pc = model_config(job.preset)
        heads = dict(num_heads=pc.num_heads, decoder_num_heads=pc.decoder_num_heads)
    with storage.open_read(job.source) as f:  # torch.load(weights_only=True) inside
        return import_released(f, **heads)


def export_model(model, out: str, record: dict, full: bool = False) -> dict:
    """Write the export files of a model into OUT, export.json last; returns the record."""
    import torch
    from safetensors.torch import save

    from crossmae import export_encoder
    from crossmae.timm_export import tensors_sha256

    storage.delete(storage.join(out, "export.json"))  # from here on the directory is "incomplete"
    tensors, timm_cfg = export_encoder(model)
    blobs = {"model.safetensors": save(tensors, metadata={"format": "pt"}),
             "config.json": json.dumps(timm_cfg, indent=1).encode()}
    if full:
        blobs["full.safetensors"] = save({k: v.detach().to(torch.float32).contiguous()
                                          for k, v in model.state_dict().items()}, metadata={"format": "pt"})
    for name, data in blobs.items():
        with storage.open_write(storage.join(out, name)) as f:
            f.write(data)
    record = dict(record, weights_sha256=tensors_sha256(tensors), model_config=dataclasses.asdict(model.config),
                  files={n: dict(sha256=sha256_bytes(d), bytes=len(d)) for n, d in blobs.items()},
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    storage.write_bytes(storage.join(out, "export.json"), json.dumps(record, indent=1).encode())
    return record


def run_job(job: Job) -> dict:
    """Export one checkpoint (or released file): {'tag', 'status': exported|skipped|failed, ...}."""
    t0 = time.time()
    result = dict(tag=job.tag, out=job.out)
    try:
        released = job.run is None
        source_files = ({os.path.basename(job.source): storage.size(job.source)} if released
                        else _listing(job.source))
        if _up_to_date(job, source_files):
            return dict(result, status="skipped", seconds=round(time.time() - t0, 2))
        record = dict(source=job.source, source_files=source_files, tag=job.tag, code_version=job.code_version)
        if released:
            model = _load_released(job)
            record.update(step=None, epoch=None, preset=job.preset, config_sha256=None,
                          data_manifest=dict(url=None, sha256=None, reason="released checkpoint"))
        else:
            record.update({k: job.run[k] for k in ("preset", "config_url", "config_sha256", "data_manifest")})
            with tempfile.TemporaryDirectory(prefix="crossmae-export-") as tmp:
                local = job.source
                if "://" in job.source:  # only in a store: fetch it (DeepSpeed reads local files)
                    store = job.source.rsplit("/checkpoints/", 1)[0]
                    local = ckpt.download(store, job.tag, tmp)
                model, extra = _load_run_model(job, local)
            record.update(extra)
        record = export_model(model, job.out, record, job.full)
        return dict(result, status="exported", step=record["step"], weights_sha256=record["weights_sha256"],
                    seconds=round(time.time() - t0, 2))
    except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the batch; reported in one line
        msg = " ".join(str(e).split()) or type(e).__name__
        # torch / DeepSpeed messages often name no file ("failed finding central directory"): name the source
        where = "" if job.source in msg or job.out in msg else f" (reading {job.source})"
        return dict(result, status="failed", error=f"{type(e).__name__}: {msg}"[:500] + where,
                    seconds=round(time.time() - t0, 2))


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: list[Job], workers: int = 1) -> list[dict]:
    """Run exports in `workers` processes (consolidation is CPU bound), with a progress bar on a TTY."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="export", unit="ckpt", disable=not sys.stderr.isatty(), file=sys.stderr)
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(run_job(job))
            bar.update()
    else:  # spawn: no forked copies of torch's thread pools or boto3 clients
        threads = max(1, (os.cpu_count() or 1) // workers)
        with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_worker, initargs=(threads,)) as pool:
            for fut in cf.as_completed([pool.submit(run_job, j) for j in jobs]):
                results.append(fut.result())
                bar.update()
    bar.close()
    order = {j.tag: i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r["tag"]])


def export_checkpoint(source: str, tag: str, out: str, *, full: bool = False, config: str | None = None) -> dict:
    """Export one checkpoint of a run (directory or store) into the directory OUT; returns the
    result ({'status': exported|skipped|failed, ...}). ``make demo`` calls this."""
    job = Job(source=storage.join(_url(source), "checkpoints", tag), out=_url(out), tag=tag, full=full,
              run=run_info(_url(source), config), code_version=describe())
    return run_job(job)


def export_run(source: str, out: str, spec: str = "all", *, workers: int = 1, full: bool = False,
               config: str | None = None) -> list[dict]:
    source, out = _url(source), _url(out)
    tags = complete_steps(source)
    if not tags:
        raise ExportError(f"no complete checkpoints under {storage.join(source, 'checkpoints')}/")
    chosen, info, version = select(tags, spec), run_info(source, config), describe()
    return run_jobs([Job(source=storage.join(source, "checkpoints", t), out=storage.join(out, t), tag=t, full=full,
                         run=info, code_version=version) for t in chosen], workers)
