import gzip
import json
import os
import shutil
import tarfile

import pytest

from data_prep.sources import SourceError, SourceItem, list_image_folder, list_imagenet, read_item
from tests.data_prep.fixtures import (CLASSES, NON_LEAVES, make_bad_images, make_image_folder, make_imagenet_archives,
                                      make_imagenet_tree, write_loc_csv)


def pairs(listing):
    return [(it.key, it.label) for it in listing.items]


def files_under(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def test_extracted_train_counts_labels_bytes(tmp_path):
    fx = make_imagenet_tree(tmp_path, per_class=5)
    (tmp_path / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    (tmp_path / "train" / CLASSES[0] / "._n01440764_1.JPEG").write_bytes(b"\0" * 10)  # macOS resource fork
    lst = list_imagenet(str(tmp_path), "train")
    assert lst.split == "train" and lst.classes == sorted(CLASSES) and lst.rejects == []
    assert [it.key for it in lst.items] == sorted(fx.train) and len(lst.items) == 15
    for it in lst.items:
        wnid, data = fx.train[it.key]
        assert it.label == lst.classes.index(wnid) and lst.classes[it.label] == wnid
        assert it.size == len(data) and read_item(it) == data and not it.in_archive
    d = lst.description
    assert d["kind"] == "imagenet-folder" and d["ignored_files"] == 2 and d["num_items"] == 15
    assert d["class_counts"] == {w: 5 for w in sorted(CLASSES)}


@pytest.mark.parametrize("labels,source", [("devkit", "devkit"), ("devkit-tar", "devkit-tar"), ("loc", "loc-csv")])
def test_flat_val_labels_follow_sorted_wnids(tmp_path, labels, source):
    fx = make_imagenet_tree(tmp_path, val_per_class=3, labels=labels)
    # the fixture's devkit IDs are shuffled: ID - 1 is never the sorted-wnid index
    assert all(fx.devkit_ids[w] - 1 != fx.label(w) for w in fx.classes)
    lst = list_imagenet(str(tmp_path), "val")
    assert lst.classes == sorted(CLASSES) and lst.description["class_source"] == "train split"
    assert pairs(lst) == [(k, fx.label(fx.val[k][0])) for k in sorted(fx.val)]
    assert [it.key for it in lst.items][:2] == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]
    assert lst.description["label_source"] == source and lst.description["layout"] == "flat"
    assert all(read_item(it) == fx.val[it.key][1] for it in lst.items)


def test_val_class_list_without_train_comes_from_devkit_leaves(tmp_path):
    fx = make_imagenet_tree(tmp_path, labels="devkit-tar")
    shutil.rmtree(tmp_path / "train")
    lst = list_imagenet(str(tmp_path), "val")
    assert lst.classes == sorted(CLASSES)  # leaves only: the non-leaf synsets are not classes
    assert not {w for w, _ in NON_LEAVES} & set(lst.classes)
    assert lst.description["class_source"] == "devkit leaf synsets"
    assert pairs(lst) == [(k, fx.label(fx.val[k][0])) for k in sorted(fx.val)]


def test_loc_csv_without_train_uses_wnids_seen(tmp_path):
    fx = make_imagenet_tree(tmp_path, classes=CLASSES[1:], labels="loc")
    shutil.rmtree(tmp_path / "train")
    lst = list_imagenet(str(tmp_path), "val")
    assert lst.classes == sorted(CLASSES[1:]) and lst.description["label_source"] == "loc-csv"
    assert pairs(lst) == [(k, fx.label(fx.val[k][0])) for k in sorted(fx.val)]


def test_kaggle_layout_with_loc_csv(tmp_path):
    fx = make_imagenet_tree(tmp_path / "ILSVRC" / "Data" / "CLS-LOC", labels=None)
    write_loc_csv(tmp_path, fx)
    train, val = list_imagenet(str(tmp_path), "train"), list_imagenet(str(tmp_path), "val")
    assert pairs(train) == [(k, fx.label(fx.train[k][0])) for k in sorted(fx.train)]
    assert pairs(val) == [(k, fx.label(fx.val[k][0])) for k in sorted(fx.val)]
    assert val.description["label_source"] == "loc-csv"


def test_val_in_class_folders_needs_no_label_file(tmp_path):
    fx = make_imagenet_tree(tmp_path, val_layout="folders", labels=None)
    lst = list_imagenet(str(tmp_path), "val")
    assert lst.description["layout"] == "folders" and lst.description["label_source"] == "class folders"
    assert pairs(lst) == [(k, fx.label(fx.val[k][0])) for k in sorted(fx.val)]


def test_val_images_missing_from_labels_are_rejected(tmp_path):
    fx = make_imagenet_tree(tmp_path, labels="loc")
    extra = next(iter(fx.val.values()))[1]
    (tmp_path / "val" / "ILSVRC2012_val_00000999.JPEG").write_bytes(extra)  # not in the csv
    lst = list_imagenet(str(tmp_path), "val")
    assert len(lst.items) == len(fx.val)
    assert [(r["key"], r["reason"]) for r in lst.rejects] == [("ILSVRC2012_val_00000999", "no label")]


@pytest.mark.parametrize("split", ["train", "val"])
def test_archive_form_equals_extracted_form(tmp_path, split):
    tree = make_imagenet_tree(tmp_path / "tree", labels="devkit")
    arch = make_imagenet_archives(tmp_path / "arch", labels="devkit-tar")
    a, b = list_imagenet(str(tmp_path / "tree"), split), list_imagenet(str(tmp_path / "arch"), split)
    assert a.classes == b.classes and pairs(a) == pairs(b) and len(a.items) == len(getattr(tree, split))
    assert [it.size for it in a.items] == [it.size for it in b.items]
    assert [read_item(it) for it in a.items] == [read_item(it) for it in b.items]
    assert b.description["kind"] == "imagenet-archive" and a.description["kind"] == "imagenet-folder"
    assert all(it.in_archive and os.path.samefile(it.path, arch.files[split]) and it.offset > 0 for it in b.items)
    assert json.loads(json.dumps(b.description)) == b.description
    assert len({it.offset for it in b.items}) == len(b.items)


def test_archives_are_read_in_place_without_extracting(tmp_path, monkeypatch):
    fx = make_imagenet_archives(tmp_path, labels="devkit-tar")
    before = files_under(tmp_path)

    def no_extract(*a, **k):
        raise AssertionError("extracted to disk")

    monkeypatch.setattr(tarfile.TarFile, "extract", no_extract)
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_extract)
    train, val = list_imagenet(str(tmp_path), "train"), list_imagenet(str(tmp_path), "val")
    assert {it.key: read_item(it) for it in train.items} == {k: d for k, (_, d) in fx.train.items()}
    assert {it.key: read_item(it) for it in val.items} == {k: d for k, (_, d) in fx.val.items()}
    assert files_under(tmp_path) == before
    # the bytes sit at the recorded absolute offsets of the outer file (nested: outer + inner offset)
    raw = fx.files["train"].read_bytes()
    assert all(raw[it.offset:it.offset + it.size] == fx.train[it.key][1] for it in train.items)


