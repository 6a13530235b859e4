"""The run directory contract: manifests, locks, atomic outputs, staleness."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal

import pytest

from conftest import tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.errors import Interrupted, LockedError, StageInputError
from llmctl.rundir import RunDir, atomic_dir, atomic_write_json


@pytest.fixture
def cfg(tmp_path):
    return load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run")))


def test_begin_writes_manifest_and_config(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg) as st:
        assert rd.manifest("prepare")["status"] == "running"
        st.headline["tokens"] = 10
    m = rd.manifest("prepare")
    assert m["status"] == "complete" and m["headline"] == {"tokens": 10}
    assert m["config_hash"] == cfg.section_hash("data", "tokenizer", "run.seed")
    assert m["versions"]["python"] and m["finished_at"] and m["seconds"] >= 0
    assert (rd.stage_dir("prepare") / "config.yaml").read_text().startswith("run:")


def test_failure_and_interrupt_are_recorded(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with pytest.raises(ValueError):
        with rd.begin("prepare", cfg):
            raise ValueError("boom")
    assert rd.manifest("prepare")["status"] == "failed" and "boom" in rd.manifest("prepare")["error"]
    with pytest.raises(Interrupted):
        with rd.begin("prepare", cfg):
            raise Interrupted(signal.SIGTERM)
    assert rd.manifest("prepare")["status"] == "interrupted"


def _hold_lock(run_dir, cfg_path, ready, release):
    rd = RunDir(run_dir)
    with rd.begin("prepare", load_config(cfg_path)):
        ready.set()
        release.wait(30)


def test_second_writer_is_refused(cfg, tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path / "run", tmp_path / "c.yaml", ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockedError, match="locked"):
            with RunDir(tmp_path / "run").begin("prepare", cfg):
                pass
    finally:
        release.set()
        p.join(30)
    with RunDir(tmp_path / "run").begin("prepare", cfg):  # free again
        pass


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:  # replaces the previous complete version
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_killed_writer_leaves_no_complete_artifact(tmp_path):
    target = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # child: start writing, then die without cleanup
        with atomic_dir(target) as tmp:
            (tmp / "part").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert leftovers and all(p.name.startswith(".") for p in leftovers)


def test_staleness_and_require(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with pytest.raises(StageInputError, match="missing: run 'llmctl prepare"):
        rd.require("prepare", cfg)
    with rd.begin("prepare", cfg):
        pass
    with rd.begin("train", cfg, inputs=["prepare"]):
        pass
    assert rd.require("train", cfg)["status"] == "complete"
    assert rd.up_to_date("train", cfg)

    changed = load_config(tmp_path / "c.yaml", ["data.block_size=16"])
    with pytest.raises(StageInputError, match="stale .*run 'llmctl prepare"):
        rd.require("train", changed)
    changed_train = load_config(tmp_path / "c.yaml", ["train.lr=0.5"])
    with pytest.raises(StageInputError, match="stale .*llmctl train .*--force"):
        rd.require("train", changed_train)
    # eval's config does not make train stale
    assert rd.staleness("train", load_config(tmp_path / "c.yaml", ["eval.batch_size=3"])) is None

    with rd.begin("prepare", cfg):  # prepare re-run: train no longer matches its input
        pass
    assert "re-run" in rd.staleness("train", cfg)
    assert not rd.up_to_date("train", cfg)


def test_incomplete_input_is_refused(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.stage_dir("prepare").mkdir(parents=True)
    atomic_write_json(rd.manifest_path("prepare"), {"status": "running"})
    with pytest.raises(StageInputError, match="is running"):
        rd.require("prepare", cfg)


def test_status_rows(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg) as st:
        st.headline["docs"] = 3
    rows = {r["stage"]: r for r in rd.status(cfg)}
    assert rows["prepare"]["status"] == "complete" and rows["prepare"]["headline"] == {"docs": 3}
    assert rows["train"]["status"] == "missing"
    rows = {r["stage"]: r for r in rd.status(load_config(tmp_path / "c.yaml", ["data.block_size=16"]))}
    assert rows["prepare"]["status"] == "stale"
    json.dumps(rows)
