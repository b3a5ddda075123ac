import io
import tarfile

import pytest

from data_prep.shards import TAR_MTIME, tar_member


@pytest.mark.parametrize("name", ["n01440764_10026.jpg", "k" * 96 + ".cls", "x" * 150 + ".jpg"])
def test_hand_packed_members_read_back_with_tarfile(name):
    data = bytes(range(256)) * 3 + b"tail"
    blob = tar_member(name, data) + tar_member("second.cls", b"7") + b"\0" * 1024
    assert len(blob) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [name, "second.cls"]
        assert tar.extractfile(members[0]).read() == data and tar.extractfile(members[1]).read() == b"7"
        assert members[0].mtime == TAR_MTIME and members[0].mode == 0o444 and members[0].uid == 0


def test_threaded_writer_gives_the_same_bytes_and_hash_as_one_pass(tmp_path, monkeypatch):
    """Hashing and flushing in other threads (flushing every 4 KB here, so every path runs) changes
    nothing: the shard is the plain concatenation of its members and its sha256 is that of the file."""
    import hashlib

    import numpy as np

    from data_prep import shards
    from data_prep.sources import SourceItem

    from .fixtures import jpeg_bytes, synthetic_image

    monkeypatch.setattr(shards._HashingWriter, "FLUSH_BYTES", 4096)
    monkeypatch.setattr(shards._HashingWriter, "QUEUE_ITEMS", 2)
    rng = np.random.default_rng(0)
    images = {f"k{i:03d}": jpeg_bytes(synthetic_image(rng)) for i in range(12)}
    items = [SourceItem(key, i % 3, len(data), key) for i, (key, data) in enumerate(images.items())]
    url = str(tmp_path / "s.tar")
    record = shards.write_shard(url, items, lambda it: images[it.path], shards.ImageOptions())
    expected = b"".join(tar_member(f"{it.key}.jpg", images[it.key]) + tar_member(f"{it.key}.cls", str(it.label).encode())
                        for it in items) + b"\0" * 1024
    written = (tmp_path / "s.tar").read_bytes()
    assert written == expected and record["bytes"] == len(expected) and record["num_samples"] == 12
    assert record["sha256"] == hashlib.sha256(expected).hexdigest()


def test_a_write_error_in_the_writer_thread_reaches_the_caller_and_no_shard_appears(tmp_path, monkeypatch):
    """The sink fails on its third write (a disk that fills up): write_shard raises that error, and
    the atomic writer leaves nothing behind. (tests/reliability/test_prep_inputs.py: the same through
    the CLI with a real EFBIG.)"""
    import contextlib

    import numpy as np

    from data_prep import shards
    from data_prep.sources import SourceItem

    from .fixtures import jpeg_bytes, synthetic_image

    data = jpeg_bytes(synthetic_image(np.random.default_rng(1)))
    real_open_write = shards.storage.open_write

    class FillsUp:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes > 2:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

    @contextlib.contextmanager
    def open_write(url):
        with real_open_write(url) as f:
            yield FillsUp(f)

    monkeypatch.setattr(shards.storage, "open_write", open_write)
    items = [SourceItem(f"k{i}", 0, len(data), "x") for i in range(40)]
    with pytest.raises(OSError, match="No space left"):
        shards.write_shard(str(tmp_path / "s.tar"), items, lambda it: data, shards.ImageOptions())
    assert list(tmp_path.iterdir()) == []
