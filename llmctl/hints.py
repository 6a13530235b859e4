"""The commands that messages print. Run as printed, each does what its message says.

A command is rebuilt from what the user gave: the config file, its `--set` overrides in order,
and `--run-dir` when it is not the config's own; quoted for the shell with `shlex.join`. A
command that promises to resume or finish a stage never carries `--force` (it would start over).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Iterable


def command(verb: str, cfg, root: str | Path | None = None, *flags: str) -> str:
    """`llmctl VERB CONFIG [--set K=V]... [--run-dir DIR] [FLAGS]` for the run `cfg` describes."""
    args = ["llmctl", verb, cfg.source]
    for item in cfg.overrides:
        args += ["--set", item]
    if root is not None and Path(root) != cfg.run.root:
        args += ["--run-dir", str(root)]
    return shlex.join([*args, *flags])


def set_flags(pairs: Iterable[tuple[str, Any]]) -> str:
    """`--set K=V ...` that give each key this value again (values written as YAML reads them back)."""
    args: list[str] = []
    for key, value in pairs:
        args += ["--set", f"{key}={_yaml_value(value)}"]
    return shlex.join(args)


def _yaml_value(v: Any) -> str:
    import json

    import yaml

    if isinstance(v, str):
        try:
            if yaml.safe_load(v) == v:
                return v
        except yaml.YAMLError:
            pass
        return json.dumps(v)  # a string YAML would read as something else ("1e-3", "null", "a: b")
    return json.dumps(v)
