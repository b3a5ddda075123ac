"""Every command in README.md and deploy/README.md runs here, up to argument parsing.

The commands are extracted from the docs' ```bash blocks, so a new README command is tested
without touching this file. Our CLIs (the crossmae-* entry points of pyproject.toml and
`python -m` of their modules) are parsed by their own argparse parsers and stopped right after
parsing; then their key=value overrides are loaded with pipelines/runtime/config_loader.py (a wrong key fails),
the config is validated and the CLI's own door checks run (`python SCRIPT.py` lines: the
script's own parser). `deepspeed` lines go through DeepSpeed's launcher parser (0.19.8 has no
--dry_run), `torchrun` lines through torch's, and the module they start is parsed as above. `launch.sh` runs with DRY_RUN=1 and the command it prints
is checked the same way; `make` runs as `make -n`. Tools that need a cluster, a daemon or the
network (SYNTAX_ONLY) get `bash -n` + shellcheck of their block and a check that every
repository path they name exists; sbatch's --wrap command and trainer overrides are checked.
"""
import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import pytest

from pipelines.runtime import config_loader
from pipelines.train.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "deploy/README.md")
LANGUAGES = {"bash", "python", "text", "yaml", "json"}  # ```bash blocks hold commands, nothing else does
# Cannot run here; checked for syntax and for the repository paths they name (nothing is run).
SYNTAX_ONLY = {
    "kubectl": "needs a Kubernetes API server",
    "sbatch": "needs a Slurm controller (its --wrap command and the trainer overrides are checked)",
    "docker": "needs a Docker daemon and a registry",
    "aws": "talks to an object store",
    "pip": "installs from a package index",
    "export": "a shell builtin (sets the reader's variables)",
}
VARIABLES = {"I": "3", "i": "1", "jid": "1001", "fid": "1002"}  # sample values of the docs' shell variables
SCRIPTS = {  # a docs command starting a repository script -> its dry run
    "deploy/deepspeed/launch.sh": "launch_sh",
}
SBATCH_OVERRIDES = {"deploy/slurm/pretrain.sbatch"}  # scripts whose trailing key=value args go to crossmae-pretrain
REPO_PATH = re.compile(r"(?<![\w/.])(?:deploy|pipelines|data_prep|crossmae|tests|benchmarks|requirements)/[\w./-]*")
ENTRY_POINTS = {name: spec.split(":")[0] for name, spec in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()}
PROJECT_MODULES = set(ENTRY_POINTS.values()) | {"pipelines.finetune", "pipelines.demo"}


class CommandError(Exception):
    """A docs command that would fail as written."""


# ---------------------------------------------------------------- extraction