def test_compressed_or_broken_train_tar_is_one_line_source_error(tmp_path):
    fx = make_imagenet_archives(tmp_path, labels=None, val=False)
    path = fx.files["train"]
    path.write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(SourceError, match="compressed") as e:
        list_imagenet(str(tmp_path), "train")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_image_folder_unknown_classes_become_rejects(tmp_path):
    imgs = make_image_folder(tmp_path, classes=("cat", "dog", "eel"), per_class=3)
    full = list_image_folder(str(tmp_path), "train")
    assert full.classes == ["cat", "dog", "eel"] and len(full.items) == 9 and full.rejects == []
    assert all(it.label == full.classes.index(imgs[it.key][0]) for it in full.items)
    part = list_image_folder(str(tmp_path), "val", classes=["cat", "eel"])
    assert part.classes == ["cat", "eel"] and part.split == "val"
    assert pairs(part) == [(k, ["cat", "eel"].index(c)) for k, (c, _) in sorted(imgs.items()) if c != "dog"]
    assert sorted(r["key"] for r in part.rejects) == ["dog_0000", "dog_0001", "dog_0002"]
    assert {r["reason"] for r in part.rejects} == {"unknown class"}
    assert part.description["kind"] == "image-folder" and part.description["num_rejects"] == 3


def test_zero_byte_file_is_rejected_bad_bytes_are_left_to_the_writer(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), per_class=2)
    kinds = make_bad_images(tmp_path / "b")
    (tmp_path / "b" / "README.md").write_text("ignored, not rejected")
    lst = list_image_folder(str(tmp_path), "train")
    assert [(r["key"], r["reason"]) for r in lst.rejects] == [("empty", "empty file")]
    assert lst.rejects[0]["path"] == str(tmp_path / "b" / "empty.JPEG")
    keys = {it.key for it in lst.items}
    assert keys == {"a_0000", "a_0001", "b_0000", "b_0001"} | {n[:-5] for n, k in kinds.items() if k != "empty"}
    assert lst.description["ignored_files"] == 1


