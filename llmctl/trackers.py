"""Experiment trackers (`train.report_to`: tensorboard, mlflow, wandb).

The Trainer's own integrations log the metrics as they happen; this module points them at the
run directory and at one tracker run per training run (a resumed or restarted run continues the
same one), then adds what the Trainer does not send: the resolved config, the lineage, the
final numbers and, once `export` has written it, the model card.

- tensorboard: events in RUN/train/tensorboard.
- mlflow: `MLFLOW_TRACKING_URI` or, by default, a sqlite store RUN/train/mlflow.db (MLflow 3
  refuses its file store); open it with `mlflow ui --backend-store-uri sqlite:///RUN/train/mlflow.db`.
- wandb: offline into RUN/train/wandb when there is no WANDB_API_KEY (`wandb sync` uploads it later).

The tracker runs' ids are kept in RUN/train/trackers.json. Only rank 0 talks to a tracker.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from llmctl.errors import ConfigError
from llmctl.rundir import RunDir, atomic_write_json

TRACKERS = "trackers.json"
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "trackers"), "wandb": ("wandb", "trackers")}


def wanted(tcfg) -> list[str]:
    """train.report_to, plus tensorboard for the older `train.tensorboard: true`."""
    names = list(dict.fromkeys(tcfg.report_to))
    if tcfg.tensorboard and "tensorboard" not in names:
        names.insert(0, "tensorboard")
    return names


def check_installed(names: list[str]) -> None:
    """A missing package is a config error (exit 2) naming the extra to install, before any work."""
    for name in names:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name} is not installed: pip install 'llmctl[{extra}]' (or remove {name})")


def _path(rd: RunDir) -> Path:
    return rd.stage_dir("train") / TRACKERS


def ids(rd: RunDir) -> dict:
    try:
        return json.loads(_path(rd).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def mlflow_uri(rd: RunDir) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(rd.stage_dir('train') / 'mlflow.db').resolve()}"


def start(names: list[str], cfg, rd: RunDir, resumed: bool) -> dict:
    """Before the Trainer is built (rank 0): environment for its integrations, and the tracker runs
    (new ones for a fresh start, the recorded ones when resuming). Returns the ids."""
    check_installed(names)
    train_dir = rd.stage_dir("train").resolve()
    known = ids(rd) if resumed else {}
    if "tensorboard" in names:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(train_dir / "tensorboard"))
        known["tensorboard"] = {"dir": os.environ["TENSORBOARD_LOGGING_DIR"]}
    if "mlflow" in names:
        known["mlflow"] = _mlflow_run(cfg, rd, known.get("mlflow"))
        os.environ["MLFLOW_TRACKING_URI"] = known["mlflow"]["uri"]
        os.environ["MLFLOW_RUN_ID"] = known["mlflow"]["run_id"]  # the Trainer's callback continues this run
    if "wandb" in names:
        import uuid

        known.setdefault("wandb", {"id": uuid.uuid4().hex[:12], "project": os.environ.get("WANDB_PROJECT", "llmctl")})
        if not os.environ.get("WANDB_API_KEY"):
            os.environ.setdefault("WANDB_MODE", "offline")  # no account: keep it on disk, `wandb sync` later
        os.environ.setdefault("WANDB_DIR", str(train_dir))
        os.environ.setdefault("WANDB_PROJECT", known["wandb"]["project"])
        os.environ["WANDB_RUN_ID"] = known["wandb"]["id"]
        os.environ["WANDB_RESUME"] = "allow"
        os.environ.setdefault("WANDB_NAME", cfg.run.name)
        os.environ.setdefault("WANDB_SILENT", "true")
        known["wandb"]["dir"] = os.environ["WANDB_DIR"]
    atomic_write_json(_path(rd), known)
    return known


def _mlflow_run(cfg, rd: RunDir, old: dict | None) -> dict:
    """The MLflow run for this training run: the recorded one, or a new one in experiment run.name."""
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(rd)
    if old and old.get("uri") == uri:
        return old
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.run.name)
    # The default store keeps its artifacts in the run too (MLflow's default is ./mlruns in the cwd).
    where = (rd.stage_dir("train") / "mlflow-artifacts").resolve().as_uri() if not os.environ.get("MLFLOW_TRACKING_URI") else None
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.run.name, artifact_location=where)
    run = client.create_run(exp_id, run_name=cfg.run.name, tags={"llmctl.run_dir": str(rd.root.resolve())})
    return {"uri": uri, "run_id": run.info.run_id, "experiment": cfg.run.name}


def attach(rd: RunDir, files: dict[str, Path], numbers: dict, prefix: str = "final") -> None:
    """Add files (name -> path) and numbers (logged as PREFIX/name) to the tracker runs of this run's
    training: train's final numbers, eval's results, export's model card. No-op without trackers."""
    known = {k: v for k, v in ids(rd).items() if importlib.util.find_spec(PACKAGES[k][0]) is not None}
    numbers = {f"{prefix}/{k}": float(v) for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    files = {k: p for k, p in files.items() if Path(p).is_file()}
    if not (files or numbers):
        return
    if "mlflow" in known:
        _attach_mlflow(known["mlflow"], files, numbers)
    if "wandb" in known:
        _attach_wandb(known["wandb"], files, numbers)
    if "tensorboard" in known:
        _attach_tensorboard(Path(known["tensorboard"]["dir"]), files, numbers)


def _attach_mlflow(rec: dict, files: dict[str, Path], numbers: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(rec["uri"])
    for name, p in files.items():
        client.log_artifact(rec["run_id"], str(p), artifact_path=name)
    for k, v in numbers.items():
        client.log_metric(rec["run_id"], k, v)
    client.set_terminated(rec["run_id"])


def _attach_wandb(rec: dict, files: dict[str, Path], numbers: dict) -> None:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.run or wandb.init(id=rec["id"], project=rec["project"], dir=rec["dir"], resume="allow", mode=mode)
    run.summary.update(numbers)
    if files:
        art = wandb.Artifact(f"llmctl-{run.id}", type="llmctl-run")
        for name, p in files.items():
            art.add_file(str(p), name=f"{name}/{Path(p).name}")
        run.log_artifact(art)
    wandb.finish()


def _attach_tensorboard(logdir: Path, files: dict[str, Path], numbers: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as w:
        for name, p in files.items():
            w.add_text(name, "```\n" + Path(p).read_text(encoding="utf-8", errors="replace")[:100_000] + "\n```")
        for k, v in numbers.items():
            w.add_scalar(k, v)