def fenced_blocks(doc: str) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, start, body = line.strip()[3:].strip(), n + 1, []
            else:
                blocks.append((lang, start, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def logical_lines(start: int, text: str) -> list[tuple[int, str]]:
    """Lines joined at trailing backslashes, with the number of their first line."""
    out, pending, first = [], "", start
    for n, line in enumerate(text.splitlines(), start):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


def simple_commands(line: str, home: str = "~") -> list[tuple[dict, list[str]]]:
    """(environment prefix, argv) of each command of a shell line (split at && || ; |)."""
    substitution = re.fullmatch(r"\s*\w+=\$\((.*)\)\s*(#.*)?", line)  # var=$(command): check the command
    lex = shlex.shlex(substitution.group(1) if substitution else line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    groups: list[list[str]] = [[]]
    for token in lex:
        if token in ("&&", "||", ";", "|"):
            groups.append([])
        elif set(token) <= set("();<>|&"):
            raise CommandError(f"unsupported shell syntax {token!r} in: {line.strip()}")
        else:
            groups[-1].append(expand(token, home))
    out = []
    for argv in filter(None, groups):
        env = {}
        while argv and re.match(r"[A-Za-z_]\w*=", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        if argv:
            out.append((env, argv))
    return out


def expand(token: str, home: str) -> str:
    def value(m):
        if m.group(1) not in VARIABLES:
            raise CommandError(f"${m.group(1)}: add a sample value to VARIABLES in tests/test_readme.py")
        return VARIABLES[m.group(1)]
    token = re.sub(r"\$\{?(\w+)\}?", value, token)
    return home + token[1:] if token.startswith("~/") else token


def docs_commands() -> list[tuple[str, str]]:
    """(doc:line, line) of every command line in a ```bash block."""
    return [(f"{doc}:{n}", line) for doc in DOCS for lang, start, text in fenced_blocks(doc) if lang == "bash"
            for n, line in logical_lines(start, text) if line.strip() and not line.strip().startswith("#")]


COMMANDS = docs_commands()


# ---------------------------------------------------------------- checking one command

class _Parsed(BaseException):  # BaseException: passes through the CLIs' `except Exception`
    def __init__(self, prog: str, namespace: argparse.Namespace):
        super().__init__(prog)
        self.prog, self.namespace = prog, namespace


def parse_only(target: str, argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Run a module's main() (or a script, as __main__) until its argparse parser returns, and stop
    there: exactly the CLI's own parser and dispatch (crossmae-eval finetune -> pipelines.finetune), no job.
    A program that worked before parsing its arguments would run here: entry points parse first."""
    if target.endswith(".py"):
        def main(args):
            with mock.patch.object(sys, "argv", [target, *args]):
                runpy.run_path(target, run_name="__main__")
    else:
        main = importlib.import_module(target).main
    original = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise _Parsed(self.prog, original(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after_parsing), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except _Parsed as parsed:
            return parsed.prog, parsed.namespace
        except SystemExit as e:
            code = e.code
    raise CommandError(f"{target} {shlex.join(argv)}: exit {code}: {err.getvalue().strip()}")


def check_parsed(prog: str, args: argparse.Namespace) -> list:
    """The checks each CLI makes after parsing, before any work; returns the pretraining configs."""
    try:
        if prog == "crossmae-pretrain":
            cfg = config_loader.load(PretrainConfig, args.config, args.overrides)
            cfg.validate()
            if not cfg.data.train:
                raise CommandError("crossmae-pretrain: data.train is not set")
            return [cfg]
        if prog == "crossmae-eval finetune":
            from pipelines.eval.finetune import FinetuneConfig
            config_loader.load(FinetuneConfig, args.config, args.overrides).validate()
        elif prog == "crossmae-prep":
            from data_prep.cli import _door_problem
            if problem := _door_problem(args):
                raise CommandError(f"crossmae-prep: {problem}")
        elif prog == "crossmae-export":
            from pipelines.checkpoints.export import check_select
            check_select(args.select)
    except (config_loader.ConfigError, ValueError) as e:
        raise CommandError(f"{prog}: {e}") from None
    return []


def check_module(module: str, argv: list[str]) -> list:
    if module not in PROJECT_MODULES:
        if importlib.util.find_spec(module) is None:
            raise CommandError(f"python -m {module}: no such module")
        return []
    return check_parsed(*parse_only(module, argv))


def check_deepspeed(argv: list[str]) -> list:
    from deepspeed.launcher.runner import parse_args  # what the `deepspeed` script calls
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parse_args(argv)
    except SystemExit:
        raise CommandError(f"deepspeed {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}") from None
    if not ns.module:
        raise CommandError(f"deepspeed starts the script {ns.user_script}: the project runs as --module pipelines.X")
    return check_module(ns.user_script, ns.user_args)


def check_torchrun(argv: list[str]) -> list:
    from torch.distributed.run import get_args_parser  # what the `torchrun` script parses with
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = get_args_parser().parse_args(argv)
    except SystemExit:
        raise CommandError(f"torchrun {shlex.join(argv)}: {err.getvalue().strip().splitlines()[-1]}") from None
    if not ns.module:
        raise CommandError(f"torchrun starts the script {ns.training_script}: the project runs as -m pipelines.X")
    return check_module(ns.training_script, ns.training_script_args)


def run_tool(argv: list[str], cwd, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise CommandError(f"{shlex.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def check(env: dict, argv: list[str], home: str) -> list:
    """Check one command up to argument parsing; returns the pretraining configs it starts."""
    tool = argv[0]
    for path in REPO_PATH.findall(" ".join(argv)):
        if not (ROOT / path).exists():
            raise CommandError(f"{tool}: no such file in the repository: {path}")
    if tool in ENTRY_POINTS:
        return check_module(ENTRY_POINTS[tool], argv[1:])
    if os.path.basename(tool) in ("python", "python3"):
        if argv[1:2] == ["-m"]:
            return check_module(argv[2], argv[3:])
        if argv[1].endswith(".py") and os.path.isfile(argv[1]):  # a repository script: its own parser
            return check_parsed(*parse_only(argv[1], argv[2:]))
        raise CommandError(f"{shlex.join(argv)}: neither python -m MODULE nor a script of the repository")
    if tool == "deepspeed":
        return check_deepspeed(argv[1:])
    if tool == "torchrun":
        return check_torchrun(argv[1:])
    if tool in SCRIPTS:  # dry run: the launcher command it would exec, checked as a deepspeed line
        proc = run_tool(["bash", tool, *argv[1:]], os.getcwd(), {**env, "DRY_RUN": "1", "DEEPSPEED": "deepspeed"})
        printed = proc.stderr.strip().splitlines()[-1].removeprefix("launch.sh: ")
        return check_deepspeed(shlex.split(printed)[1:])
    if tool == "make":
        proc = run_tool(["make", "-n", "-C", str(ROOT), *argv[1:]], ROOT, env)
        return [cfg for _, line in logical_lines(1, proc.stdout)  # the recipe's project commands, checked too
                if re.search(r"python3? (-m (pipelines|data_prep)\.|benchmarks/\S+\.py)", line)
                for e, a in simple_commands(line, home) for cfg in check(e, a, home)]
    if tool == "cp":
        if not os.path.exists(argv[-2]):
            raise CommandError(f"cp: no such file {argv[-2]}")
        return []
    if tool in SYNTAX_ONLY:
        return check_sbatch(argv, home) if tool == "sbatch" else []
    raise CommandError(f"{tool}: no check for this program; add a handler or a SYNTAX_ONLY entry (with the reason)")


def check_sbatch(argv: list[str], home: str) -> list:
    configs = []
    for i, arg in enumerate(argv):
        if arg == "--wrap":
            configs += [cfg for e, a in simple_commands(argv[i + 1], home) for cfg in check(e, a, home)]
        if arg in SBATCH_OVERRIDES:
            exported = dict(kv.split("=", 1) for flag in argv if flag.startswith("--export=")
                            for kv in flag.removeprefix("--export=").split(",") if "=" in kv)
            config = exported.get("CONFIG", "deploy/configs/crossmae_vit_base_in1k.yaml")  # the script's default
            configs += check_parsed("crossmae-pretrain", argparse.Namespace(config=config, overrides=argv[i + 1:]))
    return configs


def check_line(line: str, home: str) -> list:
    return [cfg for env, argv in simple_commands(line, home) for cfg in check(env, argv, home)]


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A working directory that sees the repository (symlinks) and where the docs' set-up
    commands (cp ...) have run; `~` is its home/."""
    box = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name != ".git":
            (box / entry.name).symlink_to(entry)
    (box / "home").mkdir()
    for _, line in COMMANDS:
        with contextlib.suppress(CommandError, OSError):  # reported by test_docs_command_parses
            for _, argv in simple_commands(line, str(box / "home")):
                if argv[0] == "cp":
                    shutil.copy(box / argv[-2], box / argv[-1])
    return box


@pytest.fixture
def in_sandbox(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    for key in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):  # crossmae-prep reads them; the docs set none
        monkeypatch.delenv(key, raising=False)
    return str(sandbox / "home")


def test_every_fenced_block_names_its_language():
    """Commands live in ```bash blocks; an untagged block could hide an untested command."""
    for doc in DOCS:
        for lang, start, _ in fenced_blocks(doc):
            assert lang in LANGUAGES, f"{doc}:{start - 1}: fence language {lang!r}, use one of {sorted(LANGUAGES)}"


def test_docs_have_commands_of_every_kind():
    tools = {argv[0] for _, line in COMMANDS for _, argv in simple_commands(line)}
    assert {"make", "deepspeed", "torchrun", "kubectl", "sbatch", *ENTRY_POINTS} <= tools, tools


@pytest.mark.parametrize("where,line", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_docs_command_parses(where, line, in_sandbox):
    try:
        check_line(line, in_sandbox)
    except CommandError as e:
        pytest.fail(f"{where}: {e}", pytrace=False)


@pytest.mark.parametrize("doc", DOCS)
def test_bash_blocks_pass_bash_n_and_shellcheck(doc, tmp_path):
    blocks = [text for lang, _, text in fenced_blocks(doc) if lang == "bash"]
    script = tmp_path / "blocks.sh"
    script.write_text("#!/bin/bash\n" + "\n".join(blocks) + "\n")
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian package shellcheck); bash -n passed")
    # SC2154: the docs' variables ($I, $i) are the reader's to set
    proc = subprocess.run(["shellcheck", "-s", "bash", "-e", "SC2154", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_compile(doc):
    for lang, start, text in fenced_blocks(doc):
        if lang == "python":
            compile(text, f"{doc}:{start}", "exec")


def test_short_training_examples_get_past_their_warm_up(in_sandbox):
    """A docs run with run.max_steps must train: past its warm-up and near its peak lr at the
    last step, on the digits set (1,500 images) as on ImageNet, on 1 or 2 ranks (the old
    example ended inside a 40-epoch warm-up, at lr ~1e-7: loss 2.213 -> 2.200)."""
    from pipelines.train.optim import lr_at
    from pipelines.checkpoints.run_checks import short_run_warning

    short = [(where, cfg) for where, line in COMMANDS if "run.max_steps" in line
             for cfg in check_line(line, in_sandbox) if cfg.run.max_steps]
    assert short, "no docs example stops early with run.max_steps"
    for where, cfg in short:
        for num_samples in (1_500, 1_281_167):
            for world in (1, 2):
                derived = cfg.schedule(num_samples, world)
                assert short_run_warning(cfg, derived, 0) is None, f"{where}: {short_run_warning(cfg, derived, 0)}"
                end = derived.max_steps * derived.effective_batch
                lr = lr_at(end, derived.lr, derived.warmup_samples, derived.total_samples, cfg.optim.min_lr)
                assert lr >= 0.5 * derived.lr, f"{where}: lr {lr:.3g} at the last step, peak {derived.lr:.3g}"


BROKEN = [  # each must be refused: the checks above can fail
    "deepspeed --num_gpus 8 -m pipelines.pretrain data.train=x.json",  # the old README line
    "deepspeed --num_gpus 8 pipelines/pretrain.py data.train=x.json",
    "torchrun --nproc_per_node 2 pipelines/pretrain.py data.train=x.json",
    "crossmae-pretrain data.train=x.json optim.warmup_epoch=0",
    "torchrun --nproc_per_node 2 -m pipelines.pretrain model.preset=nope data.train=x.json",
    "crossmae-pretrain --config deploy/configs/missing.yaml data.train=x.json",
    "crossmae-export runs/r1 exports/r1 --select sometimes",
    "crossmae-prep folder /data/flowers /data/flowers/wds",
    "crossmae-eval knn s3://b/exports/r1",
    "crossmae-eval finetune s3://b/e data.train=t data.val=v optim.nope=1",
    "python -m pipelines.no_such_module",
    "python benchmarks/loader_gpu.py --device cuda --workers four",
    "make no-such-target",
    "make gpu-check GPU_CHECK_ARGS=--no-such-option",  # the recipe's command is parsed too
    "kubectl apply -f deploy/k8s/missing.yaml",
    'sbatch --wrap "crossmae-eval knn --train T s3://b/exports/r1"',
    "sbatch --export=ALL,CONFIG=deploy/configs/crossmae_vit_base_in1k.yaml deploy/slurm/pretrain.sbatch run.nope=1",
    "NUM_GPUS=2 deploy/deepspeed/launch.sh --local deploy/configs/crossmae_vit_base_in1k.yaml optim.nope=1",
    "frobnicate --now",
    "crossmae-prep imagenet /data/imagenet s3://b/in1k --worker-index $UNSET",
]


def test_repository_scripts_are_parsed_by_their_own_parser(in_sandbox):
    """Scripts quoted in the docs' prose (README: loaders) take the same path as block commands."""
    assert check_line("python benchmarks/loader_gpu.py --device cuda --workers 4 --json out.json", in_sandbox) == []


@pytest.mark.parametrize("line", BROKEN)
def test_broken_commands_are_refused(line, in_sandbox):
    with pytest.raises(CommandError):
        check_line(line, in_sandbox)
