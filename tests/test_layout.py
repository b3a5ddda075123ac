"""The flow is the layout: the model library imports nothing from later stages or from
distributed / storage libraries."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"pipelines", "data_prep", "deepspeed", "boto3", "botocore", "webdataset", "ffcv"}


@pytest.mark.parametrize("path", sorted((ROOT / "crossmae").glob("*.py")), ids=lambda p: p.name)
def test_model_library_imports_no_later_stage(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for n in names:
            assert n.split(".")[0] not in FORBIDDEN, f"{path.name} imports {n}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci
