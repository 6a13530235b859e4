"""Reading a config: YAML, `--set` overrides, validation, and errors a user can act on.

Every error is one line with the file and line (or the `--set` flag) and, for a misspelt
key, the nearest valid one: `c.yaml:7: unknown key 'train.lr_rate' (did you mean 'train.lr'?)`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmctl.config.schema import Config, section_type
from llmctl.errors import ConfigError

def _all_keys(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel] | None]:
    out: dict[str, type[BaseModel] | None] = {}
    for name, field in model.model_fields.items():
        sub = section_type(field.annotation)
        out[prefix + name] = sub
        if sub is not None:
            out.update(_all_keys(sub, prefix + name + "."))
    return out


def _suggest(loc: tuple, model: type[BaseModel] = Config) -> str:
    """'did you mean' for an unknown key, among its siblings (and any section's keys)."""
    parent = model
    for part in loc[:-1]:
        field = parent.model_fields.get(str(part)) if parent else None
        parent = section_type(field.annotation) if field else None
    bad = str(loc[-1])
    if parent is not None:
        match = difflib.get_close_matches(bad, list(parent.model_fields), n=1, cutoff=0.6)
        if match:
            return ".".join(map(str, loc[:-1] + (match[0],)))
    full = ".".join(map(str, loc))
    match = difflib.get_close_matches(full, list(_all_keys(model)), n=1, cutoff=0.75)
    return match[0] if match else ""


def _line_of(text: str | None, loc: tuple) -> int | None:
    """1-based line of a key path in the YAML text, if it is there."""
    if not text:
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if key.value == str(part):
                line, node = key.start_mark.line + 1, value
                break
        else:
            break
    return line


def _first_duplicate_key(text: str) -> tuple[str, int, int] | None:
    """(dotted key, first line, second line) of a key given twice in one mapping, if any."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None

    def walk(node, prefix: str):
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                name = str(k.value)
                line = k.start_mark.line + 1
                key = f"{prefix}{name}"
                if name in seen and name != "<<":
                    return key, seen[name], line
                seen[name] = line
                found = walk(v, key + ".")
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                found = walk(item, prefix)
                if found:
                    return found
        return None

    return walk(root, "") if root is not None else None


def _format_validation(err: ValidationError, source: str, text: str | None, overridden: set[str]) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(map(str, loc)) or "<root>"
        line = _line_of(text, loc)
        if key in overridden:
            where = f"--set {key}"
        else:
            where = f"{source}:{line}" if line else source
        if e["type"] == "extra_forbidden":
            hint = _suggest(loc)
            msg = f"{where}: unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
        elif e["type"] == "value_error":
            msg = f"{where}: {e['msg'].removeprefix('Value error, ')}"
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            msg = f"{where}: {key}: {e['msg']}{got_s}"
        msgs.append(msg)
    return "; ".join(msgs)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}; use dotted keys like train.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply `--set` overrides, validate. Raises ConfigError with one line."""
    overrides = overrides or []
    text = None
    source = "<defaults>"
    data: Any = {}
    if path is not None:
        p = Path(path)
        source = str(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not valid UTF-8") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
        dup = _first_duplicate_key(text)
        if dup:
            key, first, second = dup
            raise ConfigError(f"{source}:{second}: duplicate key '{key}' (first at line {first}): YAML keeps only the last one; remove one of them")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections (run, data, model, ...)")
    data = apply_overrides(data, overrides)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        overridden = {".".join(parse_override(o)[0]) for o in overrides}
        raise ConfigError(_format_validation(e, source, text, overridden)) from None
    cfg._source = source
    cfg._overrides = tuple(overrides)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)

