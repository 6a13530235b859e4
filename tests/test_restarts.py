"""`train.max_restarts`: a worker killed mid-run restarts from its checkpoint and ends with the same
losses as an uninterrupted run (one process: llmctl's supervisor runs it again; --nproc: the
launcher runs the whole torchrun group again on a fresh rendezvous); errors a restart would repeat
are not retried, and a crash past the limit fails (issue #30)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from conftest import build_prepared_run, invoke_cli, run_cli, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.errors import Interrupted, LlmctlError
from llmctl.rundir import RunDir, atomic_write_json
from llmctl.train.restart import Failure, restarts

OVER = {"train": {"max_steps": 8, "save_every": 4, "eval_every": 100, "log_every": 1, "lr": 1e-2}}


def _setup(tmp_path, name, **sections):
    path = write_config(tmp_path / f"{name}.yaml", tiny_config_dict(tmp_path / name, **sections))
    cfg = load_config(path)
    return path, build_prepared_run(Path(cfg.run.dir), cfg)


def _losses(rd: RunDir) -> dict[int, float]:
    out = {}
    for line in rd.metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # the last record of a step wins (a restarted run rewrites it)
    return out


def _uninterrupted(tmp_path, **over) -> dict[int, float]:
    pa, rda = _setup(tmp_path, "a", **over)
    r = invoke_cli("train", str(pa))
    assert r.returncode == 0, r.stderr
    return _losses(rda)


def test_one_process_supervisor_restarts_a_killed_worker_to_the_same_losses(tmp_path):
    full = _uninterrupted(tmp_path, **OVER)
    pb, rdb = _setup(tmp_path, "b", train={**OVER["train"], "max_restarts": 2})
    # The worker SIGKILLs itself right after publishing step 4 (as the OOM killer would).
    r = run_cli("train", str(pb), "--json", env={"LLMCTL_FAULT_KILL_AFTER_SAVE": "4"})
    assert r.returncode == 0, r.stderr
    assert "restart 1/2 after the process was killed by SIGKILL; resuming from step 4" in r.stderr
    res = json.loads(r.stdout)  # one result: the supervisor's, with the last worker's numbers
    assert res["steps"] == 8 and res["restarts"] == 1
    m = rdb.manifest("train")
    assert m["status"] == "complete" and len(m["restarts"]) == 1
    assert m["restarts"][0]["resumed_from_step"] == 4 and "SIGKILL" in m["restarts"][0]["cause"]
    resumed = _losses(rdb)
    assert sorted(resumed) == sorted(full) == list(range(1, 9))
    for step in full:
        assert abs(resumed[step] - full[step]) < 1e-4, (step, resumed[step], full[step])


def test_an_explained_error_is_not_retried(tmp_path):
    path, rd = _setup(tmp_path, "nan", train={"lr": 1e30, "max_grad_norm": None, "max_steps": 6, "scheduler": "constant",
                                               "max_restarts": 3})
    r = run_cli("train", str(path))  # a subprocess: the worker's messages go to the real stderr
    assert r.returncode == 1
    assert r.stderr.count("loss became NaN") == 1 and "not retried" in r.stderr and "restart 1/" not in r.stderr
    assert "Traceback" not in r.stderr


GROUP = {**OVER["train"], "micro_batch_size": 2}  # 2 ranks x 2 sequences


def test_nproc_relaunches_the_whole_group_after_a_rank_dies_to_the_same_final_loss(tmp_path):
    """--nproc 2, max_restarts 1: rank 1 is SIGKILLed right after checkpoint 4 (rank 0 then fails in the
    next all-reduce); the launcher runs torchrun again, both ranks, on a new rendezvous, and the run
    ends exactly where an uninterrupted --nproc 2 run does."""
    pa, rda = _setup(tmp_path, "a", train=GROUP)
    r = run_cli("train", str(pa), "--nproc", "2", timeout=900)
    assert r.returncode == 0, r.stderr
    full = _losses(rda)
    pb, rdb = _setup(tmp_path, "b", train={**GROUP, "max_restarts": 1})
    r = run_cli("train", str(pb), "--nproc", "2", "--json", timeout=900,
                env={"LLMCTL_FAULT_KILL_AFTER_SAVE": "4", "LLMCTL_FAULT_KILL_RANK": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("launching: torchrun --standalone") == 2 and "--max-restarts" not in r.stderr
    assert "restart 1/1 after rank 1 (pid " in r.stderr and "was killed by SIGKILL; resuming from step 4" in r.stderr
    res = json.loads(r.stdout)  # one result: the launcher's, with the last group's rank 0 numbers
    assert res["world_size"] == 2 and res["steps"] == 8 and res["restarts"] == 1
    m = rdb.manifest("train")
    assert m["status"] == "complete" and len(m["restarts"]) == 1
    assert m["restarts"][0]["resumed_from_step"] == 4 and m["restarts"][0]["cause"].startswith("rank 1 (pid ")
    resumed = _losses(rdb)
    assert sorted(resumed) == sorted(full) == list(range(1, 9))
    assert resumed[8] == full[8], (resumed[8], full[8])  # the same final loss, not merely close
    for step in full:
        assert abs(resumed[step] - full[step]) < 1e-6, (step, resumed[step], full[step])


@pytest.mark.slow  # the policy (used up -> exit 1): test_what_is_not_retried_and_its_exit_code; a live relaunch: test_nproc_relaunches_the_whole_group...
def test_nproc_crash_past_the_limit_fails_with_exit_1_and_the_manifest_counts_the_restarts(tmp_path):
    """Rank 0 dies after checkpoint 2 and again, in the relaunched group, after checkpoint 4."""
    path, rd = _setup(tmp_path, "c", train={**GROUP, "max_steps": 4, "save_every": 2, "max_restarts": 1})
    r = run_cli("train", str(path), "--nproc", "2", "--json", timeout=900, env={"LLMCTL_FAULT_KILL_AFTER_SAVE": "2,4"})
    assert r.returncode == 1, r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] is False and res["exit_code"] == 1 and "restarts were used up (1/1)" in res["error"]
    # The surviving rank's gloo error keeps its traceback (a rank cannot tell it from a bug); the launcher's does not show.
    assert r.stderr.count("launching: torchrun --standalone") == 2 and "ChildFailedError" not in r.stderr
    assert r.stderr.splitlines()[-1] == f"error: {res['error']}"
    # the surviving rank may fail on its own (its gloo peer is gone) before torchrun stops it: then it is named too
    assert re.search(r"train failed \(rank 0 \(pid \d+\) was killed by SIGKILL(; rank 1 \(pid \d+\) exited with code 1)?\) "
                     r"after its restarts were used up \(1/1\)", res["error"]), res["error"]
    assert "restart 1/1 after rank 0 (pid " in r.stderr and "resuming from step 2" in r.stderr
    m = rd.manifest("train")
    assert m["headline"]["restarts"] == 1 and len(m["restarts"]) == 1
    assert m["restarts"][0]["resumed_from_step"] == 2 and m["restarts"][0]["exit_code"] == -9
    assert (rd.checkpoints_dir / "step-000004").is_dir()  # the relaunched group got that far


def test_nproc_sigterm_with_max_restarts_saves_on_every_rank_and_exits_143(tmp_path):
    """SIGTERM to the launcher reaches both ranks, which save a checkpoint; it is not retried."""
    import subprocess
    import sys
    import time

    from conftest import REPO
    from llmctl.train.checkpoints import complete_checkpoints

    path, rd = _setup(tmp_path, "t", train={**GROUP, "max_steps": 100000, "save_every": 100000, "eval_every": 100000, "max_restarts": 2})
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "train", str(path), "--nproc", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (rd.metrics_path.is_file() and '"loss"' in rd.metrics_path.read_text()):
        time.sleep(0.2)  # waits for a state, not a duration: the signal lands mid-training on any machine
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err
    assert err.count("interrupted by SIGTERM") == 1 and "restart" not in err and err.count("launching: torchrun") == 1
    m = rd.manifest("train")
    assert m["status"] == "interrupted" and "restarts" not in m
    last = complete_checkpoints(rd)[-1]
    assert sorted(p.name for p in last.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]  # both ranks saved


# The policy alone, with stand-in tries: what is retried, what is not, and the exit code.
def _policy(tmp_path, tries: list[list[Failure]], limit: int = 1, errors: tuple = ()):
    """Run `restarts` over `tries` (each opens the stage anew and records its error); (restarts or the error, tries used)."""
    rd = RunDir(tmp_path / "run")
    rd.stage_dir("train").mkdir(parents=True)
    used = []

    def attempt(first: bool) -> list[Failure]:
        used.append(first)
        error = errors[len(used) - 1] if errors else None
        atomic_write_json(rd.manifest_path("train"), {"id": f"try-{len(used)}", "status": "failed" if error else "running", "error": error})
        return tries[len(used) - 1]

    try:
        return restarts(rd, limit, "llmctl train x.yaml --nproc 2", attempt), used, rd
    except LlmctlError as e:
        return e, used, rd


def test_a_killed_rank_is_restarted_and_the_ranks_torchrun_stopped_do_not_count_as_a_stop(tmp_path):
    out, used, rd = _policy(tmp_path, [[Failure(143, 0, 10), Failure(-9, 1, 11)], []])
    assert used == [True, False]  # --force only on the first try
    assert [r["cause"] for r in out] == ["rank 1 (pid 11) was killed by SIGKILL"] and out[0]["exit_code"] == -9
    assert rd.manifest("train")["headline"]["restarts"] == 1


@pytest.mark.parametrize("tries, errors, code, says", [
    ([[Failure(143, 0, 10), Failure(143, 1, 11)]], (), 143, "interrupted by SIGTERM"),  # every rank stopped: someone meant it
    ([[Failure(-2, 0, 10), Failure(130, 1, 11)]], (), 130, "interrupted by SIGINT"),
    ([[Failure(2, 1, 11), Failure(143, 0, 10)]], (), 2, "not retried"),  # a config or data error
    ([[Failure(1, 0, 10)]], ("ConfigError: bad key",), 1, "not retried"),  # an error llmctl explained
    ([[Failure(1, 0, 10)], [Failure(1, 0, 12)]], ("RuntimeError: boom", "RuntimeError: boom"), 1, "used up (1/1)"),
])
def test_what_is_not_retried_and_its_exit_code(tmp_path, tries, errors, code, says):
    err, used, rd = _policy(tmp_path, tries, errors=errors)
    assert isinstance(err, LlmctlError) and err.exit_code == code and says in str(err), err
    assert isinstance(err, Interrupted) == (code in (130, 143))
    assert len(used) == len(tries)


def test_a_try_that_never_opened_the_stage_is_not_retried(tmp_path):
    rd = RunDir(tmp_path / "run")
    with pytest.raises(LlmctlError, match="not retried") as e:
        restarts(rd, 3, "llmctl train x.yaml --nproc 2", lambda first: [Failure(1, 0, 10), Failure(143, 1, 11)])
    assert e.value.exit_code == 1


def test_the_relaunched_group_does_not_get_force(tmp_path, monkeypatch):
    """`--force` clears the outputs once; a relaunch with it would delete the checkpoint it resumes from."""
    from llmctl.train import launch

    calls = []

    def fake_torchrun(nproc, nodes, argv):
        calls.append(argv)
        return [Failure(-9, 0, 10)] if len(calls) == 1 else []

    monkeypatch.setattr(launch, "_torchrun", fake_torchrun)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # put back afterwards
    monkeypatch.setattr("sys.argv", ["llmctl", "train", "x.yaml", "--nproc", "2", "--force", "--set", "train.lr=1e-3"])
    rd = RunDir(tmp_path / "run")
    launch.launch_torchrun(2, rd, "llmctl train x.yaml --nproc 2", max_restarts=1)
    assert calls == [["train", "x.yaml", "--force", "--set", "train.lr=1e-3"], ["train", "x.yaml", "--set", "train.lr=1e-3"]]


def test_node_flags_get_no_restarts_and_a_warning_that_says_what_holds(tmp_path, monkeypatch, capfd):
    """Each node's launcher cannot relaunch the other nodes' ranks: one try, and the way back is the same command."""
    from llmctl.train import launch

    calls = []
    monkeypatch.setattr(launch, "_torchrun", lambda nproc, nodes, argv: calls.append(argv) or [Failure(-9, 0, 10)])
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setattr("sys.argv", ["llmctl", "train", "x.yaml", "--nnodes", "2", "--node-rank", "0", "--master-addr", "h"])
    nodes = launch.Nodes(nnodes=2, node_rank=0, master_addr="h").check()
    with pytest.raises(LlmctlError, match=r"rank 0 \(pid 10\) was killed by SIGKILL") as e:
        launch.launch_torchrun(1, RunDir(tmp_path / "run"), "llmctl train x.yaml --nnodes 2", nodes, max_restarts=3)
    assert e.value.exit_code == 1 and len(calls) == 1
    err = " ".join(capfd.readouterr().err.split())
    assert "train.max_restarts is not applied with node flags" in err and "running the same command again on every node" in err
