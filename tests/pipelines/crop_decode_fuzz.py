"""Damaged JPEGs through every entry point of the C extension given as argv[1] (a .so built with
-fsanitize=address by tests/pipelines/test_crop_decode_asan.py). Imports neither torch nor the
package (their own native code trips the sanitizer): numpy, Pillow and the .so alone."""
import importlib.util
import io
import sys

import numpy as np
from PIL import Image


def photo(w: int, h: int, seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xs * 0.03 * (c + 1) + ys * 0.02) * 70 + 128 for c in range(3)], -1)
    img = img + rng.normal(0, 10, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def main(so: str, trials: int) -> None:
    spec = importlib.util.spec_from_file_location("_crop_decode", so)
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    rng = np.random.default_rng(1)
    seeds = [C.transcode_restarts(photo(300, 200, 1)), C.transcode_restarts(photo(200, 150, 2, subsampling=0)),
             photo(240, 160, 3, restart_marker_rows=1), photo(240, 160, 4, progressive=True)]
    big, small = np.empty((150, 200, 3), np.uint8), np.empty((40, 60, 3), np.uint8)
    for trial in range(trials):
        good = seeds[trial % len(seeds)]
        b, sos, kind = bytearray(good), good.index(b"\xff\xda"), (trial // len(seeds)) % 4
        if kind == 0:  # header bytes: lengths, sizes, sampling factors, the restart interval
            for i in rng.integers(2, sos + 12, 3):
                b[i] = int(rng.integers(256))
        elif kind == 1:  # stray or misnumbered markers in the entropy data
            for i in rng.integers(sos + 12, len(b) - 2, 4):
                b[i:i + 2] = bytes([0xFF, int(rng.integers(0xC0, 0x100))])
        elif kind == 2:  # cut short, with or without an end marker put back
            b = b[:int(rng.integers(2, len(b)))] + (b"\xff\xd9" if trial % 2 else b"")
        else:  # entropy bytes
            for i in rng.integers(sos + 12, len(b) - 2, 20):
                b[i] = int(rng.integers(256))
        d = bytes(b)
        C.restart_cells(d)
        C.cut_box(d, 20, 30, 100, 150)
        C.decode_into(d, big, 200, 300, 1, 20, 30, 150, 200)
        C.decode_into(d, small, 200, 300, 2, 10, 15, 40, 60)
        C.transcode_restarts(d, 8 + trial % 64)
    print("fuzz done", C.cut_counts(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
