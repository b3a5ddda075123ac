"""End-to-end sharding through the CLI: real JPEG files, real tars, local disk and a real S3 server."""
import hashlib
import io
import json
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from data_prep.cli import main
from tests.data_prep.fixtures import make_bad_images, make_image_folder, make_imagenet_archives, make_imagenet_tree
from pipelines import storage

ROOT = pathlib.Path(__file__).resolve().parents[2]


def make_folder(root: pathlib.Path, classes=("cat", "dog", "eel", "fox"), per_class=12, seed=0, bad=False):
    """root/<class>/*.jpg: real JPEGs of varied sizes; with ``bad``, broken and odd files in dog/."""
    make_image_folder(root, classes, per_class, seed)
    if bad:
        make_bad_images(root / classes[1], seed)
    return root


def read_shards(split_dir):
    """{key: (label, jpeg bytes)} and per-shard key lists, read back with tarfile."""
    samples, per_shard = {}, []
    for tar_path in sorted(pathlib.Path(split_dir).glob("*.tar")):
        keys = []
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            for m in members:
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                entry = samples.setdefault(key, {})
                entry[ext] = data
                if ext == "jpg":
                    keys.append(key)
        per_shard.append(keys)
    return {k: (int(v["cls"]), v["jpg"]) for k, v in samples.items()}, per_shard


def shard_hashes(split_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(split_dir).glob("*.tar"))}


def run_cli(*args):
    return main([str(a) for a in args])


def test_folder_to_webdataset_counts_labels_and_manifest(tmp_path):
    src = make_folder(tmp_path / "src")
    assert run_cli("folder", src, tmp_path / "out", "--shard-samples", 10, "--seed", 1) == 0
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    samples, per_shard = read_shards(tmp_path / "out/train")
    assert manifest["format"] == "webdataset" and manifest["num_samples"] == 48 == len(samples)
    assert manifest["classes"] == ["cat", "dog", "eel", "fox"] and manifest["class_map"]["eel"] == 2
    assert [s["name"] for s in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [len(k) for k in per_shard] == [s["num_samples"] for s in manifest["shards"]] == [10, 10, 10, 10, 8]
    for s, h in zip(manifest["shards"], shard_hashes(tmp_path / "out/train").values()):
        assert s["sha256"] == h and s["bytes"] == (tmp_path / "out/train" / s["name"]).stat().st_size
    for key, (label, data) in samples.items():
        cls = key.split("_")[0]
        assert label == manifest["class_map"][cls]
        assert data == (src / cls / f"{key}.jpg").read_bytes()  # original bytes, no re-encode
    # shuffle: a class-grouped source is mixed across shards
    for keys in per_shard:
        assert len({k.split("_")[0] for k in keys}) >= 3


def test_shards_read_back_with_the_webdataset_library(tmp_path):
    import webdataset as wds

    src = make_folder(tmp_path / "src")
    run_cli("folder", src, tmp_path / "out", "--shard-samples", 10)
    urls = sorted(str(p) for p in (tmp_path / "out/train").glob("*.tar"))
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "cls"):
        key, img, label = sample
        seen[key] = label
        assert img.mode == "RGB"
    assert len(seen) == 48 and {k.split("_")[0]: v for k, v in seen.items()} == {"cat": 0, "dog": 1, "eel": 2, "fox": 3}


def test_bad_images_are_converted_or_rejected_and_reported(tmp_path, capsys):
    src = make_folder(tmp_path / "src", bad=True)
    assert run_cli("folder", src, tmp_path / "out", "--shard-samples", 16) == 0
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    rejected = {r["key"]: r["reason"] for r in manifest["rejects"]}
    converted = {c["key"]: c["reason"] for c in manifest["converted"]}
    assert set(rejected) == {"truncated", "empty", "random"}
    assert "truncated" in rejected["truncated"] and "empty" in rejected["empty"]
    assert set(converted) == {"png_named", "gray", "cmyk"}
    assert "CMYK" in converted["cmyk"] and "PNG" in converted["png_named"]
    assert manifest["num_samples"] == 48 + 3
    samples, _ = read_shards(tmp_path / "out/train")
    for key in converted:
        img = Image.open(io.BytesIO(samples[key][1]))
        assert img.format == "JPEG" and img.mode == "RGB"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["splits"][0]["rejected"] == 3 and summary["splits"][0]["converted"] == 3


