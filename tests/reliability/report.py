"""Write RELIABILITY.md from a run of the reliability tests.

    python -m tests.reliability.report                 # runs pytest tests/reliability, writes ./RELIABILITY.md
    python -m tests.reliability.report --out R.md -- -k network     # extra pytest arguments after --

Each test tells the report what it did with pytest's ``record_property``: ``fault`` (what was
injected), ``trials`` (how often: faults injected, runs, inputs), ``checked`` and ``result``.
A test that records none of them gets a row from its docstring's first line (recorded as
``doc`` by tests/reliability/conftest.py). The outcome comes from pytest's JUnit XML.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = "tests/reliability"


@dataclass
class Row:
    test: str  # file::name[params]
    outcome: str  # passed | failed | error | skipped
    seconds: float
    props: dict[str, str] = field(default_factory=dict)
    message: str = ""


def parse_junit(path: str) -> list[Row]:
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = el.get("message") or (el.text or "").strip()
                break
        module = case.get("classname", "").rsplit(".", 1)[-1]
        rows.append(Row(f"{module}::{case.get('name')}", outcome, float(case.get("time") or 0), props, message))
    return rows


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table_row(r: Row) -> str:
    p = r.props
    fault = p.get("fault") or p.get("doc") or r.test
    result = p.get("result", "")
    if r.outcome != "passed":
        first = (r.message.splitlines() or [""])[0][:200]
        result = f"**{r.outcome.upper()}**{': ' + first if first else ''}" + (f" (recorded: {result})" if result else "")
    elif not result:
        result = "passed"
    cells = [fault, p.get("trials", "1" if r.outcome == "passed" else "-"), p.get("checked", "see the test"), result, f"`{r.test}`"]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render(rows: list[Row], command: str, started: str, seconds: float) -> str:
    counts = {k: sum(r.outcome == k for r in rows) for k in ("passed", "failed", "error", "skipped")}
    lines = [
        "# Reliability report",
        "",
        "Faults injected for real (network faults through a proxy in front of a real S3 server, killed",
        "processes, damaged data, bad input, untrusted files) and what survived them. Generated; do not edit:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- date: {started}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        (f"- tests: {len(rows)}: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
         f"{counts['skipped']} skipped or xfailed ({seconds:.0f} s)"),
        "",
        "| fault | how often | what was checked | result | test |",
        "|---|---|---|---|---|",
        *(table_row(r) for r in rows),
        "",
        "\"how often\": faults injected (network rows: counted by the proxy), runs or inputs tried, as each test",
        "records it. Sources: `tests/reliability/` (the fault proxy: `fault_proxy.py`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.reliability.report", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "RELIABILITY.md"), help="default: RELIABILITY.md at the root")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="crossmae-reliability-") as tmp:
        xml = os.path.join(tmp, "junit.xml")
        # test paths among the extra arguments replace the default tests/reliability
        paths = [a for a in args.pytest_args if a.startswith(TESTS)]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={xml}", *([] if paths else [TESTS]), *args.pytest_args]
        t0 = time.monotonic()
        code = subprocess.call(cmd, cwd=ROOT)
        seconds = time.monotonic() - t0
        if not os.path.exists(xml):
            print(f"report: pytest wrote no results (exit {code}); {args.out} not written", file=sys.stderr)
            return code or 1
        rows = parse_junit(xml)
    shown = " ".join(["python -m tests.reliability.report", *(["--", *args.pytest_args] if args.pytest_args else [])])
    with open(args.out, "w") as f:
        f.write(render(rows, shown, started, seconds))
    print(f"report: {len(rows)} tests, {sum(r.outcome == 'passed' for r in rows)} passed -> {args.out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
