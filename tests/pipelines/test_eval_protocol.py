"""crossmae-eval trusts nothing it is given: the linear probe's defaults fit a small set and its
real hyper-parameters are recorded; train/val with different class maps are refused; a cached
result is reused only for the same weights, manifests and protocol; a k beyond the training set
is capped and the headline stays k = 20; the report says what it plots."""
import json
import pathlib
import shutil

import pytest
import torch

from pipelines.eval import linprobe
from pipelines.evaluate import main
from tests.pipelines.test_evaluate import digits, random_export, result  # noqa: F401 - the digits fixture


def subset_manifest(src: str, dst: pathlib.Path, **changes) -> str:
    """A manifest of the same shards (linked beside it) with ``changes``: another file, another sha256."""
    m = json.loads(pathlib.Path(src).read_text())
    dst.parent.mkdir(parents=True, exist_ok=True)
    for shard in m["shards"]:
        (dst.parent / shard["name"]).symlink_to(pathlib.Path(src).parent / shard["name"])
    m.update(changes)
    dst.write_text(json.dumps(m))
    return str(dst)


def first_shard(src: str, dst: pathlib.Path) -> str:
    m = json.loads(pathlib.Path(src).read_text())
    return subset_manifest(src, dst, shards=m["shards"][:1], num_shards=1, num_samples=m["shards"][0]["num_samples"])


def test_probe_uses_the_exact_train_set_statistics_so_feature_scale_does_not_matter():
    # class-token features of a trained ViT have mean/std about 13 per dimension: with one step per
    # epoch BatchNorm's running statistics were far from them (78.1% vs 82.5% for the same features)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g)
    y, yv = torch.randint(0, 10, (1500,), generator=g), torch.randint(0, 10, (300,), generator=g)
    x, xv = centres[y] + 1.5 * torch.randn(1500, 32, generator=g), centres[yv] + 1.5 * torch.randn(300, 32, generator=g)
    shift = 13 * torch.randn(32, generator=g)
    cfg = linprobe.ProbeConfig(epochs=5, optimizer="sgd", batch_size=16384)  # one step per epoch
    plain, _ = linprobe.probe(x, y, xv, yv, 10, cfg)
    scaled, hp = linprobe.probe(13 * x + shift, y, 13 * xv + shift, yv, 10, cfg)
    assert plain["top1"] == pytest.approx(scaled["top1"], abs=0.5), (plain, scaled)
    assert (hp["batch"], hp["steps_per_epoch"], hp["steps"], hp["optimizer"]) == (1500, 1, 5, "sgd")


def test_probe_batch_default_gives_enough_steps_and_mae_where_the_set_is_large():
    small, large = linprobe.ProbeConfig(), linprobe.ProbeConfig()
    assert small.resolve(1500)[:2] == (188, "sgd") and "188, not MAE's 16384" in small.resolve(1500)[2]
    assert large.resolve(1_281_167) == (16384, "lars", None)  # ImageNet-1k: MAE's recipe as it is
    explicit = linprobe.ProbeConfig(batch_size=1024, optimizer="lars")
    batch, opt, warn = explicit.resolve(1500)
    assert (batch, opt) == (1024, "lars") and "2 step(s) per epoch" in warn


def test_train_and_val_with_different_class_maps_are_refused(digits, tmp_path, capsys):
    export = random_export(str(tmp_path / "e"), step=0)
    classes = json.loads(pathlib.Path(digits["val"]).read_text())["classes"][::-1]
    other = subset_manifest(digits["val"], tmp_path / "other/val/manifest.json", classes=classes,
                            class_map={c: i for i, c in enumerate(classes)})
    for job in ("knn", "linprobe"):
        assert main([job, "--train", digits["val"], "--val", other, export, "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "different class maps" in err[0], err
    assert not (tmp_path / "e/eval").exists()


def test_a_cached_result_is_reused_only_for_the_same_manifests_and_protocol(digits, tmp_path, capsys):
    export = random_export(str(tmp_path / "e"), step=0)
    wrong_val = first_shard(digits["val"], tmp_path / "part/val/manifest.json")
    base = ["knn", "--train", digits["val"], export, "--workers", "1", "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--val", wrong_val]) == 0
    assert result(export)["dataset"]["val"]["num_samples"] == 256
    capsys.readouterr()
    assert main([*base, "--val", digits["val"]]) == 0  # the right --val: recomputed, not "result exists"
    err = capsys.readouterr().err
    assert f"eval/knn.json does not match (another --val manifest ({wrong_val})): recomputing" in err, err
    assert "1 evaluated (1 stale results redone), 0 skipped" in err
    assert result(export)["dataset"]["val"]["num_samples"] == 297
    assert main([*base, "--val", digits["val"], "--k", "100", "20", "10"]) == 0  # same protocol, other order
    assert "0 evaluated (0 stale results redone), 1 skipped" in capsys.readouterr().err
    assert main([*base, "--val", digits["val"], "--temperature", "0.1"]) == 0
    assert "another protocol (temperature 0.07 -> 0.1)" in capsys.readouterr().err
    assert result(export)["protocol"]["temperature"] == 0.1


def test_k_beyond_the_training_set_is_capped_and_the_headline_stays_k20(digits, tmp_path, capsys):
    prefix = tmp_path / "exports"
    export = random_export(str(prefix / "e"), step=0)
    train = first_shard(digits["val"], tmp_path / "part/val/manifest.json")  # 256 samples
    assert main(["knn", "--train", train, "--val", digits["val"], str(prefix), "--workers", "1", "--k", "5000"]) == 0
    err = capsys.readouterr().err
    assert "k 5000 > the 256 training samples: k=256 (all vote) is reported instead; the headline stays k=20" in err
    m = result(export)["metrics"]
    assert m["top1"] == m["avg_k20_top1"] and "avg_k256_top1" in m and not any("5000" in k for k in m)
    assert result(export)["config"]["k"] == [20, 256]
    header = (prefix / "report.md").read_text().splitlines()[2]
    assert header == "| export | step | knn/avg_k20_top1 | knn/avg_k20_top5 | knn/cls_k20_top1 |", header


def test_report_names_run_protocol_and_dataset(digits, tmp_path, capsys):
    prefix = tmp_path / "r1"
    for step in (0, 100):
        random_export(str(prefix / f"step{step}"), step=step, seed=step)
    val = digits["val"]
    assert main(["knn", "--train", val, "--val", val, str(prefix), "--workers", "1", "--k", "20"]) == 0
    assert main(["linprobe", "--train", val, "--val", val, str(prefix), "--workers", "1", "--epochs", "3"]) == 0
    md = (prefix / "report.md").read_text()
    assert md.startswith("# r1: k-NN, linear probe on wds/val (297 images, 10 classes)\n"), md
    assert "- `knn/avg_k20_top1`: k-NN top-1, k=20, avg-pool (%)" in md
    assert "- `knn/cls_k20_top1`: k-NN top-1, k=20, class token (%)" in md
    assert "- `linprobe/top1`: linear probe top-1, class token, 3 epochs, SGD (%)" in md
    assert "warning" not in md
    shutil.copy(prefix / "report.png", tmp_path / "report.png")

    capsys.readouterr()  # one export re-done under another protocol (an array task): said, not hidden
    assert main(["knn", "--train", val, "--val", val, str(prefix), "--workers", "1", "--k", "20",
                 "--temperature", "0.2", "--index", "0"]) == 0
    assert main(["report", str(prefix)]) == 0
    assert "warning: knn: 2 protocols or val sets" in capsys.readouterr().err
    assert "- warning: knn: 2 protocols or val sets" in (prefix / "report.md").read_text()
