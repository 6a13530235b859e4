"""lm-eval benchmark tasks on the model already in memory (`eval.tasks`).

`lm_eval.simple_evaluate` runs with an `HFLM` wrapping the evaluated model and its tokenizer (no
reload), with lm-eval's own defaults otherwise, so the numbers are those of
`lm_eval --model hf --model_args pretrained=DIR` on the same model and task. A task is a name
from lm-eval's registry (its data comes from the Hugging Face hub or cache) or a local task YAML
file or directory (`dataset_path: json` with `dataset_kwargs.data_files`), which works offline.

Results: per task, every metric with its stderr (lm-eval's `acc,none` becomes `acc`; another
filter keeps its name: `exact_match,strict-match`), the questions scored and the shots.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from llmctl.errors import ConfigError, DataError

_YAML_SUFFIXES = (".yaml", ".yml")


def _lenient_yaml(text: str):
    """A task YAML read safely: lm-eval's own tags (`!function utils.process`) become None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_tasks(path: Path) -> list[str]:
    """The task (or group) names a YAML file defines; [] for a file that is not a task."""
    try:
        doc = _lenient_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 (any YAML error is the user's file)
        raise ConfigError(f"{path}: not a readable task YAML ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        return []
    names = doc.get("task") or doc.get("group")
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) and "group" in doc else []


def _check_data_files(path: Path) -> None:
    """A local task's data files exist: lm-eval reads relative ones from the working directory."""
    doc = _lenient_yaml(path.read_text(encoding="utf-8")) or {}
    files = ((doc.get("dataset_kwargs") or {}) if isinstance(doc, dict) else {}).get("data_files")
    if not files:
        return
    listed = files.values() if isinstance(files, dict) else [files]
    for entry in listed:
        for f in [entry] if isinstance(entry, str) else entry:
            if "://" not in f and not any(ch in f for ch in "*?[") and not Path(f).exists():
                where = "" if Path(f).is_absolute() else f" (relative data files are read from the working directory, {os.getcwd()})"
                raise DataError(f"{path}: dataset_kwargs.data_files {f!r} not found{where}: write the path absolute")


def resolve(specs: list[str]) -> tuple[list[str], list[str], bool]:
    """(task names, folders to include, whether lm-eval's registry is needed) for `eval.tasks`."""
    names, include = [], []
    registry = False
    for spec in specs:
        p = Path(spec).expanduser()
        if p.suffix in _YAML_SUFFIXES or p.is_dir() or os.sep in spec:
            if not p.exists():
                raise ConfigError(f"eval.tasks: {spec} does not exist (a task name has no '/' or .yaml; a local task is a YAML file or folder)")
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in _YAML_SUFFIXES)
            found = [n for f in files for n in _yaml_tasks(f)]
            if not found:
                raise ConfigError(f"eval.tasks: {spec} defines no task (a task YAML has a `task:` key)")
            for f in files:
                _check_data_files(f)
            names += found
            include.append(str((p.parent if p.is_file() else p).resolve()))
        else:
            names.append(spec)
            registry = True
    return list(dict.fromkeys(names)), list(dict.fromkeys(include)), registry


def _task_manager(include: list[str], registry: bool):
    from lm_eval.tasks import TaskManager

    # lm-eval's registry is ~1,000 YAML files (tens of seconds to index): only when a name needs it.
    return TaskManager(verbosity="ERROR", include_path=include or None, include_defaults=registry)


def _load_error(err: Exception, names: list[str], tm) -> Exception:
    """One line for what lm-eval raises while loading tasks: an unknown name, data not cached offline."""
    text = str(err).strip().strip('"')
    if isinstance(err, KeyError):
        bad = next((n for n in names if n in text), text)
        near = difflib.get_close_matches(bad, list(getattr(tm, "all_tasks", []) or []), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else " (`lm_eval ls tasks` lists them)"
        return ConfigError(f"eval.tasks: {bad!r} is not an lm-eval task or task YAML{hint}")
    if isinstance(err, (ConnectionError, OSError)) or "offline" in text.lower() or "couldn't reach" in text.lower():
        return DataError(
            f"eval.tasks {', '.join(names)}: the task's dataset is not in the Hugging Face cache and the hub cannot be reached "
            f"({text.splitlines()[0][:200]}): run the eval once online (without HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) to cache it, "
            "or point eval.tasks at a local task YAML (dataset_path: json)")
    return DataError(f"eval.tasks {', '.join(names)}: lm-eval could not load the task: {type(err).__name__}: {text.splitlines()[0][:300]}")


def _flatten(res: dict) -> dict[str, dict]:
    """lm-eval's results -> {task: {metric: value, metric_stderr: value, samples, num_fewshot}}."""
    out: dict[str, dict] = {}
    rows = {**(res.get("results") or {}), **(res.get("groups") or {})}
    for task, metrics in rows.items():
        rec: dict = {}
        for key, value in metrics.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            rec[name] = value  # as lm-eval reports it: equal to its CLI's numbers
        n = (res.get("n-samples") or {}).get(task) or {}
        if n:
            rec["samples"] = n.get("effective", n.get("original"))
        if task in (res.get("n-shot") or {}):
            rec["num_fewshot"] = res["n-shot"][task]
        out[task] = rec
    return out


def run_tasks(model, tok, specs: list[str], *, num_fewshot: int | None, limit: int | None, batch_size: int, con=None) -> dict:
    """lm-eval on `model` and `tok` in memory: {task: {metric: value, ...}}. lm-eval's seeds and
    defaults are kept, so the numbers are its CLI's."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ConfigError("eval.tasks needs lm-eval: pip install 'llmctl[eval]'") from None
    names, include, registry = resolve(specs)
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    tm = _task_manager(include, registry)
    try:  # loaded once here to turn a bad name or uncached data into one line; simple_evaluate loads again
        tm.load(names)
    except Exception as err:  # noqa: BLE001 (lm-eval raises KeyError, ConnectionError, ValueError...)
        raise _load_error(err, names, tm) from None
    if con is not None:
        con.step(f"lm-eval tasks: {', '.join(names)}" + (f" (the first {limit} questions of each)" if limit else ""))
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm, log_samples=False, verbosity="ERROR")
    return _flatten(res)


def headline(tasks: dict[str, dict], prefix: str = "") -> dict:
    """`tasks.<task>.<metric>` for each numeric metric (not its stderr): what thresholds gate."""
    return {f"{prefix}tasks.{t}.{m}": v for t, rec in tasks.items() for m, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in m and m not in ("samples", "num_fewshot")}
