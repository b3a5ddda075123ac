"""crossmae-prep checks its input at the door: a bad option is one stderr line, exit 2 and
nothing written; `verify` / `finalize` work on what exists; every option has help text."""
import argparse
import json
import os

import pytest

from data_prep.cli import build_parser, main
from tests.data_prep.fixtures import make_image_folder


@pytest.fixture
def src(tmp_path):
    make_image_folder(tmp_path / "src", ("cat", "dog"), per_class=3)
    return tmp_path / "src"


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("options,message", [
    (["--shard-samples", "-5"], "--shard-samples"),
    (["--shard-samples", "0"], "--shard-samples"),
    (["--shard-bytes", "0"], "--shard-bytes"),
    (["--processes", "0"], "--processes"),
    (["--processes", "-2"], "--processes"),
    (["--num-workers", "0"], "--num-workers"),
    (["--worker-index", "-1"], "--worker-index"),
    (["--num-workers", "2", "--worker-index", "2"], "--worker-index"),
    (["--quality", "500"], "--quality"),
    (["--quality", "0"], "--quality"),
    (["--max-size", "0"], "--max-size"),
    (["--ffcv-quality", "101"], "--ffcv-quality"),
    (["--ffcv-max-resolution", "0"], "--ffcv-max-resolution"),
    (["--format", "ffcv", "--max-size", "64"], "--max-size"),
    (["--format", "ffcv", "--num-workers", "2"], "--num-workers"),
    (["--seed", "-1"], "--seed"),
    (["--summary-json", "/nonexistent/dir/summary.json"], "--summary-json"),
    (["--split", "../escape"], "--split"),
    (["--split", ".."], "--split"),
    (["--split", "a/b"], "--split"),
    (["--split", ""], "--split"),
    (["--split", "/abs"], "--split"),
])
def test_bad_folder_options_exit_2_and_write_nothing(src, tmp_path, capsys, options, message):
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["folder", str(src), str(tmp_path / "out"), *options])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crossmae-prep") and message in err[0], err
    assert files_under(tmp_path) == before and not (tmp_path / "out").exists()


def test_worker_index_from_the_environment_is_checked_too(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    with pytest.raises(SystemExit) as e:
        main(["folder", str(src), str(tmp_path / "out"), "--num-workers", "2"])
    assert e.value.code == 2 and "worker index 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,splits", [("imagenet", "train,../x"), ("imagenet", "train,test"),
                                            ("imagenet", "train,train"), ("verify", "../x"), ("finalize", "a/b")])
def test_bad_split_lists_exit_2(tmp_path, capsys, command, splits):
    args = ["imagenet", str(tmp_path), str(tmp_path / "out")] if command == "imagenet" else [command, str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*args, "--splits", splits])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["out", "dog/out", ".", "link"])
def test_destination_inside_the_source_is_refused(src, tmp_path, capsys, where):
    """Output inside the source is read back as input on the next run (a new class `out`)."""
    (tmp_path / "elsewhere").symlink_to(src)  # through a link: real paths are compared
    dst = (tmp_path / "elsewhere" / "x") if where == "link" else src / where
    before = files_under(src)
    with pytest.raises(SystemExit) as e:
        main(["folder", str(src), str(dst)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inside the source" in err[0], err
    assert files_under(src) == before


def test_source_inside_the_split_folder_it_writes_is_refused(tmp_path, capsys):
    """DST/{split}/ is the tool's own folder (deleting it to start over must not delete the images)."""
    make_image_folder(tmp_path / "out/train/images", ("cat", "dog"), per_class=2)
    with pytest.raises(SystemExit) as e:
        main(["folder", str(tmp_path / "out/train/images"), str(tmp_path / "out")])
    assert e.value.code == 2 and "inside the output folder" in capsys.readouterr().err
    assert files_under(tmp_path / "out/train") == sorted(f"images/{c}/{c}_{i:04d}.jpg" for c in ("cat", "dog")
                                                         for i in range(2))
    # a source elsewhere under DST (not in a split folder the run writes) is fine
    assert main(["folder", str(tmp_path / "out/train/images"), str(tmp_path / "out"), "--split", "val"]) == 0


def test_verify_and_finalize_default_to_the_splits_that_exist(src, tmp_path, capsys):
    assert main(["folder", str(src), str(tmp_path / "out"), "--split", "val", "--shard-samples", "4"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["split"] for s in out["splits"]] == ["val"] and out["ok"]
    assert main(["finalize", str(tmp_path / "out")]) == 0
    # asked for explicitly, a missing split is named
    assert main(["verify", str(tmp_path / "out"), "--splits", "train,val"]) == 1
    assert "train" in capsys.readouterr().err


def test_verify_reports_an_unfinished_split_and_fails_on_an_empty_destination(src, tmp_path, capsys):
    assert main(["folder", str(src), str(tmp_path / "out"), "--num-workers", "2", "--worker-index", "0",
                 "--shard-samples", "2"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "train: unfinished" in err, err
    assert main(["verify", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing prepared" in err[0]


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", h) for a, h in _actions(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "/".join(action.option_strings) or action.dest, action.help


def test_every_option_of_every_subcommand_has_help_text(capsys):
    missing = [name for name, text in _actions(build_parser()) if not text]
    assert not missing, missing
    for command in ([], ["imagenet"], ["folder"], ["finalize"], ["verify"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--help"])
        assert e.value.code == 0 and "usage: crossmae-prep" in capsys.readouterr().out
