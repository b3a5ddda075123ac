"""pipelines/data/tar_reader.py gives what webdataset's tar_file_iterator + group_by_keys give, on
the tars crossmae-prep writes and on the tars users bring (ustar / GNU / pax, long names, links,
directories, metadata members, upper-case extensions), whole and cut short at every block; and
each sample read alone from the byte span the header walk (`sample_spans`) gives is that sample."""
import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_prep.shards import tar_member
from pipelines.data.tar_reader import sample_spans, tar_samples


def webdataset_samples(blob: bytes):
    """(samples, error type or None) through webdataset's iterators."""
    out = []
    try:
        for s in group_by_keys(dict(m, __url__="u") for m in tar_file_iterator(io.BytesIO(blob))):
            out.append(s)
    except (tarfile.TarError, ValueError) as e:
        return out, type(e).__name__ if not isinstance(e, tarfile.TarError) else "TarError"
    return out, None


def our_samples(blob: bytes):
    out = []
    try:
        for s in tar_samples(io.BufferedReader(io.BytesIO(blob)), "u"):
            out.append(s)
    except (tarfile.TarError, ValueError) as e:
        return out, type(e).__name__ if not isinstance(e, tarfile.TarError) else "TarError"
    return out, None


def span_samples(blob: bytes, tmp_path):
    """(samples read one by one from their spans, whether the walk met damage)."""
    path = tmp_path / "shard.tar"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        spans, damage = sample_spans(f, "u")
    assert all(a < b <= len(blob) for a, b in spans) and spans == sorted(spans)
    return [next(tar_samples(io.BytesIO(blob[a:b]), "u")) for a, b in spans], bool(damage)


def assert_spans_read_as_the_stream(blob: bytes, tmp_path, what):
    samples, error = our_samples(blob)
    assert span_samples(blob, tmp_path) == (samples, error is not None), what


def tar_of(members, fmt) -> bytes:
    long_link = fmt != tarfile.USTAR_FORMAT
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime = kind, 1_000_000
            if kind == tarfile.SYMTYPE:
                ti.linkname = "x" * (120 if long_link else 20) + ".jpg"
            if kind == tarfile.REGTYPE:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


USER_MEMBERS = [
    ("a/", tarfile.DIRTYPE, b""),
    ("a/n01440764_1.JPG", tarfile.REGTYPE, b"\xff\xd8" + b"1" * 700),
    ("a/n01440764_1.cls", tarfile.REGTYPE, b"3"),
    ("a/n01440764_1.meta.json", tarfile.REGTYPE, b"{}"),
    ("__meta__", tarfile.REGTYPE, b"skipped"),
    ("__index__/x.jpg", tarfile.REGTYPE, b"skipped too"),
    ("noextension", tarfile.REGTYPE, b"no key"),
    ("link.jpg", tarfile.SYMTYPE, b""),
    ("d" * 90 + "/" + "k" * 80 + ".jpg", tarfile.REGTYPE, b"long name" * 100),
    ("d" * 90 + "/" + "k" * 80 + ".cls", tarfile.REGTYPE, b"5"),
    ("ünïcode_ключ.jpg", tarfile.REGTYPE, b"u" * 1025),
    ("ünïcode_ключ.cls", tarfile.REGTYPE, b"1"),
    ("z" * 300 + ".txt", tarfile.REGTYPE, b""),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_user_tars_read_as_webdataset_reads_them_whole_and_cut_at_every_block(fmt, tmp_path):
    members = [m for m in USER_MEMBERS if fmt != tarfile.USTAR_FORMAT or len(m[0].encode()) <= 255]
    blob = tar_of(members, fmt)
    expected = webdataset_samples(blob)
    assert len(expected[0]) == len({m[0].split(".")[0] for m in members if m[0].count(".") and m[1] == tarfile.REGTYPE
                                    and not m[0].startswith("__")}) == 3 + (fmt != tarfile.USTAR_FORMAT)
    assert expected[1] is None  # the fixture means what it says
    assert our_samples(blob) == expected
    for cut in list(range(0, len(blob), 512)) + [len(blob) - 700, 1, 700, 1100]:
        assert our_samples(blob[:cut]) == webdataset_samples(blob[:cut]), cut
        assert_spans_read_as_the_stream(blob[:cut], tmp_path, cut)
    assert_spans_read_as_the_stream(blob, tmp_path, "whole")


def test_prep_shards_and_damage_read_as_webdataset_reads_them(tmp_path):
    blob = b"".join(tar_member(f"k{i:03d}.jpg", bytes([i]) * (300 + 97 * i)) + tar_member(f"k{i:03d}.cls", b"%d" % i)
                    for i in range(20)) + b"\0" * 1024
    assert our_samples(blob) == webdataset_samples(blob) and len(our_samples(blob)[0]) == 20
    for cut in range(0, len(blob), 137):
        assert our_samples(blob[:cut]) == webdataset_samples(blob[:cut]), cut
        assert_spans_read_as_the_stream(blob[:cut], tmp_path, cut)
    assert_spans_read_as_the_stream(blob, tmp_path, "whole")
    assert len(span_samples(blob, tmp_path)[0]) == 20
    flipped = bytearray(blob)
    for pos in (0, 148, 600, 5000, 9000):  # a flipped byte in a header or in data
        damaged = bytes(flipped[:pos]) + bytes([flipped[pos] ^ 0x55]) + bytes(flipped[pos + 1:])
        assert our_samples(damaged) == webdataset_samples(damaged), pos
        assert_spans_read_as_the_stream(damaged, tmp_path, pos)
    dup = tar_member("k.jpg", b"1") + tar_member("k.JPG", b"2") + b"\0" * 1024
    assert our_samples(dup) == webdataset_samples(dup) and our_samples(dup)[1] == "ValueError"
    assert our_samples(b"") == webdataset_samples(b"") and our_samples(b"")[1] == "TarError"


def test_compressed_tars_go_through_tarfile():
    blob = tar_of(USER_MEMBERS[:4], tarfile.PAX_FORMAT)
    assert our_samples(gzip.compress(blob)) == webdataset_samples(blob)


def test_sample_spans_name_what_cannot_be_read_one_by_one(tmp_path):
    """A repeated suffix spoils only its own sample (the stream loses the rest of the shard); a
    compressed tar, and pax global headers that set names, are refused with the reason."""
    dup = tar_member("a.jpg", b"0") + tar_member("k.jpg", b"1") + tar_member("k.JPG", b"2") + \
        tar_member("z.jpg", b"3") + b"\0" * 1024
    path = tmp_path / "dup.tar"
    path.write_bytes(dup)
    with open(path, "rb") as f:
        spans, damage = sample_spans(f, "u")
    assert len(spans) == 3 and damage == ""
    with pytest.raises(ValueError, match="duplicate file name"):
        next(tar_samples(io.BytesIO(dup[spans[1][0]:spans[1][1]]), "u"))
    assert next(tar_samples(io.BytesIO(dup[spans[2][0]:spans[2][1]]), "u"))["jpg"] == b"3"
    path.write_bytes(gzip.compress(dup))
    with open(path, "rb") as f, pytest.raises(ValueError, match="compressed tar"):
        sample_spans(f, "u")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "x.jpg"}) as tar:
        ti = tarfile.TarInfo("k.jpg")
        ti.size = 1
        tar.addfile(ti, io.BytesIO(b"1"))
    path.write_bytes(buf.getvalue())
    with open(path, "rb") as f:
        spans, damage = sample_spans(f, "u")
    assert spans == [] and "pax global header" in damage