def test_keys_are_sanitised_unique_and_deterministic(tmp_path):
    make_image_folder(tmp_path, classes=("x", "y"), per_class=1)
    data = (tmp_path / "x" / "x_0000.jpg").read_bytes()
    for rel in ("x/my photo.v2.jpg", "x/dup.jpg", "x/dup.PNG", "y/dup.jpeg", "y/dup_1.jpg", "y/tab\there.JPG"):
        (tmp_path / rel).write_bytes(data)
    a, b = list_image_folder(str(tmp_path), "train"), list_image_folder(str(tmp_path), "train")
    assert a.items == b.items
    keys = [it.key for it in a.items]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 8
    assert not any(c in k for k in keys for c in "./ \t\n")
    assert {"my_photo_v2", "tab_here", "dup", "dup_1", "dup_2", "dup_3"} <= set(keys)
    by_key = {it.key: it for it in a.items}
    assert by_key["dup"].path.endswith("x/dup.PNG") and by_key["dup_1"].path.endswith("y/dup_1.jpg")
    assert a.description["renamed_duplicate_keys"] == 2


@pytest.mark.parametrize("case", ["missing", "empty", "bad_split", "flat_val_no_labels", "folder_no_classes"])
def test_bad_sources_raise_one_line_source_error(tmp_path, case):
    src = tmp_path / "src"
    call = lambda: list_imagenet(str(src), "train")  # noqa: E731
    if case == "empty":
        src.mkdir()
    elif case == "bad_split":
        make_imagenet_tree(src, labels=None)
        call = lambda: list_imagenet(str(src), "test")  # noqa: E731
    elif case == "flat_val_no_labels":
        make_imagenet_tree(src, labels=None)
        call = lambda: list_imagenet(str(src), "val")  # noqa: E731
    elif case == "folder_no_classes":
        src.mkdir()
        (src / "loose.jpg").write_bytes(b"x")
        call = lambda: list_image_folder(str(src), "train")  # noqa: E731
    with pytest.raises(SourceError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and str(src) in msg and isinstance(e.value, ValueError)
    if case == "empty":
        assert msg == (f"no ImageNet train split under {src}: expected train/<wnid>/*.JPEG or "
                       "ILSVRC2012_img_train.tar")
    if case == "flat_val_no_labels":
        assert "LOC_val_solution.csv" in msg and "devkit" in msg


def test_source_item_is_frozen_with_archive_defaults():
    it = SourceItem("k", 0, 3, "/p")
    assert (it.offset, it.in_archive) == (0, False)
    with pytest.raises(Exception):
        it.key = "other"


def test_link_members_of_an_archive_are_counted_not_skipped_silently(tmp_path):
    fx = make_imagenet_archives(tmp_path, labels="loc", train=False)
    with tarfile.open(fx.files["val"], "a") as tar:
        link = tarfile.TarInfo("ILSVRC2012_val_00000099.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "ILSVRC2012_val_00000001.JPEG"
        tar.addfile(link)
        notes = tarfile.TarInfo("notes")
        notes.type, notes.linkname = tarfile.LNKTYPE, "ILSVRC2012_val_00000001.JPEG"
        tar.addfile(notes)
    lst = list_imagenet(str(tmp_path), "val")
    assert len(lst.items) == len(fx.val)
    assert [(r["key"], r["reason"]) for r in lst.rejects] == [("ILSVRC2012_val_00000099", "link member in archive")]
    assert lst.description["ignored_files"] == 1  # "notes": not an image name


def test_a_file_name_that_is_not_utf8_is_sharded_under_a_sanitised_key(tmp_path):
    """Linux file names are bytes: b'caf\\xe9.jpg' (Latin-1) stopped the run with "'utf-8' codec can't
    encode character '\\udce9' in position 28", naming no file. Now it is one more sample, key 'caf_'."""
    from data_prep.cli import main

    imgs = make_image_folder(tmp_path / "src", classes=("a", "b"), per_class=1)
    data = imgs["a_0000"][1]
    (tmp_path / "src" / "a" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(data)
    lst = list_image_folder(str(tmp_path / "src"), "train")
    assert [it.key for it in lst.items] == ["a_0000", "b_0000", "caf_"]
    assert main(["folder", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "train" / "train-000000.tar") as tar:
        assert tar.extractfile("caf_.jpg").read() == data
