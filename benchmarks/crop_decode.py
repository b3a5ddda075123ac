"""Full JPEG decode vs today's crop path vs the partial decode of the crop box, on ONE core, every
pipeline on the same JPEG bytes and the same seeded RandomResizedCrop(224, (0.2, 1)) boxes, side
by side in one run (each image through every pipeline in turn; the fastest of --rounds calls counts).

    OMP_NUM_THREADS=1 python benchmarks/crop_decode.py --images 1000 --rounds 5 [--json out.json]

(f) full decode only: simplejpeg at full resolution (the yardstick)
(t) today's crop path, decode only: header + box + decode_box (DCT-scaled full decode, slice)
(p) partial decode, decode only: header + box + pipelines.data.crop_decode.decode_crop
(T) today's mae_train: (t) + antialiased bicubic resize to 224 + flip into (3, 224, 224)
(P) (p) + the same resize and flip: what mae_train becomes with the partial decode
(c), (C) (p) and (P) on the same images rewritten by `crossmae-prep --jpeg-restarts` (lossless):
    decode_crop cuts a JPEG of the box's restart cells first, so only they are Huffman-decoded
Images: photo-like q90 JPEGs (smooth colour waves + sensor grain, sigma 12) at ImageNet's
typical sizes, 500x375 etc., ~73 KB. MAE: mean abs error (of 255) of (T) and (P) vs torchvision
F.resized_crop(bicubic, antialias) of the full-resolution decode on the same box.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.transforms import make_jpegs  # noqa: E402
from pipelines.data import crop_decode  # noqa: E402
from pipelines.data.transforms import _resize, _to_chw, decode_box, mae_train, sample_box_flip
from pipelines.data.jpeg import image_size  # noqa: E402

torch.set_num_threads(1)
SIZE = 224
SHAPES = [(500, 375), (375, 500), (500, 333), (500, 400)]  # (w, h): ImageNet's most common


def photo_jpegs(n: int, shapes=SHAPES) -> list[bytes]:
    """n JPEGs cycling through `shapes`; grain sigma 12 (as benchmarks/prep.py): ~73 KB at 500x375."""
    per = [make_jpegs(-(-n // len(shapes)), w=w, h=h, sigma=12, seed=i) for i, (w, h) in enumerate(shapes)]
    return [per[i % len(shapes)][i // len(shapes)] for i in range(n)]


def partial_train(data: bytes, rng, out: torch.Tensor) -> torch.Tensor:
    """mae_train's steps with decode_crop in place of decode_box (same draws, same resize)."""
    H, W = image_size(data)
    box, flip = sample_box_flip(H, W, rng)
    region = crop_decode.decode_crop(data, box, SIZE, (H, W))
    return _to_chw(_resize(region.pixels, SIZE, SIZE), out, flip)


def pipelines(jpegs: list[bytes], rewritten: list[bytes]) -> dict:
    """name -> f(i, data): one image through that pipeline, boxes seeded by the image index
    ((c), (C): on rewritten[i], the same image with restart markers)."""
    out = torch.empty(3, SIZE, SIZE, dtype=torch.uint8)

    def today(i, d):
        H, W = image_size(d)
        decode_box(d, H, W, sample_box_flip(H, W, np.random.default_rng(i))[0], SIZE)

    def partial(i, d):
        H, W = image_size(d)
        crop_decode.decode_crop(d, sample_box_flip(H, W, np.random.default_rng(i))[0], SIZE, (H, W))

    return {"(f) full decode only (simplejpeg)": lambda i, d: simplejpeg.decode_jpeg(d, "RGB"),
            "(t) today's crop path, decode only": today, "(p) partial decode, decode only": partial,
            "(T) today's mae_train (decode + resize)": lambda i, d: mae_train(d, np.random.default_rng(i), out=out),
            "(P) partial decode + resize": lambda i, d: partial_train(d, np.random.default_rng(i), out),
            "(c) --jpeg-restarts, cut + partial decode, decode only": lambda i, d: partial(i, rewritten[i]),
            "(C) --jpeg-restarts, (c) + resize": lambda i, d: partial_train(rewritten[i], np.random.default_rng(i), out)}


def interleaved_rates(runs: dict, jpegs: list[bytes], rounds: int) -> dict[str, float]:
    """Images/s of each pipeline: every image goes through every pipeline in turn (the order
    rotating each round), each call timed alone; per image and pipeline the fastest of `rounds`
    calls counts. Why not whole passes: on this machine, shared with other jobs, the same pass
    measured 446 and 1,040 img/s minutes apart; the per-call minimum repeats to a few %."""
    names = list(runs)
    best = {k: np.full(len(jpegs), np.inf) for k in names}
    clock = time.perf_counter_ns
    for r in range(rounds + 1):  # round 0 warms up (first-call allocations, imports)
        order = names[r % len(names):] + names[:r % len(names)]
        for i, d in enumerate(jpegs):
            for k in order:
                t0 = clock()
                runs[k](i, d)
                dt = clock() - t0
                if r and dt < best[k][i]:
                    best[k][i] = dt
        if r:
            print(f"round {r}: " + ", ".join(f"{k[:3]} {len(jpegs) / best[k].sum() * 1e9:.0f}" for k in names)
                  + " img/s so far", flush=True)
    return {k: len(jpegs) / v.sum() * 1e9 for k, v in best.items()}


