"""Shared by the benchmark scripts: print the result and keep it, with the command, as JSON."""
from __future__ import annotations

import json
import os
import sys


def emit(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=1))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(result, command=" ".join(sys.argv)), f, indent=1)