def test_imagenet_archives_and_extracted_tree_give_identical_shards(tmp_path):
    make_imagenet_tree(tmp_path / "tree", per_class=6, val_per_class=3, labels="devkit")
    make_imagenet_archives(tmp_path / "arch", per_class=6, val_per_class=3, labels="devkit-tar")
    for form in ("tree", "arch"):
        assert run_cli("imagenet", tmp_path / form, tmp_path / f"out-{form}", "--shard-samples", 5) == 0
    for split in ("train", "val"):
        assert shard_hashes(tmp_path / f"out-tree/{split}") == shard_hashes(tmp_path / f"out-arch/{split}")
    manifest = json.loads((tmp_path / "out-arch/val/manifest.json").read_text())
    samples, _ = read_shards(tmp_path / "out-arch/train")
    train_manifest = json.loads((tmp_path / "out-arch/train/manifest.json").read_text())
    assert manifest["classes"] == train_manifest["classes"] == sorted(train_manifest["classes"])
    for key, (label, _) in samples.items():  # train keys are <wnid>_<n>: label = sorted wnid position
        assert train_manifest["classes"][label] == key.split("_")[0]
    assert manifest["num_samples"] == 3 * len(manifest["classes"])


def test_two_workers_plus_finalize_equal_one_worker(tmp_path):
    src = make_folder(tmp_path / "src")
    assert run_cli("folder", src, tmp_path / "one", "--shard-samples", 7) == 0
    for w in (0, 1):
        assert run_cli("folder", src, tmp_path / "two", "--shard-samples", 7, "--num-workers", 2,
                       "--worker-index", w) == 0
        if w == 0:
            assert not (tmp_path / "two/train/manifest.json").exists()
            assert run_cli("finalize", tmp_path / "two", "--splits", "train") == 1  # worker 1 missing
    assert run_cli("finalize", tmp_path / "two", "--splits", "train") == 0
    assert shard_hashes(tmp_path / "one/train") == shard_hashes(tmp_path / "two/train")
    a, b = (json.loads((tmp_path / d / "train/manifest.json").read_text()) for d in ("one", "two"))
    a.pop("created"), b.pop("created")
    assert a == b


