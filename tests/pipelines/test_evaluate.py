"""crossmae-eval on the real digits set (scikit-learn's handwritten digits as 32x32 JPEGs, sharded
by crossmae-prep): a briefly pretrained encoder (the real trainer, one process, 300 steps) beats
the same architecture at random initialisation in k-NN; the k-NN vote equals a brute-force numpy
reference; features are cached; the linear probe learns; sweeps skip finished exports and fan
out by index; results, report and feature caches round-trip through S3; bad input is one line."""
import csv
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crossmae import MaskedAutoencoder, create_model
from data_prep.cli import main as prep
from pipelines import storage
from pipelines.evaluate import main
from pipelines.checkpoints.export import export_model
from pipelines.eval.knn import knn_classify, topk_accuracy
from pipelines.eval.linprobe import LARS

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRESET = "crossmae_vit_micro_patch4_dec64d2b"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    from pipelines.demo import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images")  # train 1,500 / val 297, 10 classes
    for split in ("train", "val"):
        assert prep(["folder", str(root / "images" / split), str(root / "wds"), "--split", split,
                     "--shard-samples", "256"]) == 0
    return dict(root=root, train=str(root / "wds/train/manifest.json"), val=str(root / "wds/val/manifest.json"))


def write_export(model: MaskedAutoencoder, url: str, step: int, tag: str) -> str:
    """An export as crossmae-export writes it (its export_model: files and their sha256 recorded)."""
    export_model(model, url, dict(tag=tag, step=step))
    return url


