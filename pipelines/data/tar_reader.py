"""WebDataset samples from a tar stream: the members of one sample grouped by key, as webdataset's
``tar_file_iterator`` + ``group_by_keys`` give them, read straight from 512-byte headers.

Written here rather than used from webdataset because it is measurably cheaper: reading the
shards of 1,024 ImageNet-shaped JPEGs costs 145-232 us per sample through webdataset's iterators
(tarfile's TarInfo objects, a dict per member, a regex per name) and 45-77 us through this reader,
side by side in the same runs (`benchmarks/loader_overhead.py`, rows (rw) and (r), 2026-12-02,
shared 2-core VM; a bare header walk, row (r0): 20-23 us).

What it reads, as tarfile in stream mode does: ustar, GNU (``L`` long names, ``K`` long links)
and pax (``x`` per member, ``g`` global) headers, the ustar name prefix, base-256 sizes.
Compressed tars (gzip, bzip2, xz) go through tarfile and webdataset's iterators unchanged.
Damage, as tarfile in stream mode treats it: a bad or short header at the start of the stream
raises ``tarfile.ReadError``; later it ends the stream; a member whose data or padding is cut
short raises ``tarfile.ReadError`` (the sample holding it is then lost). A repeated suffix within one sample
raises ``ValueError``, as in ``group_by_keys``.
"""
from __future__ import annotations