def reference_mae(jpegs: list[bytes], rewritten: list[bytes], n: int) -> dict[str, float]:
    """Mean abs error (of 255) of (T), (P) and (C) vs torchvision's resized_crop on the full
    decode, same box and flip; and the share of images whose partial pixels equal today's
    exactly, and whose cut pixels equal the partial decode's."""
    import torchvision.transforms.functional as TF

    err = {"(T)": 0.0, "(P)": 0.0, "(C)": 0.0}
    same = same_cut = 0
    for i, d in enumerate(jpegs[:n]):
        H, W = image_size(d)
        box, flip = sample_box_flip(H, W, np.random.default_rng(i))
        full = torch.from_numpy(simplejpeg.decode_jpeg(d, "RGB")).permute(2, 0, 1)
        ref = TF.resized_crop(full, *box, [SIZE, SIZE], TF.InterpolationMode.BICUBIC, antialias=True)
        ref = (ref.flip(-1) if flip else ref).int()
        today = mae_train(d, np.random.default_rng(i)).int()
        partial = partial_train(d, np.random.default_rng(i), torch.empty(3, SIZE, SIZE, dtype=torch.uint8)).int()
        err["(T)"] += (today - ref).abs().float().mean().item() / n
        cut = partial_train(rewritten[i], np.random.default_rng(i), torch.empty(3, SIZE, SIZE, dtype=torch.uint8)).int()
        err["(P)"] += (partial - ref).abs().float().mean().item() / n
        err["(C)"] += (cut - ref).abs().float().mean().item() / n
        same += bool(torch.equal(today, partial))
        same_cut += bool(torch.equal(cut, partial))
    return dict(err, identical_fraction=same / n, cut_identical_fraction=same_cut / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="image sizes x this (e.g. 2: 1000x750 photos)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if crop_decode.EXTENSION_ERROR:
        print(f"crop_decode: error: the C extension is not built ({crop_decode.EXTENSION_ERROR}): "
              "run `pip install -e .` with libjpeg62-turbo-dev installed", file=sys.stderr)
        return 2
    shapes = [(round(w * args.scale), round(h * args.scale)) for w, h in SHAPES]
    jpegs = photo_jpegs(args.images, shapes)
    kb = np.mean([len(d) for d in jpegs]) / 1000
    print(f"{len(jpegs)} JPEGs {', '.join(f'{w}x{h}' for w, h in shapes)} q90, mean {kb:.1f} KB, one core")
    rewritten = [crop_decode.add_restarts(d) for d in jpegs]
    rate = interleaved_rates(pipelines(jpegs, rewritten), jpegs, args.rounds)
    mae = reference_mae(jpegs, rewritten, min(200, len(jpegs)))
    scales = np.bincount([crop_decode.decode_crop(d, sample_box_flip(*image_size(d), np.random.default_rng(i))[0],
                                                  SIZE).scale for i, d in enumerate(jpegs)], minlength=9)
    full = rate["(f) full decode only (simplejpeg)"]
    print("\n| pipeline | img/s | us/img | vs full decode | MAE vs torchvision (of 255) |\n|---|---|---|---|---|")
    for k, v in rate.items():
        print(f"| {k} | {v:,.0f} | {1e6 / v:,.0f} | {v / full:.2f}x | {mae.get(k[:3], float('nan')):.3f} |")
    p, t = rate["(p) partial decode, decode only"], rate["(t) today's crop path, decode only"]
    P, T = rate["(P) partial decode + resize"], rate["(T) today's mae_train (decode + resize)"]
    print(f"\npartial vs today's decode: {p / t:.2f}x; with the resize: {P / T:.2f}x; "
          f"partial pixels identical to today's on {100 * mae['identical_fraction']:.0f}% of images; "
          f"DCT scale 1/1, 1/2, 1/4, 1/8: {scales[1]}, {scales[2]}, {scales[4]}, {scales[8]} images; "
          f"fallbacks: {dict(crop_decode.FALLBACKS) or 'none'}")
    c, C = rate["(c) --jpeg-restarts, cut + partial decode, decode only"], rate["(C) --jpeg-restarts, (c) + resize"]
    print(f"--jpeg-restarts: cut vs partial decode {c / p:.2f}x, with the resize {C / P:.2f}x; vs full decode "
          f"{c / full:.2f}x and {C / full:.2f}x; cut pixels identical to the partial decode's on "
          f"{100 * mae['cut_identical_fraction']:.0f}% of images; the rewritten JPEGs are "
          f"{sum(map(len, rewritten)) / sum(map(len, jpegs)):.3f}x the bytes; decodes by path: {crop_decode.cut_counts()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(images=len(jpegs), rounds=args.rounds, mean_kb=kb, shapes=shapes, img_per_s=rate, mae=mae,
                           restart_bytes_ratio=sum(map(len, rewritten)) / sum(map(len, jpegs)),
                           fallbacks=dict(crop_decode.FALLBACKS), command=" ".join(sys.argv)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