def random_export(url: str, step: int = 0, seed: int = 0) -> str:
    torch.manual_seed(seed)
    return write_export(create_model(PRESET), url, step, f"random{seed}")


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory) -> MaskedAutoencoder:
    """300 steps of the real trainer in one plain process (about 25 s), consolidated."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipelines.runtime.config_loader import load
    from pipelines.train.config import PretrainConfig

    run = tmp_path_factory.mktemp("pretrain") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))
    cmd = [sys.executable, "-m", "pipelines.pretrain", f"model.preset={PRESET}", f"data.train={digits['train']}",
           "data.image_size=32", "data.num_workers=1", "deepspeed.micro_batch=32", "optim.lr=1e-3",
           "optim.warmup_epochs=1", "optim.epochs=15", "run.max_steps=300", f"run.output={run}", "run.save_every=300",
           "deepspeed.zero_stage=2"]  # zero_to_fp32 consolidates ZeRO 1-3 checkpoints (the default is now ZeRO-0)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load(PretrainConfig, str(run / "config.yaml"))
    model = MaskedAutoencoder(cfg.model_config())
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step00000300"))
    return model


def result(export: str, name: str = "knn") -> dict:
    return json.loads(storage.read_bytes(storage.join(export, "eval", f"{name}.json")))


def test_knn_vote_equals_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 5, generator=g), torch.randn(9, 5, generator=g)
    labels, test_labels = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (9,), generator=g)
    ks = (1, 3, 10, 100)  # 100 > 60 training samples: every sample votes
    scores = knn_classify(train, labels, test, 4, ks, temperature=0.07, chunk=4)  # chunking crosses the test set
    tr = (train / train.norm(dim=1, keepdim=True)).double().numpy()
    for i, k in enumerate(ks):
        ref = np.zeros((9, 4))
        for n, x in enumerate(test.double().numpy()):
            sim = tr @ (x / np.linalg.norm(x))
            for j in np.argsort(-sim)[:k]:
                ref[n, labels[j]] += np.exp(sim[j] / 0.07)
        np.testing.assert_allclose(scores[i].numpy(), ref, rtol=1e-4)
        acc = topk_accuracy(scores[i], test_labels, ks=(1, 2))
        assert acc["top1"] == pytest.approx(100 * np.mean(ref.argmax(1) == test_labels.numpy()))
        top2 = np.argsort(-ref, axis=1, kind="stable")[:, :2]
        assert acc["top2"] == pytest.approx(100 * np.mean((top2 == test_labels.numpy()[:, None]).any(1)))


def test_lars_scales_each_weight_matrix_step_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    w.grad, b.grad = torch.randn(4, 3, dtype=torch.float64) * 100, torch.randn(4, dtype=torch.float64)
    w0, b0 = w.detach().clone(), b.detach().clone()
    LARS([w, b], lr=0.5, momentum=0.0).step()
    assert (w.detach() - w0).norm().item() == pytest.approx(0.5 * 0.001 * w0.norm().item(), rel=1e-5)  # not 100x
    assert torch.allclose(b.detach(), b0 - 0.5 * b.grad)  # biases: plain SGD


def test_pretrained_encoder_beats_random_init_in_knn_and_report_is_written(digits, pretrained, tmp_path, capsys):
    prefix = tmp_path / "exports"
    random_export(str(prefix / "random"), step=0)
    write_export(pretrained, str(prefix / "step300"), 300, "step00000300")
    assert main(["knn", "--train", digits["train"], "--val", digits["val"], str(prefix), "--workers", "1"]) == 0
    rand, pre = result(str(prefix / "random")), result(str(prefix / "step300"))
    m_rand, m_pre = rand["metrics"], pre["metrics"]
    print(f"\nk-NN top1 (avg / cls, k=20): random {m_rand['top1']:.1f} / {m_rand['cls_k20_top1']:.1f}, "
          f"pretrained 300 steps {m_pre['top1']:.1f} / {m_pre['cls_k20_top1']:.1f}", file=sys.stderr)
    # measured (seeds 0-4 of the init, 0-2 of the pretraining): random 66-69, pretrained 83-87; chance is 10
    assert m_rand["top1"] > 40 and m_pre["top1"] > 75
    assert m_pre["top1"] > m_rand["top1"] + 8 and m_pre["cls_k20_top1"] > m_rand["cls_k20_top1"] + 5
    assert {f"{p}_k{k}_top{t}" for p in ("avg", "cls") for k in (10, 20, 100) for t in (1, 5)} <= set(m_pre)
    assert m_pre["top1"] == m_pre["avg_k20_top1"] and m_pre["corrupt"] == 0

    assert pre["job"] == "knn" and pre["export"] == str(prefix / "step300")
    assert (pre["tag"], pre["step"], pre["epoch"]) == ("step00000300", 300, None)
    for role in ("train", "val"):
        data = pre["dataset"][role]
        assert data["sha256"] == hashlib.sha256(pathlib.Path(digits[role]).read_bytes()).hexdigest()
        assert data["num_samples"] == {"train": 1500, "val": 297}[role] and data["manifest"] == digits[role]
    assert pre["config"]["k"] == [10, 20, 100] and pre["config"]["feature_cache"] == dict(train="miss", val="miss")
    assert pre["seconds"] > 0 and pre["time"].endswith("+00:00")

    # the sweep wrote the report across both exports into the prefix
    rows = list(csv.DictReader((prefix / "report.csv").open()))
    assert [(r["export"], r["step"]) for r in rows] == [(str(prefix / "random"), "0"), (str(prefix / "step300"), "300")]
    assert float(rows[1]["knn/top1"]) == m_pre["top1"] and "knn/cls_k100_top5" in rows[0]
    md = (prefix / "report.md").read_text().splitlines()
    assert md[2] == "| export | step | knn/avg_k20_top1 | knn/avg_k20_top5 | knn/cls_k20_top1 |"  # named protocol
    assert md[5].startswith(f"| step300 | 300 | {m_pre['top1']:.2f} |")
    with Image.open(prefix / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
        png.verify()

    # `report` alone, elsewhere, once a linear probe result joins the knn ones; the README's recipe
    # with the default probe batch (MAE's 16,384 was one step per epoch here: 29.7% top-1)
    capsys.readouterr()
    assert main(["linprobe", "--train", digits["train"], "--val", digits["val"], str(prefix / "step300"),
                 "--optimizer", "sgd", "--epochs", "30"]) == 0
    assert "probe batch 188, not MAE's 16384: 1500 training samples" in capsys.readouterr().err
    probe = result(str(prefix / "step300"), "linprobe")
    assert probe["metrics"]["top1"] > 80, probe["metrics"]  # measured 95.6 (random init: 88.2); chance: 10
    assert probe["config"]["feature_cache"] == dict(train="hit", val="hit")  # knn's features, reused
    p = probe["config"]["probe"]  # the hyper-parameters really used, not the encoder's batch
    assert (p["batch"], p["steps_per_epoch"], p["steps"], p["epochs"], p["optimizer"]) == (188, 8, 240, 30, "sgd")
    assert p["lr"] == pytest.approx(0.1 * 188 / 256) and p["batch_requested"] is None
    assert probe["config"]["encoder_batch"] == 256 and "batch_size" not in probe["config"]
    assert main(["report", str(prefix), "--report", str(tmp_path / "rep")]) == 0
    print(f"linear probe top1 (SGD, 30 epochs, default batch): {probe['metrics']['top1']:.1f}", file=sys.stderr)
    md = (tmp_path / "rep/report.md").read_text()
    assert "linprobe/top1" in md.splitlines()[2] and f"{probe['metrics']['top1']:.2f}" in md


def test_features_are_computed_once_and_cached(digits, tmp_path, capsys):
    data = tmp_path / "wds"
    shutil.copytree(pathlib.Path(digits["val"]).parents[1], data)
    export = random_export(str(tmp_path / "e"), step=0)
    # train on val's 297 samples too: small and fast; one cache file serves both roles
    args = ["knn", "--train", str(data / "val/manifest.json"), "--val", str(data / "val/manifest.json"), export,
            "--workers", "1", "--k", "20"]
    assert main(args) == 0
    first = result(export)
    cached = list((tmp_path / "e/eval/features").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-val-32px-fp32.safetensors")
    assert first["config"]["feature_cache"] == dict(train="miss", val="hit")  # computed once, read back for "val"

    for tar in data.glob("val/*.tar"):  # without the images only the cache can answer
        tar.unlink()
    assert main([*args, "--force"]) == 0
    second = result(export)
    assert second["metrics"] == first["metrics"] and second["time"] >= first["time"]
    capsys.readouterr()
    assert main([*args, "--force", "--no-cache"]) == 1  # really reads the (now missing) shards
    err = capsys.readouterr().err.splitlines()  # raised in a loader worker: its last line, not its traceback
    assert err[0] == f"crossmae-eval: {export}: StorageNotFoundError: {data}/val/val-000000.tar: " \
                     "no such file (No such file or directory)", err
    assert len(err) == 2 and "Traceback" not in err[0]


def test_linprobe_augment_runs_the_encoder_on_augmented_crops_per_epoch(digits, tmp_path):
    export = random_export(str(tmp_path / "e"), step=0)
    args = ["linprobe", "--train", digits["val"], "--val", digits["val"], export, "--workers", "1", "--epochs", "2",
            "--probe-batch", "128", "--warmup-epochs", "0", "--optimizer", "sgd", "--lr", "0.1", "--force"]
    assert main(args) == 0
    cached = result(export, "linprobe")
    assert main([*args, "--augment"]) == 0
    augmented = result(export, "linprobe")
    assert cached["config"]["probe"]["steps"] == 2 * 3  # ceil(297 / 128) batches of cached features per epoch
    assert augmented["config"]["probe"]["steps"] == 2 * 2  # the train loader drops the last
    assert augmented["config"]["probe"]["augment"] and augmented["config"]["probe"]["batch"] == 128
    assert augmented["metrics"]["final_loss"] != cached["metrics"]["final_loss"]


def test_sweep_skips_existing_results_and_fans_out_by_index(digits, tmp_path, monkeypatch, capsys):
    prefix = tmp_path / "runs"
    a, b, c = (random_export(str(prefix / name), step=s, seed=s) for name, s in (("a", 20), ("b", 0), ("c", 10)))
    args = ["knn", "--train", digits["val"], "--val", digits["val"], str(prefix), "--workers", "1", "--k", "20",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--index", "1"]) == 0  # sorted by step: b, c, a
    assert [storage.exists(storage.join(u, "eval/knn.json")) for u in (a, b, c)] == [False, False, True]
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert main([*args, "--index", "auto"]) == 0
    assert main([*args, "--index", "7"]) == 0  # an array larger than the prefix: nothing to do
    assert not (prefix / "report.md").exists()  # array tasks leave the report to `crossmae-eval report`
    before = {u: result(u) for u in (a, b, c) if storage.exists(storage.join(u, "eval/knn.json"))}
    assert sorted(before) == [a, c]
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 evaluated (0 stale results redone), 2 skipped" in err and "index 7 >= 3" not in err
    assert all(result(u) == r for u, r in before.items())  # untouched
    assert len(list(csv.DictReader((prefix / "report.csv").open()))) == 3
    assert main([*args, "--force"]) == 0 and "3 evaluated (0 stale results redone), 0 skipped" in capsys.readouterr().err

    (prefix / "c/model.safetensors").write_bytes(b"not safetensors")  # broken exports: counted, the sweep goes on
    (prefix / "d").mkdir()
    (prefix / "d/export.json").write_text("{truncated")
    assert main([*args, "--force"]) == 2  # a damaged export is bad input
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"crossmae-eval: {c}: model.safetensors does not match its export.json")
               for line in err), err
    assert any(line.startswith(f"crossmae-eval: {prefix / 'd'}: unreadable export: ValueError: "
                               f"{prefix / 'd'}/export.json: not valid JSON") for line in err), err
    assert "2 evaluated (0 stale results redone), 0 skipped (same data and protocol; --force redoes), 2 failed" in err[-1]
    assert "Traceback" not in "".join(err)


def test_exports_results_and_features_round_trip_through_s3(digits, tmp_path, s3_bucket, capsys):
    store = f"s3://{s3_bucket}/data"
    assert prep(["folder", str(digits["root"] / "images/val"), store, "--split", "val", "--shard-samples", "128"]) == 0
    manifest = f"{store}/val/manifest.json"
    prefix = f"s3://{s3_bucket}/exports"
    export = random_export(f"{prefix}/e0", step=0)
    args = ["knn", "--train", manifest, "--val", manifest, prefix, "--workers", "1", "--k", "20"]
    assert main(args) == 0
    res = result(export)
    assert res["export"] == export and res["dataset"]["val"]["manifest"] == manifest and res["metrics"]["top1"] > 30
    keys = [u.removeprefix(prefix + "/") for u, _ in storage.list_objects(prefix + "/")]
    assert {"report.md", "report.csv", "report.png", "e0/eval/knn.json"} <= set(keys)
    assert any(k.startswith("e0/eval/features/") and k.endswith("-val-32px-fp32.safetensors") for k in keys)
    with Image.open(io.BytesIO(storage.read_bytes(f"{prefix}/report.png"))) as png:
        assert png.format == "PNG"
    capsys.readouterr()
    assert main(args) == 0 and "0 evaluated (0 stale results redone), 1 skipped" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0 and result(export)["config"]["feature_cache"] == dict(train="hit", val="hit")
    local = tmp_path / "local"  # a local copy of the S3 results gives the same report rows
    assert main(["report", prefix, "--report", str(local)]) == 0
    assert "| e0 | 0 |" in (local / "report.md").read_text()


def test_bad_input_is_one_line_and_exit_2(digits, tmp_path, capsys, monkeypatch):
    export = random_export(str(tmp_path / "e"), step=0)
    cases = [
        [],
        ["knn", export],  # --train/--val missing
        ["knn", "--train", digits["train"], "--val", digits["val"], export, "--k", "ten"],
        ["knn", "--train", digits["train"], "--val", digits["val"], export, "--k", "0", "20"],
        ["knn", "--train", str(tmp_path / "nope.json"), "--val", digits["val"], export],
        ["knn", "--train", digits["train"], "--val", digits["val"], str(tmp_path / "empty")],
        ["knn", "--train", digits["train"], "--val", digits["val"], export, "--index", "-1"],
        ["report", str(tmp_path / "e")],  # an export without results
        ["finetune", "--help"],  # pipelines/eval/finetune.py absent (simulated below)
    ]
    import pipelines.eval

    monkeypatch.setitem(sys.modules, "pipelines.eval.finetune", None)  # import of it fails like a missing file
    monkeypatch.delattr(pipelines.eval, "finetune", raising=False)
    (tmp_path / "empty").mkdir()
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("crossmae-eval"), (argv, err)
    assert not (tmp_path / "e/eval").exists()
