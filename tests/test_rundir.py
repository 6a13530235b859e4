"""The run directory contract: manifests, locks, atomic outputs, staleness."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest
from filelock import FileLock

from conftest import REPO, tiny_config_dict, write_config
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
    assert m["config_values"]["data.block_size"] == 32 and "data.num_proc" not in m["config_values"]
    assert m["pid"] > 0
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


def test_only_output_keys_make_a_stage_stale_and_each_change_is_named(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg):
        pass
    short = load_config(tmp_path / "c.yaml", ["train.max_steps=60"])
    with rd.begin("train", short, inputs=["prepare"]):
        pass
    # Bookkeeping never makes train stale: logging, cadence, workers, tensorboard, nproc (max_time: below).
    book = ["train.log_every=7", "train.eval_every=9", "train.save_every=11", "train.keep_last=5",
            "train.num_workers=2", "train.tensorboard=true", "train.nproc=2", "train.eval_batches=3", "train.max_steps=60"]
    assert rd.staleness("train", load_config(tmp_path / "c.yaml", book)) is None
    # The config says 4 steps, the run was trained for 60: each key, old -> new, and what to run.
    with pytest.raises(StageInputError) as e:
        rd.require("train", load_config(tmp_path / "c.yaml", ["train.lr=1e-5"]))
    msg = str(e.value)
    assert "train.max_steps: 60 -> 4" in msg and "train.lr: 0.0003 -> 1e-05" in msg, msg
    assert "config sections" not in msg and "llmctl train" in msg and "--force" in msg
    assert "--set train.lr=0.0003 --set train.max_steps=60" in msg


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_max_time_makes_train_stale_when_the_schedule_is_fitted_to_it(tmp_path, scheduler):
    # A cosine or linear schedule with fit_schedule_to_time (the default) is planned against the
    # budget: 10 minutes and an hour train different models.
    d = tiny_config_dict(tmp_path / "run", train={"max_time": "10m", "scheduler": scheduler})
    path = write_config(tmp_path / "c.yaml", d)
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", load_config(path)):
        pass
    with rd.begin("train", load_config(path), inputs=["prepare"]):
        pass
    assert rd.manifest("train")["config_values"]["train.max_time"] == 600.0
    assert rd.staleness("train", load_config(path, ["train.max_time=600"])) is None  # '10m' and 600 s: the same budget
    why = rd.staleness("train", load_config(path, ["train.max_time=1h"]))
    assert why and "train.max_time: 600.0 -> 3600.0" in why, why
    with pytest.raises(StageInputError, match="--set train.max_time=600.0"):
        rd.require("train", load_config(path, ["train.max_time=1h"]))
    # No budget at all is another schedule too (it runs to max_steps).
    assert "train.max_time: 600.0 -> (not set)" in rd.staleness("train", load_config(path, ["train.max_time=null"]))


def test_a_train_recorded_before_max_time_was_a_result_key_reads_it_from_its_config_copy(tmp_path):
    # Manifests written before max_time counted lack it; the stage's config.yaml has it.
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", train={"max_time": "10m"}))
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", load_config(path)):
        pass
    with rd.begin("train", load_config(path), inputs=["prepare"]):
        pass
    mpath = rd.stage_dir("train") / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["config_values"]["train.max_time"]
    mpath.write_text(json.dumps(m))
    assert rd.staleness("train", load_config(path)) is None
    assert "train.max_time: 600.0 -> 3600.0" in rd.staleness("train", load_config(path, ["train.max_time=1h"]))


@pytest.mark.parametrize("unfitted", ["train.fit_schedule_to_time=false", "train.scheduler=constant"])
def test_max_time_stays_bookkeeping_when_the_schedule_ignores_it(tmp_path, unfitted):
    # The schedule runs to max_steps and the budget only cuts it short: not a result key.
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run"))
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", load_config(path)):
        pass
    with rd.begin("train", load_config(path, [unfitted, "train.max_time=10m"]), inputs=["prepare"]):
        pass
    assert "train.max_time" not in rd.manifest("train")["config_values"]
    for budget in ("1h", "null", "90s"):
        assert rd.staleness("train", load_config(path, [unfitted, f"train.max_time={budget}"])) is None


def test_a_key_added_to_the_schema_at_its_default_changes_nothing(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg):
        pass
    m = rd.manifest("prepare")
    del m["config_values"]["data.txt_unit"]  # as written by a version without that key
    atomic_write_json(rd.manifest_path("prepare"), m)
    assert rd.staleness("prepare", cfg) is None
    # The stage's config copy, read by today's schema, says what the old code did: the default.
    assert "data.txt_unit: paragraph -> line" in rd.staleness("prepare", load_config(tmp_path / "c.yaml", ["data.txt_unit=line"]))


def test_manifest_without_per_key_record_is_diffed_against_its_config_copy(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg):
        pass
    m = rd.manifest("prepare")
    del m["config_values"]
    m["config_hash"] = cfg.section_hash("data", "tokenizer", "run.seed")  # the old whole-section hash
    atomic_write_json(rd.manifest_path("prepare"), m)
    assert rd.staleness("prepare", cfg) is None
    assert "data.block_size: 32 -> 16" in rd.staleness("prepare", load_config(tmp_path / "c.yaml", ["data.block_size=16"]))
    # Neither a per-key record nor a readable copy: the sections are named.
    (rd.stage_dir("prepare") / "config.yaml").unlink()
    assert "config sections data, tokenizer, run.seed" in rd.staleness("prepare", load_config(tmp_path / "c.yaml", ["data.block_size=16"]))
    assert rd.keep_hint("prepare", load_config(tmp_path / "c.yaml", ["data.block_size=16"])) == ""


def test_status_shows_a_dead_lock_holder_as_interrupted(cfg, tmp_path):
    rd = RunDir(tmp_path / "run")
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); from llmctl.config import load_config; from llmctl.rundir import RunDir\n"
        "cfg = load_config(sys.argv[2]); rd = RunDir(sys.argv[3])\n"
        "with rd.begin('prepare', cfg):\n    os.kill(os.getpid(), 9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(REPO), str(tmp_path / "c.yaml"), str(rd.root)])
    assert r.returncode == -9
    assert rd.manifest("prepare")["status"] == "running"
    row = {r["stage"]: r for r in rd.status(cfg)}["prepare"]
    assert row["status"] == "interrupted" and "gone" in row["why"]
    # While a live process holds the lock it is running.
    with FileLock(rd.stage_dir("prepare") / ".lock"):
        assert {r["stage"]: r for r in rd.status(cfg)}["prepare"]["status"] == "running"


def test_commands_work_without_fcntl(cfg, tmp_path):
    # Windows has no fcntl: no module of a command may import it (the locks come from filelock).
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg):
        pass
    code = (
        "import sys; sys.modules['fcntl'] = None; sys.path.insert(0, sys.argv[1])\n"
        "import warnings; warnings.simplefilter('ignore')\n"  # filelock: 'only soft file lock is available'
        "from llmctl.cli import main; sys.argv = ['llmctl', 'status', sys.argv[2], '--json']; main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(REPO), str(rd.root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {s["stage"]: s for s in json.loads(r.stdout)["stages"]}["prepare"]["status"] == "complete"
