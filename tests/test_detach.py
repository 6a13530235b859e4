"""`--detach`, `llmctl logs`, `llmctl stop`, and `status` of a detached stage (issue #30)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, build_prepared_run, invoke_cli, tiny_config_dict, write_config
from llmctl import detach
from llmctl.config import load_config
from llmctl.rundir import RunDir, atomic_write_json

LONG = {"train": {"max_steps": 100000, "save_every": 100000, "eval_every": 100000, "log_every": 1}}


def _setup(tmp_path, name="run", **sections):
    path = write_config(tmp_path / f"{name}.yaml", tiny_config_dict(tmp_path / name, **sections))
    cfg = load_config(path)
    return path, build_prepared_run(Path(cfg.run.dir), cfg)


def _wait(cond, timeout=180, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _training(rd: RunDir) -> bool:
    return rd.metrics_path.is_file() and '"loss"' in rd.metrics_path.read_text()


def test_detach_survives_hangup_then_status_logs_and_stop_record_143(tmp_path):
    path, rd = _setup(tmp_path, **LONG)
    # The SSH login shell: its own session; hanging it up must not reach the detached stage.
    shell = subprocess.Popen(["bash", "-c", f"{sys.executable} -m llmctl train {path} --detach --json; sleep 60"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, start_new_session=True,
                             # a login shell hears SIGHUP even when this test runs under nohup (inherited SIG_IGN)
                             preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    res = json.loads(shell.stdout.readline())
    pid = res["pid"]
    assert res["ok"] and res["log"] == str(rd.log_path("train")) and res["stop"] == f"llmctl stop {rd.root}"
    os.killpg(shell.pid, signal.SIGHUP)
    assert shell.wait(timeout=30) == -signal.SIGHUP
    assert os.getsid(pid) == pid  # a session of its own: no controlling terminal to hang up
    _wait(lambda: _training(rd), what="the first logged step")

    r = invoke_cli("status", str(rd.root), "--json")
    row = next(s for s in json.loads(r.stdout)["stages"] if s["stage"] == "train")
    assert row["status"] == "running" and row["pid"] == pid and row["step"] >= 1 and row["total_steps"] == 100000
    assert "loss " in row["why"] and "tok/s" in row["why"] and f"pid {pid}" in row["why"]

    again = invoke_cli("train", str(path), "--detach")
    assert again.returncode == 1 and "already running detached" in again.stderr and f"pid {pid}" in again.stderr

    log = invoke_cli("logs", str(rd.root))
    assert log.returncode == 0 and "model: llama" in log.stdout and "\x1b[" not in log.stdout

    r = invoke_cli("stop", str(rd.root), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["recorded_exit_code"] == 143 and out["train_status"] == "interrupted" and out["checkpoint_step"] >= 1
    assert out["resume"] == f"llmctl train {path} --detach"
    assert detach.read_record(rd, "train")["exit_code"] == 143
    assert rd.manifest("train")["status"] == "interrupted"
    assert (rd.checkpoints_dir / f"step-{out['checkpoint_step']:06d}").is_dir()
    assert "interrupted by SIGTERM" in rd.log_path("train").read_text()


def test_stop_now_kills_and_a_stale_record_is_recognised(tmp_path):
    path, rd = _setup(tmp_path, **LONG)
    r = invoke_cli("train", str(path), "--detach", "--json")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["pid"]
    _wait(lambda: _training(rd), what="the first logged step")
    r = invoke_cli("stop", str(rd.root), "--now", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recorded_exit_code"] == 137 and json.loads(r.stdout)["train_status"] == "interrupted"
    row = next(s for s in json.loads(invoke_cli("status", str(rd.root), "--json").stdout)["stages"] if s["stage"] == "train")
    assert row["status"] == "interrupted" and "process is gone" in row["why"]

    # A record left by a process killed from outside (no exit code): not running, not refused.
    rec = detach.read_record(rd, "train")
    atomic_write_json(rd.detach_record_path("train"), {**rec, "exit_code": None})
    assert not detach.alive(detach.read_record(rd, "train"))  # pid gone (or reused: another start time)
    assert detach.live(rd) == {}
    r = invoke_cli("stop", str(rd.root))
    assert r.returncode == 1 and "nothing is running" in r.stderr
    del pid


def test_logs_follow_ends_with_the_process(tmp_path):
    path, rd = _setup(tmp_path, train={"max_steps": 2, "eval_every": 100, "save_every": 100})
    r = invoke_cli("train", str(path), "--detach")
    assert r.returncode == 0, r.stderr
    assert "llmctl logs" in r.stderr and "llmctl stop" in r.stderr
    f = invoke_cli("logs", str(rd.root), "-f", "--stage", "train")
    assert f.returncode == 0 and "steps" in f.stdout and "train exited with 0" in f.stderr
    assert detach.read_record(rd, "train")["exit_code"] == 0 and rd.manifest("train")["status"] == "complete"

    missing = invoke_cli("logs", str(rd.root), "--stage", "eval")
    assert missing.returncode == 1 and "no such log" in missing.stderr and "train" in missing.stderr
    assert invoke_cli("logs", str(tmp_path / "nope")).returncode == 2


def test_a_detached_run_blocks_a_detached_stage_it_will_write(tmp_path):
    """`llmctl run --detach` writes every stage folder: a detached train of the same run is refused
    while it lives (its record names a live process: this one), allowed once its exit is recorded."""
    import psutil

    path, rd = _setup(tmp_path)
    rd.logs_dir.mkdir()
    me = {"command": "run", "pid": os.getpid(), "create_time": psutil.Process().create_time(), "exit_code": None,
          "started_at": "2026-01-01T00:00:00+00:00", "log": str(rd.log_path("run"))}
    atomic_write_json(rd.detach_record_path("run"), me)
    r = invoke_cli("train", str(path), "--detach")
    assert r.returncode == 1 and "'run' is already running detached" in r.stderr
    assert not rd.log_path("train").exists()
    atomic_write_json(rd.detach_record_path("run"), {**me, "exit_code": 0})
    assert detach.live(rd) == {}
    detach.refuse_if_busy(rd, "train")  # no longer refused


def test_stop_now_waits_for_the_lock_a_dying_process_still_holds(tmp_path):
    """A killed multithreaded process is a zombie as soon as its main thread ends, while its other
    threads still hold its files, and with them the stage lock, a moment longer (CI saw 'running'
    after `stop --now`). Played here without a race: the lock's holder lets go 1.5 s after the
    recorded process dies, and `stop --now` must report what holds once it has."""
    import psutil

    path, rd = _setup(tmp_path)
    rd.logs_dir.mkdir()
    victim = subprocess.Popen(["sleep", "120"], start_new_session=True)
    rec = {"command": "train", "pid": victim.pid, "create_time": psutil.Process(victim.pid).create_time(),
           "exit_code": None, "started_at": "2026-01-01T00:00:00+00:00", "log": str(rd.log_path("train")),
           "argv": ["train", str(path)]}
    atomic_write_json(rd.detach_record_path("train"), rec)
    rd.stage_dir("train").mkdir(exist_ok=True)
    atomic_write_json(rd.manifest_path("train"), {"stage": "train", "status": "running", "pid": victim.pid})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, psutil\nfrom filelock import FileLock\n"
        "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True)\n"
        "while psutil.pid_exists(int(sys.argv[2])) and psutil.Process(int(sys.argv[2])).status() != 'zombie': time.sleep(0.05)\n"
        "time.sleep(1.5)\n"), str(rd.stage_dir("train") / ".lock"), str(victim.pid)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held" and rd.is_locked("train")
    out = detach.stop(rd, None, now=True, timeout=30, say=lambda _m: None)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert out["recorded_exit_code"] == 137 and out["train_status"] == "interrupted"
    assert holder.wait(timeout=10) == 0
