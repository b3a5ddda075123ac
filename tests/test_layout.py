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


# --- pipelines/: stage packages in data-flow order, entry modules on top (README "Layout") ---
STAGES = ("runtime", "storage", "data", "train", "checkpoints", "eval")  # each may import only those before it
ENTRIES = ("pretrain", "finetune", "export", "evaluate", "demo")  # -m pipelines.X / console scripts
TOP = ("trainer",)  # the pretraining run object: composes train/ and checkpoints/, used by pretrain.py
MAX_LINES = 400
PIPELINES = ROOT / "pipelines"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function (lazy imports close circles
    too). `from pipelines.data import transforms` counts as pipelines.data.transforms."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    known = {_module_name(p) for p in _project_files()}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in found if n in known and n != mod}


def _project_files() -> list[pathlib.Path]:
    return sorted(p for d in ("pipelines", "crossmae", "data_prep") for p in (ROOT / d).rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in _project_files()}


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    if parts[0] != "pipelines" or len(parts) == 1:
        return None
    return parts[1]


def test_import_graph_has_no_circle():
    """Tarjan's strongly connected components over every project import, lazy ones included: a circle is
    a component of more than one module (or a module importing itself)."""
    graph = _graph()
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            # importing a submodule runs its package's __init__ first: that edge is not a circle by itself
            if v.startswith(w + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_every_pipelines_module_is_a_stage_an_entry_or_the_trainer():
    for p in PIPELINES.rglob("*.py"):
        mod = _module_name(p)
        if mod == "pipelines":
            continue
        stage = _stage(mod)
        assert stage in STAGES or (mod.count(".") == 1 and stage in ENTRIES + TOP), f"{mod}: not in a stage package"


def test_no_stage_imports_a_later_stage_or_an_entry():
    for mod, deps in _graph().items():
        stage = _stage(mod)
        if stage not in STAGES:
            continue
        floor = STAGES.index(stage)
        for dep in deps:
            dep_stage = _stage(dep)
            if dep_stage is None:
                continue
            assert dep_stage in STAGES, f"{mod} imports {dep}: a stage imports no entry module"
            assert STAGES.index(dep_stage) <= floor, f"{mod} imports {dep}: {dep_stage}/ comes after {stage}/"


def test_storage_imports_nothing_above_runtime():
    for mod, deps in _graph().items():
        if _stage(mod) == "storage":
            assert {_stage(d) for d in deps if d.startswith("pipelines.")} <= {"storage", "runtime"}, (mod, deps)


def test_no_entry_module_imports_another():
    graph = _graph()
    entries = {f"pipelines.{e}" for e in ENTRIES}
    for e in entries:
        assert not (graph[e] & entries), f"{e} imports {graph[e] & entries}"
    for mod, deps in graph.items():
        if _stage(mod) in STAGES or mod.startswith(("crossmae", "data_prep")):
            assert not (deps & entries), f"{mod} imports an entry module: {deps & entries}"


def test_data_prep_and_the_model_library_import_no_pipelines_stage_above_storage():
    for mod, deps in _graph().items():
        if mod.startswith("crossmae"):
            assert not any(d.startswith(("pipelines", "data_prep")) for d in deps), (mod, deps)


@pytest.mark.parametrize("path", sorted(PIPELINES.rglob("*.py")), ids=lambda p: str(p.relative_to(PIPELINES)))
def test_pipelines_files_stay_short(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES}: split it by what it does)"


def test_the_layering_test_finds_a_circle_and_a_backward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake tree with a circle and a data -> train import is caught."""
    fake = tmp_path / "pipelines"
    for rel, text in {"__init__.py": "", "data/__init__.py": "", "train/__init__.py": "",
                      "data/a.py": "from pipelines.train import b\n",
                      "train/b.py": "def f():\n    from pipelines.data import a\n"}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    for d in ("crossmae", "data_prep"):
        (tmp_path / d).mkdir()
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PIPELINES", fake)
    with pytest.raises(AssertionError, match="import circles"):
        test_import_graph_has_no_circle()
    with pytest.raises(AssertionError, match="comes after"):
        test_no_stage_imports_a_later_stage_or_an_entry()


@pytest.mark.parametrize("name", ["trainer.py", "pretrain.py"])
def test_the_trainer_has_no_long_argument_lists(name):
    """The run's state lives on the Trainer object, not in 13-14 parameters passed down (issue 20)."""
    for node in ast.walk(ast.parse((PIPELINES / name).read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (a.args[:1] and a.args[0].arg in ("self", "cls"))
            assert n <= 6, f"pipelines/{name}: {node.name}() takes {n} parameters"
