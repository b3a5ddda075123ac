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
