"""The C extension (pipelines/data/_crop_decode.c) parses untrusted bytes: marker segments, the
restart layout, the cut. Here it is rebuilt with AddressSanitizer and fed damaged JPEGs
(tests/pipelines/crop_decode_fuzz.py): any read or write outside a buffer, use after free or
double free fails the test with the sanitizer's report. Leaks are checked apart (RSS flat over
many calls), since Python's own allocations would drown LeakSanitizer's report."""
import pathlib
import resource
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from pipelines.data import crop_decode

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "pipelines/data/_crop_decode.c"


def libasan() -> str | None:
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if pathlib.Path(path).is_absolute() and pathlib.Path(path).exists() else None


@pytest.mark.skipif(libasan() is None or not pathlib.Path("/usr/include/jpeglib.h").exists(),
                    reason="needs gcc's libasan and the libjpeg headers")
def test_damaged_jpegs_make_no_memory_error_under_addresssanitizer(tmp_path):
    so = tmp_path / ("_crop_decode" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-shared", "-fPIC", "-g", "-O1", "-fsanitize=address", "-fno-omit-frame-pointer",
                    f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-ljpeg", "-o", str(so)], check=True)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/pipelines/crop_decode_fuzz.py"), str(so), "2000"],
                          env={"LD_PRELOAD": libasan(), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
                               "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=600)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0 and "fuzz done" in proc.stdout, proc.stderr[-4000:]
    counts = eval(proc.stdout.split("fuzz done", 1)[1])  # {'cut': n, ...}: every path was taken
    assert counts["cut"] and counts["whole"] and counts["cut_failed"], counts


@pytest.mark.skipif(crop_decode.EXTENSION_ERROR is not None, reason="C extension not built")
def test_repeated_decodes_and_rewrites_do_not_grow_the_process():
    from tests.pipelines.test_crop_decode import photo
    C = crop_decode._crop_decode
    good = C.transcode_restarts(photo(300, 200, seed=1))
    bad = good[:len(good) // 2] + b"\xff\xd9"
    out = np.empty((150, 200, 3), np.uint8)

    def calls(n):
        for i in range(n):
            C.decode_into(good, out, 200, 300, 1, 20, 30, 150, 200)
            C.decode_into(bad, out, 200, 300, 1, 20, 30, 150, 200)
            C.cut_box(good, 20, 30, 150, 200)
            if i % 10 == 0:
                C.transcode_restarts(good)
                C.transcode_restarts(bad)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    first = calls(2000)
    assert calls(4000) - first < 2048, "KB of peak RSS added by 4,000 more rounds: a leak"
