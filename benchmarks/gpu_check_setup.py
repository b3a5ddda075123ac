"""The setup halves of benchmarks/gpu_check.py: the wheelhouse (built here, with network), the
install of what a GPU node lacks (there, without network), and the small real image set.

    python benchmarks/gpu_check.py wheelhouse wheelhouse/         # `make wheelhouse`
    python3 benchmarks/gpu_check.py install WHEELHOUSE SITE --report R.json
    python3 benchmarks/gpu_check.py images IMAGES_DIR WDS_DIR N [--small] [--processes P] --report R.json

The GPU node seen so far (../shared/gpu/README.md) has Python 3.12 and its own CUDA torch; it
lacks the packages in NODE_NEEDS. Installs go to SITE with --no-index --no-deps --target (put on
PYTHONPATH by gpu_check), so the node's torch and everything else it has stay untouched.
"""
from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# distribution -> import name. pydantic-core must equal the version pydantic was released with.
NODE_NEEDS = {"deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic", "pydantic-core": "pydantic_core",
              "annotated-types": "annotated_types", "typing-inspection": "typing_inspection",
              "typing-extensions": "typing_extensions", "webdataset": "webdataset", "braceexpand": "braceexpand",
              "simplejpeg": "simplejpeg", "timm": "timm"}
NEVER_REPLACE = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "requirements", "pins.txt")) as f:
        for line in f:
            name, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                pins[_norm(name)] = version.strip()
    return pins


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_wheelhouse(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check wheelhouse", description="wheels a GPU node lacks (needs network)")
    ap.add_argument("dest")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--platform", default="manylinux2014_x86_64")
    args = ap.parse_args(argv)
    pins = _pins()
    # the pinned version, else the one this environment was tested with (the venv from pins.txt)
    versions = {n: pins.get(n) or _installed(n) for n in NODE_NEEDS}
    if None in versions.values():
        print(f"gpu_check wheelhouse: error: not installed here: {[n for n, v in versions.items() if not v]} "
              "(run `make setup` first)", file=sys.stderr)
        return 2
    t0, tmp = time.time(), args.dest.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    pip = [sys.executable, "-m", "pip"]
    # deepspeed ships only an sdist; its wheel is pure Python (no ops are compiled at install)
    cmds = [pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp,
                   f"deepspeed=={versions['deepspeed']}"],
            pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
                   "--implementation", "cp", "--platform", args.platform, "-d", tmp]
            + [f"{n}=={v}" for n, v in versions.items() if n != "deepspeed"]]
    for cmd in cmds:
        if subprocess.run(cmd).returncode:
            print(f"gpu_check wheelhouse: error: failed: {' '.join(cmd[2:6])} ...", file=sys.stderr)
            return 1
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(tmp, "*.whl")))
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
    with open(os.path.join(tmp, "wheelhouse.json"), "w") as f:
        json.dump(dict(python=args.python_version, platform=args.platform, versions=versions, files=files, bytes=size,
                       made=time.strftime("%Y-%m-%dT%H:%M:%S%z")), f, indent=1)
    shutil.rmtree(args.dest, ignore_errors=True)
    os.rename(tmp, args.dest)
    print(f"gpu_check wheelhouse: {len(files)} wheels, {size / 2**20:.1f} MiB in {args.dest} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


def _wheels(wheelhouse: str) -> dict[str, str]:
    """distribution -> version of every wheel in the folder (PEP 427 file names)."""
    out = {}
    for path in glob.glob(os.path.join(wheelhouse, "*.whl")):
        name, version = os.path.basename(path).split("-")[:2]
        out[_norm(name)] = version
    return out


def install(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check install", description="install what this Python lacks, offline")
    ap.add_argument("wheelhouse")
    ap.add_argument("site", help="target folder (gpu_check puts it first on PYTHONPATH)")
    ap.add_argument("--report", required=True)
    args = ap.parse_args(argv)
    shutil.rmtree(args.site, ignore_errors=True)
    os.makedirs(args.site)
    wheels = _wheels(args.wheelhouse) if os.path.isdir(args.wheelhouse) else {}
    exact = set(_pins()) | {"pydantic-core"}  # pinned: a different version on the node is replaced (in SITE)
    report = dict(wheelhouse=args.wheelhouse, wheels=len(wheels), installed=[], kept={}, missing=[], refused=[])
    todo = []
    for name in sorted(set(NODE_NEEDS) | set(wheels)):
        have, offer = _installed(name), wheels.get(name)
        if NEVER_REPLACE.match(name):
            report["refused"].append(name)
        elif have is not None and (offer is None or have == offer or name not in exact):
            report["kept"][name] = have
        elif offer is None:
            report["missing"].append(name if have is None else f"{name} (have {have}, pinned {_pins().get(name)})")
        else:
            todo.append(f"{name}=={offer}")
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", args.wheelhouse, "--no-deps",
               "--no-compile", "--disable-pip-version-check", "--target", args.site, *todo]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            print(f"gpu_check install: error: pip failed for {' '.join(todo)}", file=sys.stderr)
            return 1
        report["installed"] = todo
    # a fresh interpreter with SITE first: everything imports, and torch is still the node's own
    probe = ("import importlib, json, torch; mods = %r\nfor m in mods: importlib.import_module(m)\n"
             "print(json.dumps(dict(torch=torch.__version__, torch_file=torch.__file__)))"
             % sorted(NODE_NEEDS.values()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [args.site, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    with open(args.report, "w") as f:
        json.dump(dict(report, **(json.loads(proc.stdout) if proc.returncode == 0 else {})), f, indent=1)
    if report["refused"]:
        print(f"gpu_check install: not replaced (the node's own): {', '.join(report['refused'])}", file=sys.stderr)
    if report["missing"]:
        print(f"gpu_check install: error: missing and not in {args.wheelhouse}: {', '.join(report['missing'])}; "
              "build the wheels with `make wheelhouse` on a machine with network and copy them here", file=sys.stderr)
        return 1
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"gpu_check install: error: import check failed after the install: {last}", file=sys.stderr)
        return 1
    print(f"gpu_check install: {len(todo)} installed into {args.site}, {len(report['kept'])} already here",
          file=sys.stderr)
    return 0


SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (333, 500), (400, 300), (500, 500), (640, 480)]


def _photos():
    """Real photos that ship inside scikit-learn (china, flower) or scikit-image."""
    out = []
    try:
        from sklearn.datasets import load_sample_images
        out += list(load_sample_images().images)
    except ImportError:
        pass
    try:
        from skimage import data
        out += [im for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()) if im.ndim == 3]
    except (ImportError, OSError, ValueError):  # skimage may try to download its optional images
        pass
    return out


def _one_image(job) -> int:
    """A random crop of a photo at an ImageNet-like size, light colour change and sensor grain,
    quality 85-95: ~60-100 KiB at full size, like ImageNet's ~110 KiB."""
    import io

    import numpy as np
    from PIL import Image

    i, folder, classes, scale = job
    rng = np.random.default_rng(i)
    src = PHOTOS[i % len(PHOTOS)]
    h, w = src.shape[:2]
    s = rng.uniform(0.35, 1.0)
    ch, cw = max(32, int(h * s)), min(w, max(32, int(w * s * rng.uniform(0.8, 1.25))))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    tw, th = SIZES[rng.integers(len(SIZES))]
    crop = Image.fromarray(src[y:y + ch, x:x + cw]).resize((tw // scale, th // scale), Image.BICUBIC)
    a = np.asarray(crop, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3)
    a += rng.normal(0, 7.0, a.shape)
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    with open(os.path.join(folder, f"n{i % classes:08d}", f"img_{i:07d}.JPEG"), "wb") as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


PHOTOS: list = []


def _load_photos():
    PHOTOS[:] = _photos()


def make_images(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check images", description="a small real image set, sharded")
    ap.add_argument("images")
    ap.add_argument("wds")
    ap.add_argument("n", type=int)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="1/4 of ImageNet's sizes (CPU smoke runs)")
    ap.add_argument("--processes", type=int, default=os.cpu_count())
    ap.add_argument("--report", required=True)
    ap.add_argument("--restarts-wds", default=None,
                    help="also shard the same images here with --jpeg-restarts (the loader_rate_restarts stage)")
    args = ap.parse_args(argv)
    from multiprocessing import Pool

    _load_photos()
    if not PHOTOS:
        print("gpu_check images: error: no photos found (needs scikit-learn or scikit-image)", file=sys.stderr)
        return 1
    shutil.rmtree(args.images, ignore_errors=True)
    shutil.rmtree(args.wds, ignore_errors=True)
    for c in range(args.classes):
        os.makedirs(os.path.join(args.images, f"n{c:08d}"))
    jobs = [(i, args.images, args.classes, 4 if args.small else 1) for i in range(args.n)]
    with Pool(args.processes, initializer=_load_photos) as pool:
        sizes = pool.map(_one_image, jobs, chunksize=64)
    sys.path.insert(0, ROOT)
    from data_prep.cli import main as prep

    common = ["--split", "train", "--processes", str(args.processes), "--shard-samples", "64" if args.small else "512"]
    rc = prep(["folder", args.images, args.wds, *common])
    extra = {}
    if args.restarts_wds and rc == 0:
        shutil.rmtree(args.restarts_wds, ignore_errors=True)
        t0 = time.perf_counter()
        rc = prep(["folder", args.images, args.restarts_wds, *common, "--jpeg-restarts"])
        extra = dict(manifest_restarts=os.path.join(args.restarts_wds, "train", "manifest.json"),
                     prep_restarts_s=round(time.perf_counter() - t0, 2), prep_restarts_rc=rc)
    with open(args.report, "w") as f:
        json.dump(dict(images=args.n, photos=len(PHOTOS), mean_kib=round(sum(sizes) / len(sizes) / 1024, 1),
                       manifest=os.path.join(args.wds, "train", "manifest.json"), prep_rc=rc, **extra), f, indent=1)
    return rc
