"""Symbolic links and empty class folders in a source: real folders, real JPEGs, real links.

Links are not followed unless --follow-links: each is counted as ignored and named (stderr and
the manifest's source.ignored_links). With --follow-links a link is read only when it stays
inside the source, never in a cycle, and no file is read twice. An empty class folder keeps its
index in the class map and is named in one warning line."""
import json
import os
import pathlib

from data_prep.cli import main
from data_prep.sources import list_image_folder, list_imagenet
from tests.data_prep.fixtures import make_image_folder, make_imagenet_tree
from tests.data_prep.test_prep import read_shards


def prep(capsys, *args) -> tuple[int, dict | None, list[str]]:
    """(exit code, manifest.json of split train, stderr lines) of one crossmae-prep folder run."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    dst = pathlib.Path(args[2])
    manifest = dst / "train" / "manifest.json"
    return code, json.loads(manifest.read_text()) if manifest.exists() else None, err


def test_a_link_back_to_the_parent_folder_does_not_read_the_tree_again_under_its_class(tmp_path, capsys):
    """src/1/back -> .. made 8 + 10 images 38 samples, {'0': 9, '1': 29}, with 0 ignored and no word."""
    src = tmp_path / "src"
    images = {**make_image_folder(src, ("0",), per_class=8, seed=1), **make_image_folder(src, ("1",), per_class=10)}
    (src / "1" / "back").symlink_to("..")
    code, manifest, err = prep(capsys, "folder", src, tmp_path / "out")
    assert code == 0
    assert manifest["num_samples"] == 18 and manifest["source"]["class_counts"] == {"0": 8, "1": 10}
    samples, _ = read_shards(tmp_path / "out" / "train")
    assert {k: (manifest["classes"][label], data) for k, (label, data) in samples.items()} == images
    assert manifest["source"]["ignored_files"] == 1 and manifest["source"]["num_ignored_links"] == 1
    assert manifest["source"]["ignored_links"] == [dict(path=str(src / "1" / "back"), target="..",
                                                        reason="not followed")]
    warning = [line for line in err if "link" in line and "warning" in line]
    assert len(warning) == 1 and str(src / "1" / "back") in warning[0] and "--follow-links" in warning[0]


def test_file_links_are_not_read_by_default_inside_or_outside_the_source(tmp_path, capsys):
    src, outside = tmp_path / "src", tmp_path / "private"
    make_image_folder(src, ("cat", "dog"), per_class=2)
    secret = make_image_folder(outside, ("x",), per_class=1, seed=5)["x_0000"][1]
    (src / "cat" / "secret.jpg").symlink_to(outside / "x" / "x_0000.jpg")
    (src / "dog" / "again.jpg").symlink_to("../cat/cat_0000.jpg")
    (src / "mice").symlink_to(outside / "x")  # a class folder link: not a class
    listing = list_image_folder(str(src), "train")
    assert listing.classes == ["cat", "dog"] and len(listing.items) == 4
    assert all(os.path.realpath(it.path).startswith(str(src)) for it in listing.items)
    code, manifest, err = prep(capsys, "folder", src, tmp_path / "out")
    assert code == 0 and manifest["num_samples"] == 4 and manifest["classes"] == ["cat", "dog"]
    assert secret not in [data for _, data in read_shards(tmp_path / "out" / "train")[0].values()]
    named = {r["path"] for r in manifest["source"]["ignored_links"]}
    assert named == {str(src / "cat" / "secret.jpg"), str(src / "dog" / "again.jpg"), str(src / "mice")}
    assert manifest["source"]["ignored_files"] == 3
    assert any("3 link(s) left out" in line for line in err)


def test_follow_links_reads_each_file_once_and_never_outside_the_source(tmp_path, capsys):
    src, outside = tmp_path / "src", tmp_path / "elsewhere"
    imgs = make_image_folder(src, ("a", "b"), per_class=3)
    extra = make_image_folder(src / ".store", ("z",), per_class=1, seed=3)  # hidden: read only through a link
    far = make_image_folder(outside, ("far",), per_class=1, seed=4)
    links = {
        "b/from_a": "../a",  # a folder read directly too: its files are not read again
        "b/alias.jpg": "../a/a_0000.jpg",  # a file read directly too
        "b/z.jpg": "../.store/z/z_0000.jpg",  # inside the source, reached only through this link
        "b/out.jpg": str(outside / "far" / "far_0000.jpg"),  # outside: never read
        "b/loop": ".",  # a cycle
        "b/gone.jpg": "missing.jpg",  # broken
        "c": str(outside / "far"),  # a class folder outside the source: not a class
    }
    for name, target in links.items():
        (src / name).symlink_to(target)
    code, manifest, err = prep(capsys, "folder", src, tmp_path / "out", "--follow-links")
    assert code == 0 and manifest["classes"] == ["a", "b"]
    samples, _ = read_shards(tmp_path / "out" / "train")
    got = {k: (manifest["classes"][label], data) for k, (label, data) in samples.items()}
    assert got == {**imgs, "z": ("b", extra["z_0000"][1])}
    assert far["far_0000"][1] not in [data for _, data in got.values()]
    reasons = {}
    for r in manifest["source"]["ignored_links"]:
        reasons.setdefault(os.path.relpath(r["path"], src), set()).add(r["reason"].split(" ")[0])
    assert reasons == {"b/from_a": {"reaches"}, "b/alias.jpg": {"reaches"}, "b/out.jpg": {"points"},
                       "b/loop": {"a"}, "b/gone.jpg": {"broken:"}, "c": {"points"}}
    assert manifest["source"]["num_ignored_links"] == 3 + 1 + 1 + 1 + 1 + 1  # from_a: its 3 files
    assert any("8 link(s) left out" in line for line in err)


def test_imagenet_class_folder_and_file_links_follow_the_same_rule(tmp_path):
    fx = make_imagenet_tree(tmp_path / "in", per_class=2, labels=None)
    wnid = fx.classes[0]
    (tmp_path / "in" / "train" / "n09999999").symlink_to(tmp_path / "in" / "train" / wnid)
    first = sorted(k for k, (w, _) in fx.train.items() if w == wnid)[0]
    (tmp_path / "in" / "train" / fx.classes[1] / "copy.JPEG").symlink_to(f"../{wnid}/{first}.JPEG")
    plain = list_imagenet(str(tmp_path / "in"), "train")
    assert plain.classes == fx.classes and len(plain.items) == len(fx.train)
    assert plain.description["num_ignored_links"] == 2
    followed = list_imagenet(str(tmp_path / "in"), "train", follow_links=True)
    # the linked class folder is a class (inside the source) whose files are all read already
    assert followed.classes == [*fx.classes, "n09999999"] and len(followed.items) == len(fx.train)
    assert followed.description["empty_classes"] == ["n09999999"]


def test_an_empty_class_folder_keeps_its_index_and_is_named_in_one_warning(tmp_path, capsys):
    src = tmp_path / "src"
    imgs = make_image_folder(src, ("ant", "cow"), per_class=3)
    (src / "bee").mkdir()
    (src / "bee" / "notes.txt").write_text("no image here")
    code, manifest, err = prep(capsys, "folder", src, tmp_path / "out")
    assert code == 0
    assert manifest["class_map"] == {"ant": 0, "bee": 1, "cow": 2}  # cow keeps index 2: the sorted folder names
    samples, _ = read_shards(tmp_path / "out" / "train")
    want = {k: manifest["class_map"][c] for k, (c, _) in imgs.items()}
    assert {k: label for k, (label, _) in samples.items()} == want
    assert manifest["source"]["empty_classes"] == ["bee"]
    warning = [line for line in err if "without a usable image" in line]
    assert len(warning) == 1 and "'bee' (index 1)" in warning[0] and "kept in the class map" in warning[0]