def test_resume_after_kill_yields_identical_bytes(tmp_path):
    src = make_folder(tmp_path / "src", per_class=60)
    assert run_cli("folder", src, tmp_path / "ref", "--shard-samples", 8) == 0
    ref = shard_hashes(tmp_path / "ref/train")
    parts = tmp_path / "out/train/_parts"
    cmd = [sys.executable, "-m", "data_prep.cli", "folder", str(src), str(tmp_path / "out"), "--shard-samples", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (parts.exists() and len(list(parts.glob("*.json"))) >= 3):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.json")))
    assert 3 <= done_before < len(ref), "the kill should land mid-run"
    assert not (tmp_path / "out/train/manifest.json").exists()
    (tmp_path / "out/train" / "train-000000.tar").write_bytes(b"damaged")  # a finished shard, damaged later
    assert run_cli("folder", src, tmp_path / "out", "--shard-samples", 8) == 0
    assert shard_hashes(tmp_path / "out/train") == ref
    assert not [p for p in (tmp_path / "out/train").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_verify_detects_a_flipped_byte_and_a_missing_shard(tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    run_cli("folder", src, tmp_path / "out", "--shard-samples", 10)
    assert run_cli("verify", tmp_path / "out", "--splits", "train") == 0
    shard = tmp_path / "out/train/train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    (tmp_path / "out/train/train-000004.tar").unlink()
    capsys.readouterr()
    assert run_cli("verify", tmp_path / "out", "--splits", "train") == 1
    err = capsys.readouterr().err
    assert "1 missing, 1 corrupt" in err and "train-000002.tar" in err and "train-000004.tar" in err


def test_s3_round_trip_through_seaweedfs(tmp_path, s3_bucket):
    src = make_folder(tmp_path / "src")
    dst = f"s3://{s3_bucket}/datasets/pets"
    assert run_cli("folder", src, dst, "--shard-samples", 10, "--processes", 2) == 0
    assert run_cli("folder", src, tmp_path / "local", "--shard-samples", 10) == 0
    manifest = json.loads(storage.read_bytes(dst + "/train/manifest.json"))
    assert manifest["num_samples"] == 48
    for s in manifest["shards"]:
        assert storage.read_bytes(f"{dst}/train/{s['name']}") == (tmp_path / "local/train" / s["name"]).read_bytes()
    assert run_cli("verify", dst, "--splits", "train") == 0
    # a second run finds everything done and rewrites nothing
    assert run_cli("folder", src, dst, "--shard-samples", 10) == 0


@pytest.mark.parametrize("args,message", [
    (["folder", "/nonexistent/src", "OUT"], "/nonexistent/src"),
    (["verify", "OUT_EMPTY", "--splits", "train"], "no manifest.json"),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    args = [a.replace("OUT_EMPTY", str(tmp_path / "empty")).replace("OUT", str(tmp_path / "o")) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossmae-prep: error:") and message in err[0]


@pytest.mark.parametrize("args", [["folder", "SRC", "OUT", "--format", "tiff"], ["resize"],
                                  ["folder", "SRC", "OUT", "--shard-bytes", "lots"]])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, args):
    with pytest.raises(SystemExit) as e:
        main([a.replace("SRC", str(tmp_path)).replace("OUT", str(tmp_path / "o")) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossmae-prep")


def test_unwritable_destination_and_bad_credentials(tmp_path, capsys, s3_env, monkeypatch):
    src = make_folder(tmp_path / "src", per_class=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["folder", str(src), str(blocker / "sub")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    assert main(["folder", str(src), "s3://whatever/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crossmae-prep: error:" in err and "wrong-secret-value" not in err


def test_rejects_and_conversions_carry_the_source_path_for_every_reason(tmp_path):
    src = make_folder(tmp_path / "src", bad=True)
    assert run_cli("folder", src, tmp_path / "out", "--shard-samples", 16) == 0
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    for entry in manifest["rejects"] + manifest["converted"]:
        assert pathlib.Path(entry["path"]).is_file() and pathlib.Path(entry["path"]).stem == entry["key"], entry
    assert len(manifest["rejects"]) == 3 and len(manifest["converted"]) == 3


def test_max_size_re_encodes_are_counted_in_manifest_and_summary(tmp_path, capsys):
    src = make_folder(tmp_path / "src", per_class=4)  # 40..120 px images
    large = sum(max(Image.open(p).size) > 80 for p in src.glob("*/*.jpg"))
    assert 0 < large < 16
    assert run_cli("folder", src, tmp_path / "out", "--shard-samples", 5, "--max-size", 80, "--quality", 70) == 0
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])["splits"][0]
    assert manifest["num_resized"] == summary["resized"] == large and f"{large} resized" in captured.err
    samples, _ = read_shards(tmp_path / "out/train")
    assert max(max(Image.open(io.BytesIO(data)).size) for _, data in samples.values()) == 80


def test_worker_summaries_add_up_to_the_manifest_counts(tmp_path, capsys):
    """Listing-time rejects (the empty file) are counted by worker 0 only, never once per worker."""
    src = make_folder(tmp_path / "src", bad=True)
    summaries = []
    for w in (0, 1, 2):
        assert run_cli("folder", src, tmp_path / "out", "--shard-samples", 8, "--num-workers", 3,
                       "--worker-index", w) == 0
        summaries.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["splits"][0])
    assert run_cli("finalize", tmp_path / "out", "--splits", "train") == 0
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert manifest["num_rejected"] == 3 == sum(s["rejected"] for s in summaries)
    assert manifest["num_converted"] == 3 == sum(s["converted"] for s in summaries)
    assert manifest["num_samples"] == sum(s["written_samples"] for s in summaries)


def test_ignored_files_are_counted_and_said_on_stderr(tmp_path, capsys):
    src = make_folder(tmp_path / "src", per_class=2)
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "dog" / ".DS_Store").write_bytes(b"\0")
    (src / ".cache").mkdir()  # a hidden folder at the top: not a class, not silently dropped either
    (src / ".cache" / "x.jpg").write_bytes(b"\0")
    assert run_cli("folder", src, tmp_path / "out") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])["splits"][0]
    assert summary["ignored"] == 3 and "3 ignored" in captured.err and "notes.txt" in captured.err
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert manifest["source"]["ignored_files"] == 3