import os
import re
import tarfile
from typing import BinaryIO, Iterator

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then every extension
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_REGULAR = (b"0", b"\0", b"7")
_CHUNK = 16 << 20
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _number(field: bytes) -> int:
    """tarfile.nti: octal digits, or GNU base-256 when the first byte has its high bit set."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0o377 else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.InvalidHeaderError("invalid header") from None


def _signed_checksum(head: bytes) -> int:
    """The checksum some old tars wrote, with bytes taken as signed (tarfile accepts both)."""
    return sum(b - 256 if b > 127 else b for b in head[:148] + head[156:]) + 256


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Records ``"%d %s=%s\\n"``: the fields a member's name and size can come from."""
    fields, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise tarfile.InvalidHeaderError("invalid pax header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def _read(f: BinaryIO, n: int) -> bytes:
    """n bytes, or fewer at the end. A damaged size field (up to 8 GB) allocates only what is there."""
    data = f.read(min(n, _CHUNK))
    if len(data) == n:
        return data
    parts = [data]
    while data and (n := n - len(data)) > 0:  # a raw reader may return less than asked before its end
        data = f.read(min(n, _CHUNK))
        parts.append(data)
    return b"".join(parts)


def tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular member, in stream order."""
    for name, data, _, _ in _walk(f, None):
        yield name, data


def _walk(f: BinaryIO, file_size: int | None) -> Iterator[tuple[str, bytes | None, int, int]]:
    """(name, data, start, end) of each regular member: ``start`` is the offset of its first header
    (the L / x headers before it included), ``end`` the offset past its padding. With ``file_size``
    (a seekable file) the data is not read but sought over (data None), and a member reaching past
    the file's end raises as a short read does."""
    offset, start, long_name, pax, global_pax, extended = 0, 0, None, {}, {}, False  # extended: L/K/x/g just read

    def skip(n: int) -> bool:
        """Past n bytes of data or padding; False when the file ends first."""
        if file_size is None:
            return len(_read(f, n)) == n
        f.seek(offset + 512 + n)
        return offset + 512 + n <= file_size

    while True:
        head = _read(f, 512)
        try:
            if len(head) < 512:
                raise tarfile.TruncatedHeaderError("truncated header" if head else "empty file")
            if head.count(0) == 512:
                raise tarfile.EOFHeaderError("end of file header")
            checksum = _number(head[148:156])
            if checksum != sum(head) - sum(head[148:156]) + 256 and checksum != _signed_checksum(head):
                raise tarfile.InvalidHeaderError("bad checksum")
        except tarfile.HeaderError as e:
            if offset == 0 and not isinstance(e, tarfile.EOFHeaderError):
                raise tarfile.ReadError(str(e)) from None
            if extended:
                raise tarfile.ReadError("missing or bad subsequent header") from None
            return
        if not extended:
            start = offset
        kind, size = head[156:157], _number(head[124:136])
        if size < 0:
            raise tarfile.ReadError(f"negative member size {size}")
        if kind in (b"L", b"K", b"x", b"g"):
            data = _read(f, size + (-size % 512))
            if len(data) < size:
                raise tarfile.ReadError("unexpected end of data")
            offset, extended = offset + 512 + len(data), True
            if kind == b"L":
                long_name = _text(data[:size])
            elif kind == b"x":
                pax = _pax(data[:size])
            elif kind == b"g":
                global_pax.update(_pax(data[:size]))
                if file_size is not None and {"path", "size"} & global_pax.keys():
                    raise ValueError("a pax global header sets member names or sizes: its samples cannot be "
                                     "read one by one (data.access=stream reads this shard)")
            continue
        name = _text(head[0:100])
        if head[345]:  # the ustar name prefix, as tarfile reads it: in any format
            name = _text(head[345:500]) + "/" + name
        fields = {**global_pax, **pax} if global_pax else pax
        name = fields.get("path", long_name if long_name is not None else name)
        if "size" in fields and (size := int(fields["size"])) < 0:
            raise tarfile.ReadError(f"negative member size {size}")
        long_name, pax, extended = None, {}, False
        if kind == b"\0" and name.endswith("/"):
            kind = b"5"  # an old-style directory entry
        padded = size + (-size % 512)
        if kind in _REGULAR and not (("/" not in name and name.startswith("__") and name.endswith("__"))
                                     or _META.match(name)):
            if file_size is not None:  # the same checks as the read below, in the same order
                if offset + 512 + size > file_size:
                    raise tarfile.ReadError("unexpected end of data")
                yield name, None, start, offset + 512 + padded
                if not skip(padded):
                    raise tarfile.ReadError("unexpected end of data")
            else:
                data = _read(f, size)
                if len(data) < size:
                    raise tarfile.ReadError("unexpected end of data")
                yield name, data, start, offset + 512 + padded
                if len(_read(f, -size % 512)) < -size % 512:  # checked after the yield, as tarfile does
                    raise tarfile.ReadError("unexpected end of data")
        elif kind == b"S":
            raise tarfile.ReadError(f"{name}: a sparse member, not a WebDataset file")
        elif not skip(padded):  # a directory, link: skipped
            raise tarfile.ReadError("unexpected end of data")
        offset += 512 + padded


def sample_spans(f: BinaryIO, url: str) -> tuple[list[tuple[int, int]], str]:
    """The byte span [start, end) of each sample of a plain tar, in order, from a walk over its
    headers (the data is sought over, not read), grouped by key as `tar_samples` groups them; and
    "" or the damage that ended the walk. A sample whose members the damage cut is not listed, as
    `tar_samples` loses it. ``f``: a seekable local file. Reading one span alone gives the sample:
    ``next(tar_samples(io.BytesIO(span_bytes), url))``."""
    head = f.peek(6)[:6] if hasattr(f, "peek") else f.read(6)
    f.seek(0)
    if head.startswith(_COMPRESSED):
        raise ValueError(f"{url}: a compressed tar; reading samples one by one needs a plain tar "
                         "(data.access=stream reads it)")
    spans: list[list[int]] = []
    key = None
    try:
        for name, _, start, end in _walk(f, os.fstat(f.fileno()).st_size):
            match = _KEY.match(name)
            if not match:
                continue
            if match.group(1) != key:
                key = match.group(1)
                spans.append([start, end])
            else:
                spans[-1][1] = end
    except (tarfile.TarError, ValueError) as e:
        if spans:
            spans.pop()  # the sample being read when the damage came is lost, as in tar_samples
        return [(a, b) for a, b in spans], f" ({type(e).__name__}: {e})"
    return [(a, b) for a, b in spans], ""


def sample_starts(f: BinaryIO) -> list[int]:
    """The byte offset of each sample's first header in a plain tar read forward (a stream: the data is
    read, not sought over), grouped by key as `tar_samples` groups them; damage raises as there."""
    starts, key = [], None
    for name, _, start, _ in _walk(f, None):
        match = _KEY.match(name)
        if match and match.group(1) != key:
            key = match.group(1)
            starts.append(start)
    return starts


def tar_samples(f: BinaryIO, url: str) -> Iterator[dict]:
    """One dict per sample: ``__key__``, ``__url__`` and one bytes value per extension (lower case)."""
    head = f.peek(6)[:6] if hasattr(f, "peek") else b""
    if head.startswith(_COMPRESSED):
        from webdataset.tariterators import group_by_keys, tar_file_iterator  # compressed: tarfile's path
        yield from group_by_keys(dict(m, __url__=url) for m in tar_file_iterator(f))
        return
    sample = None
    for name, data in tar_members(f):
        match = _KEY.match(name)
        if not match:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {sample.keys()}")
        sample[suffix] = data
    if sample is not None:
        yield sample
