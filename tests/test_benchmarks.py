"""The GPU-side benchmarks cannot be measured here, but they must not rot: run them at their
smallest on the CPU and check what they report."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
           TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")))


def run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_gpu_throughput_smoke(tmp_path):
    run("benchmarks/gpu_throughput.py", "--smoke", "--json", str(tmp_path / "g.json"))
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["device"] == "cpu" and [r["model"] for r in result["runs"]] == ["CrossMAE", "MAE"]
    cross, mae = result["runs"]
    assert cross["images_per_s"] > 0 and cross["gflops_per_image"] < mae["gflops_per_image"]


def test_train_step_smoke(tmp_path):
    run("benchmarks/train_step.py", "--preset", "crossmae_vit_micro_patch4_dec64d2b", "--image-size", "32",
        "--batch", "8", "--rounds", "1", "--steps", "1", "--json", str(tmp_path / "t.json"))
    modes = json.loads((tmp_path / "t.json").read_text())["modes"]
    assert set(modes) == {"plain", "deepspeed_zero0", "deepspeed_zero2"} and modes["plain"]["vs_plain"] == 1.0
    assert all(m["images_per_s"] > 0 for m in modes.values())


def test_shuffle_quality_smoke(tmp_path):
    run("benchmarks/shuffle_quality.py", "--samples", "64000", "--classes", "100", "--shards", "64", "--ranks", "2",
        "--workers", "2", "--buffers", "1000", "--json", str(tmp_path / "s.json"))
    res = json.loads((tmp_path / "s.json").read_text())["results"]
    assert res["prep"]["this loader, block 512 (default)"]["worst"]["class_ratio"] < 1.3
    assert res["class-sorted"]["shard order (no shuffle)"]["worst"]["class_ratio"] > 10


def test_manifest_scale_smoke(tmp_path):
    run("benchmarks/manifest_scale.py", "--procs", "2", "--worlds", "8", "--json", str(tmp_path / "m.json"))
    assert json.loads((tmp_path / "m.json").read_text())["runs"]["world 8, local"]["manifest+plan"]["cpu"] > 0


def test_store_reads_smoke(tmp_path):
    run("benchmarks/store_reads.py", "--worlds", "4", "--workers", "2", "--samples", "20000", "--shards", "16",
        "--json", str(tmp_path / "s.json"))
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    plain, indexed = rows["4 ranks x 2 workers, no index"], rows["4 ranks x 2 workers, index every 64"]
    assert plain["gets_per_epoch"] == indexed["gets_per_epoch"] > 16
    assert 1.0 <= indexed["bytes_per_dataset_per_epoch"] < plain["bytes_per_dataset_per_epoch"]


def test_crop_decode_smoke(tmp_path):
    run("benchmarks/crop_decode.py", "--images", "8", "--rounds", "1", "--json", str(tmp_path / "c.json"))
    assert (tmp_path / "c.json").stat().st_size > 0


def test_first_batch_smoke(tmp_path):
    # random access (the row streaming's tests do not cover: tests/pipelines/test_first_batch.py and
    # test_store_traffic.py hold streaming's first batch and traffic); 3 runs instead of the default's 7.
    run("benchmarks/first_batch.py", "--repeats", "1", "--images", "64", "--access", "random",
        "--json", str(tmp_path / "f.json"))
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["access"] == ["random"]
    assert res["runs"]["random/cold"][0]["data"]["slowest"] > 0
    assert len(res["runs"]["random/resume"][0]["process"]["ranks"]) == 2
    assert list(res["traffic"]) == ["random, shard cache, one per node"]
    cached = res["traffic"]["random, shard cache, one per node"]
    assert cached["bytes_per_dataset"] <= 1.05 and cached["gets"] == res["shards"], res["traffic"]


def test_loader_benchmark_issue21_rows_smoke(tmp_path):
    """benchmarks/loader.py --only/--workers: the issue 21 rows (decode only, the loader, 1 and 2 workers)."""
    proc = run("benchmarks/loader.py", "--images", "128", "--rounds", "1", "--only", "f,b,b'", "--workers", "2",
               "--json", str(tmp_path / "l.json"))
    rates = json.loads((tmp_path / "l.json").read_text())["img_per_s"]
    assert set(rates) == {"(f) decode only (simplejpeg)", "(b) this loader, local shards",
                          "(b') this loader, local, resize on device", "(w1) (b) through 1 worker process",
                          "(w2) (b) through 2 worker processes"}
    assert all(v > 0 for v in rates.values())
    assert "(b) vs (f) decode only" in proc.stdout and "(w2) / (2 x (w1))" in proc.stdout


def test_loader_overhead_smoke():
    out = run("benchmarks/loader_overhead.py", "--images", "64", "--rounds", "1").stdout
    assert "(Lr) (L) on --jpeg-restarts shards" in out and "64 of 64 rewritten" in out, out[-1500:]
