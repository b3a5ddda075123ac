"""Security: untrusted checkpoints and exports are refused without running their code; tar member
names never turn into paths outside a target; credentials never appear in what a run writes."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from data_prep.cli import main as prep
from tests.data_prep.fixtures import make_image_folder
from tests.pipelines.test_pretrain import ARGS
from tests.s3_server import ACCESS_KEY, SECRET_KEY

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = dict(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))


class Evil:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint does on torch.load(weights_only=False)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_file(path: pathlib.Path, marker: pathlib.Path, wrap=lambda e: {"model": e}) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(Evil(marker)), path)
    return path


def cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=dict(os.environ, **ENV, **(env or {})),
                          capture_output=True, text=True, timeout=300)


def _record(record_property, fault: str, checked: str, result: str = "pass") -> None:
    record_property("fault", fault)
    record_property("trials", 1)
    record_property("checked", checked)
    record_property("result", result)


def test_the_malicious_pickle_really_runs_code_when_trusted(tmp_path, record_property):
    """Control: the payload works (touches its marker) under torch.load(weights_only=False)."""
    _record(record_property, "control: the malicious pickle under torch.load(weights_only=False)",
            "its code runs (marker file created), so the refusals below are meaningful")
    marker = tmp_path / "PWNED"
    torch.load(evil_file(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_released_checkpoint_loaders_refuse_a_malicious_pickle(tmp_path, record_property):
    """crossmae.interop.read_checkpoint / import_released and `crossmae-export released` refuse it; nothing runs."""
    from crossmae import import_released
    from crossmae.interop import CheckpointError, read_checkpoint

    _record(record_property, "malicious pickle (.pth whose __reduce__ runs os.system) as a released checkpoint",
            "read_checkpoint, import_released, crossmae-export released: refused, marker file not created, no export")
    marker = tmp_path / "PWNED"
    path = evil_file(tmp_path / "evil.pth", marker)
    for load in (read_checkpoint, import_released):
        with pytest.raises(CheckpointError, match="refused or unreadable checkpoint"):
            load(str(path))
    proc = cli("pipelines.export", "released", str(path), str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "failed evil: CheckpointError: refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out/evil/export.json").exists()


def fake_run_checkpoint(run: pathlib.Path, marker: pathlib.Path, evil_in: str) -> None:
    """A run directory with one COMPLETE ZeRO-2 checkpoint whose model-states or optimizer-states file
    carries the payload (the other file is a plain, harmless one)."""
    tag = run / "checkpoints/step00000001"
    tag.mkdir(parents=True)
    model = dict(module={"w": torch.zeros(2)}, buffer_names=[], param_shapes=[{"w": torch.Size([2])}],
                 shared_params={}, ds_version="0.19.8", frozen_param_shapes=None)
    optim = dict(optimizer_state_dict=dict(zero_stage=2, partition_count=1, single_partition_of_fp32_groups=[
        torch.zeros(2)]), ds_config={}, ds_version="0.19.8")
    for name, state in (("mp_rank_00_model_states.pt", model), ("zero_pp_rank_0_mp_rank_00_optim_states.pt", optim)):
        if evil_in in name:
            evil_file(tag / name, marker, wrap=lambda e, s=state: dict(s, payload=e))
        else:
            torch.save(state, tag / name)
    (tag / "COMPLETE").write_text("1")


@pytest.mark.parametrize("evil_in", [
    "model_states",
    "optim_states",
])
def test_export_of_a_run_refuses_a_malicious_checkpoint(tmp_path, record_property, evil_in):
    """crossmae-export of a run whose checkpoint holds a malicious pickle fails that checkpoint; nothing runs."""
    _record(record_property, f"malicious pickle in a run checkpoint's {evil_in} file (crossmae-export RUN OUT)",
            "export fails that checkpoint, marker file not created",
            "pass")
    marker = tmp_path / "PWNED"
    fake_run_checkpoint(tmp_path / "run", marker, evil_in)
    proc = cli("pipelines.export", str(tmp_path / "run"), str(tmp_path / "out"))
    assert not marker.exists(), "the checkpoint's code ran"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out/step00000001/export.json").exists()


def test_trainer_resume_refuses_a_malicious_checkpoint(tmp_path, record_property):
    """A malicious file in the checkpoint --resume auto picks is refused before it is unpickled."""
    _record(record_property, "malicious pickle as the newest COMPLETE checkpoint of run.output (--resume auto)",
            "marker file not created; one error line", "pass")
    make_image_folder(tmp_path / "src", ("a", "b"), per_class=8)
    assert prep(["folder", str(tmp_path / "src"), str(tmp_path / "wds"), "--shard-samples", "8"]) == 0
    marker, run = tmp_path / "PWNED", tmp_path / "run"
    fake_run_checkpoint(run, marker, "model_states")
    proc = cli("pipelines.pretrain", *ARGS, f"data.train={tmp_path / 'wds/train/manifest.json'}", f"run.output={run}",
               "run.max_steps=2", "deepspeed.zero_stage=2")
    assert not marker.exists(), "the checkpoint's code ran"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_export_readers_refuse_a_pickle_in_place_of_safetensors(tmp_path, record_property):
    """crossmae-eval (Export.encoder, feature cache) and finetune (read_export) read safetensors only."""
    from safetensors import SafetensorError

    from pipelines.eval import finetune, inputs
    from pipelines.eval import knn

    _record(record_property, "malicious pickle named model.safetensors / a feature cache file in an export",
            "inputs.Export.encoder, knn.load_features, finetune.read_export raise SafetensorError; marker not created")
    marker, export = tmp_path / "PWNED", tmp_path / "export"
    evil_file(export / "model.safetensors", marker)
    (export / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": {}}))
    (export / "export.json").write_text(json.dumps({"tag": "step00000001", "step": 1}))
    evil_file(tmp_path / "features.safetensors", marker)
    with pytest.raises(SafetensorError):
        inputs.Export.read(str(export)).encoder()
    with pytest.raises(SafetensorError):
        finetune.read_export(str(export))
    with pytest.raises(SafetensorError):
        knn.load_features(str(tmp_path / "features.safetensors"))
    assert not marker.exists()


# ---------------------------------------------------------------- tar member names
def test_nothing_in_the_code_extracts_archives(record_property):
    """Guard: no module extracts tar members to disk (members are read in memory), so no path from an
    archive ever becomes a file name. Adding extraction must come with a traversal-safe filter."""
    _record(record_property, "archive extraction anywhere in crossmae/ data_prep/ pipelines/",
            "no .extractall( / .extract( / shutil.unpack_archive in the code")
    pattern = re.compile(r"\.extractall\(|(?<!knn)\.extract\(|unpack_archive\(")  # knn.extract: features
    hits = [f"{p.relative_to(ROOT)}:{i}" for d in ("crossmae", "data_prep", "pipelines") for p in (ROOT / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_hostile_member_names_stay_names(tmp_path, record_property):
    """Archive members named ../../x or /abs/x: data prep keys them by base name and the shard loader
    treats them as plain keys; no file appears outside the destination."""
    import io
    import tarfile

    from data_prep.shards import tar_member
    from pipelines.data.transforms import MAETrainTransform
    from pipelines.data.loader import StreamingLoader
    from pipelines.data.shard_cache import ShardList
    from tests.data_prep.fixtures import jpeg_bytes, make_imagenet_tree, synthetic_image

    _record(record_property, "tar members named ../../x.JPEG, /abs/x.JPEG, inner tar ../../<wnid>.tar (ImageNet "
                             "archive) and ../ / absolute keys in a shard",
            "prep keys = base names, shard members plain; loader yields the names as keys; no file outside the target")
    import numpy as np

    rng = np.random.default_rng(0)
    jpg = [jpeg_bytes(synthetic_image(rng)) for _ in range(4)]
    src = tmp_path / "in"
    make_imagenet_tree(src, per_class=2, val_per_class=1)  # the devkit and val split come from the tree
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as t:
        for name, data in (("../../../escape_a.JPEG", jpg[0]), ("/tmp/escape_b.JPEG", jpg[1]),
                           ("n01440764_7.JPEG", jpg[2])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with tarfile.open(src / "ILSVRC2012_img_train.tar", "w") as t:
        info = tarfile.TarInfo("../../n01440764.tar")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    (src / "train").rename(tmp_path / "tree-train")  # the archive is the train source now
    listing = sorted(tmp_path.rglob("*"))
    assert prep(["imagenet", str(src), str(tmp_path / "out"), "--splits", "train", "--shard-samples", "10"]) == 0
    new = sorted(set(tmp_path.rglob("*")) - set(listing))
    assert all(p == tmp_path / "out" or tmp_path / "out" in p.parents for p in new), new
    assert not pathlib.Path("/tmp/escape_b.JPEG").exists() and not pathlib.Path("/escape_a.JPEG").exists()
    with tarfile.open(tmp_path / "out/train/train-000000.tar") as t:
        names = t.getnames()
    assert sorted(n.rsplit(".", 1)[0] for n in names if n.endswith(".jpg")) == \
        ["escape_a", "escape_b", "n01440764_7"]
    assert not any("/" in n or n.startswith(".") for n in names)

    shard = tmp_path / "hostile.tar"
    shard.write_bytes(b"".join(tar_member(f"{key}.{ext}", data) for key, data in
                               (("../../up", jpg[0]), ("/abs/root", jpg[1]), ("a/../../b", jpg[2]), ("ok", jpg[3]))
                               for ext, data in (("jpg", data), ("cls", b"1"))) + b"\0" * 1024)
    listing = sorted(tmp_path.rglob("*"))
    loader = StreamingLoader(ShardList((str(shard),), (4,)), batch_size=4, transform=MAETrainTransform(16))
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == ["../../up", "/abs/root", "a/../../b", "ok"] and loader.stats.get("samples") == 4
    assert sorted(tmp_path.rglob("*")) == listing, "reading a shard writes nothing"


# ---------------------------------------------------------------- credentials
def test_credentials_never_appear_in_run_outputs(tmp_path, s3_bucket, s3_env, record_property):
    """prep -> S3, a trainer run mirrored to S3, an export from the store: the secret key (and the key
    ID) appear in no output file, no store object, no stdout/stderr, no metric; nor in the errors of a
    run with a wrong secret."""
    _record(record_property, f"known S3 credentials in the environment (test server identity {ACCESS_KEY})",
            "secret and key ID absent from every file of run dir / export / prep summary, every object in the "
            "bucket, all stdout/stderr (also of a wrong-secret run)")
    store = f"s3://{s3_bucket}"
    make_image_folder(tmp_path / "src", ("a", "b"), per_class=8)
    outputs = [cli("data_prep.cli", "folder", str(tmp_path / "src"), f"{store}/data", "--shard-samples", "8",
                   "--summary-json", str(tmp_path / "prep-summary.json"))]
    outputs.append(cli("pipelines.pretrain", *ARGS, f"data.train={store}/data/train/manifest.json", "data.num_workers=0",
                       f"run.output={tmp_path / 'run'}", f"run.store={store}/run", "run.max_steps=2", "run.save_every=2",
                       "run.recon_every=2", "run.recon_images=2", "deepspeed.zero_stage=2"))
    outputs.append(cli("pipelines.export", f"{store}/run", str(tmp_path / "export")))
    outputs.append(cli("pipelines.pretrain", *ARGS, f"data.train={store}/data/train/manifest.json",
                       f"run.output={tmp_path / 'bad'}", env=dict(AWS_SECRET_ACCESS_KEY=SECRET_KEY[::-1])))
    assert [p.returncode for p in outputs[:3]] == [0, 0, 0], [p.stderr[-2000:] for p in outputs]
    assert outputs[3].returncode != 0 and ("SignatureDoesNotMatch" in outputs[3].stderr or "HTTP 403" in outputs[3].stderr), \
        outputs[3].stderr[-2000:]
    assert (tmp_path / "export/step00000002/export.json").exists()

    from pipelines import storage

    blobs = {f"file:{p}": p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "src" not in p.parts}
    blobs |= {url: storage.read_bytes(url) for url, _ in storage.list_objects(store + "/")}
    blobs |= {f"output {i}": (p.stdout + p.stderr).encode() for i, p in enumerate(outputs)}
    assert len(blobs) > 30 and any("metrics.jsonl" in k for k in blobs) and any(k.endswith(".pt") for k in blobs)
    for secret in (SECRET_KEY, SECRET_KEY[::-1], ACCESS_KEY):
        leaks = [k for k, data in blobs.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} found in {leaks}"
