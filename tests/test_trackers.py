"""`train.report_to` (issue #30): the metrics each tracker holds, read back through that library's own
reader, equal the Trainer's own `trainer_state.json`; the config and lineage go with them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import build_prepared_run, invoke_cli, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.rundir import RunDir


def _run(tmp_path, report_to: list[str], env: dict | None = None) -> tuple[Path, RunDir]:
    path = write_config(tmp_path / "cfg.yaml", tiny_config_dict(tmp_path / "run", train={"max_steps": 4, "report_to": report_to}))
    cfg = load_config(path)
    rd = build_prepared_run(Path(cfg.run.dir), cfg)
    r = invoke_cli("train", str(path), env=env)
    assert r.returncode == 0, r.stderr
    return path, rd


def _trainer_state(rd: RunDir, key: str = "loss") -> list[tuple[int, float]]:
    state = json.loads((rd.checkpoint_dir(4) / "trainer_state.json").read_text())
    return [(h["step"], h[key]) for h in state["log_history"] if key in h]


def _close(a: list[tuple[int, float]], b: list[tuple[int, float]], tol: float = 1e-6) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(abs(x - y) <= tol * max(1.0, abs(x)) for (_, x), (_, y) in zip(a, b))


def test_tensorboard_and_wandb_offline_hold_the_trainer_state(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    path, rd = _run(tmp_path, ["tensorboard", "wandb"], env={"WANDB_API_KEY": None, "WANDB_MODE": None})
    want = _trainer_state(rd)
    assert [s for s, _ in want] == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(rd.stage_dir("train") / "tensorboard"))
    acc.Reload()
    assert _close([(e.step, e.value) for e in acc.Scalars("train/loss")], want)  # float32 in the event file
    assert "config/text_summary" in acc.Tags()["tensors"] and "lineage/text_summary" in acc.Tags()["tensors"]

    # eval's results join the same tracker runs
    r = invoke_cli("eval", str(path), "--set", "eval.generation=false", "--set", "eval.compare_init=false", env={"WANDB_API_KEY": None, "WANDB_MODE": None})
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(rd.stage_dir("train") / "tensorboard"))
    acc.Reload()
    assert acc.Scalars("eval/perplexity")[0].value == pytest.approx(rd.manifest("eval")["headline"]["perplexity"], rel=1e-6)

    ids = json.loads((rd.stage_dir("train") / "trackers.json").read_text())
    history, artifacts = _wandb_offline(rd.stage_dir("train"), ids["wandb"]["id"])
    got = [(int(h["train/global_step"]), h["train/loss"]) for h in history if "train/loss" in h]
    assert _close(got, want, tol=0)
    assert {"config/config.yaml", "lineage/lineage.json"} <= artifacts


def test_mlflow_sqlite_store_holds_the_trainer_state(tmp_path):
    pytest.importorskip("mlflow")  # the 'trackers' extra: it pins pyarrow below 26, so it stays out of 'dev'
    path, rd = _run(tmp_path, ["mlflow"], env={"MLFLOW_TRACKING_URI": None})
    from mlflow.tracking import MlflowClient

    ids = json.loads((rd.stage_dir("train") / "trackers.json").read_text())["mlflow"]
    assert ids["uri"] == f"sqlite:///{(rd.stage_dir('train') / 'mlflow.db').resolve()}"
    client = MlflowClient(ids["uri"])
    got = [(m.step, m.value) for m in sorted(client.get_metric_history(ids["run_id"], "loss"), key=lambda m: m.step)]
    assert _close(got, _trainer_state(rd), tol=0)
    run = client.get_run(ids["run_id"])
    assert run.data.metrics["final/val_loss"] == pytest.approx(rd.manifest("train")["headline"]["val_loss"], abs=1e-4)
    assert {a.path for a in client.list_artifacts(ids["run_id"])} == {"config", "lineage"}
    assert (rd.stage_dir("train") / "mlflow-artifacts").is_dir()  # in the run, not ./mlruns


def test_a_missing_tracker_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    path = write_config(tmp_path / "cfg.yaml", tiny_config_dict(tmp_path / "run", train={"report_to": ["mlflow"]}))
    cfg = load_config(path)
    build_prepared_run(Path(cfg.run.dir), cfg)
    r = invoke_cli("train", str(path))
    assert r.returncode == 2 and "pip install 'llmctl[trackers]'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "train").exists()


def _wandb_offline(train_dir: Path, run_id: str) -> tuple[list[dict], set[str]]:
    """The history rows and artifact file names of an offline W&B run, decoded with wandb's own protobuf
    schema from its transaction log (LevelDB log framing: 7-byte file header, 32 KiB blocks, 7-byte
    record headers; wandb 0.31 ships no Python reader for it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(train_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, history, files = 7, b"", [], set()
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: one record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif rec.WhichOneof("record_type") == "artifact":
                files |= {e.path for e in rec.artifact.manifest.contents}
    return history, files
