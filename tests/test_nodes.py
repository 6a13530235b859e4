"""Past one machine (issue #30): two torchrun "nodes" on 127.0.0.1 give the same run as `--nproc 2` on
one; the node flags are checked; `llmctl launch slurm` prints a script whose torchrun line runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, build_prepared_run, invoke_cli, run_cli, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.rundir import RunDir
from llmctl.train.launch import free_port, rank_argv

T = {"max_steps": 3, "micro_batch_size": 2, "log_every": 1, "eval_every": 100, "save_every": 100}


def _setup(tmp_path, name, **sections):
    path = write_config(tmp_path / f"{name}.yaml", tiny_config_dict(tmp_path / name, **sections))
    cfg = load_config(path)
    return path, build_prepared_run(Path(cfg.run.dir), cfg)


def _losses(rd: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, rd.metrics_path.read_text().splitlines()) if "loss" in r}


def _two_nodes(path: Path, flags) -> list[subprocess.CompletedProcess]:
    """Two launchers, as two machines would run them, at the same time."""
    procs = [subprocess.Popen([sys.executable, "-m", "llmctl", "train", str(path), "--nproc", "1", *flags(rank)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=900)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


def test_two_nodes_static_equal_nproc_2(tmp_path):
    p1, rd1 = _setup(tmp_path, "one", train=T)
    r = run_cli("train", str(p1), "--nproc", "2", timeout=900)
    assert r.returncode == 0, r.stderr
    p2, rd2 = _setup(tmp_path, "two", train=T)
    port = free_port()
    r0, r1 = _two_nodes(p2, lambda rank: ["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)])
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr, r1.stderr)
    assert "--nnodes=2 --node-rank=1 --master-addr=127.0.0.1" in r1.stderr
    m = rd2.manifest("train")
    assert m["status"] == "complete" and m["headline"]["world_size"] == 2
    assert _losses(rd1) == _losses(rd2) and sorted(_losses(rd2)) == [1, 2, 3]  # the same numbers, not merely close


@pytest.mark.slow  # test_two_nodes_static_equal_nproc_2 covers two launchers; this is torchrun's other rendezvous
def test_two_nodes_c10d_rendezvous_equal_nproc_2(tmp_path):
    p1, rd1 = _setup(tmp_path, "one", train=T)
    assert run_cli("train", str(p1), "--nproc", "2", timeout=900).returncode == 0
    p2, rd2 = _setup(tmp_path, "two", train=T)
    port = free_port()
    r0, r1 = _two_nodes(p2, lambda rank: ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t1"])
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr, r1.stderr)
    assert _losses(rd1) == _losses(rd2)


def test_node_flags_are_checked(tmp_path):
    path, rd = _setup(tmp_path, "run", train=T)
    for flags, says in [
        (["--nnodes", "2"], "also give --node-rank R and --master-addr HOST"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2: must be 0..1"),
        (["--nnodes", "2", "--rdzv-endpoint", "h"], "give HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "0"], "give one form"),
    ]:
        r = invoke_cli("train", str(path), *flags)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)
    assert rank_argv(["train", "c.yaml", "--nproc", "2", "--nnodes=2", "--node-rank", "1", "--master-addr", "h", "--master-port=9",
                      "--rdzv-endpoint", "h:1", "--rdzv-id", "x", "--set", "a=1"]) == ["train", "c.yaml", "--set", "a=1"]


def _shim(d: Path, name: str, body: str) -> None:
    p = d / name
    p.write_text("#!/bin/bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def _slurm_env(tmp_path, llmctl_body: str) -> dict:
    """srun, scontrol and llmctl as a one-node Slurm job on this machine would see them."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    _shim(bin_, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"')  # one task: run it here
    _shim(bin_, "scontrol", f'if [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {tmp_path}/scontrol.log; fi')
    _shim(bin_, "llmctl", llmctl_body)
    return dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_NODEID="0",
                SLURM_JOB_ID="4242", PYTHONPATH=str(REPO))


def test_launch_slurm_script_trains_locally_with_one_node_and_requeues_after_sigterm(tmp_path):
    path, rd = _setup(tmp_path, "run", train={**T, "micro_batch_size": 4})
    r = invoke_cli("launch", "slurm", str(path), "--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00",
                   "--master-port", str(free_port()), "--set", "train.lr=1e-3")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(r.stdout)
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=1", "#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --time=1:00:00"):
        assert line in r.stdout
    assert "--set train.lr=1e-3" in r.stdout and f"--run-dir {rd.root}" in r.stdout

    env = _slurm_env(tmp_path, f'exec {sys.executable} -m llmctl "$@"')
    done = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "launching: torchrun --nnodes=1 --node-rank=0 --master-addr=127.0.0.1" in done.stderr
    m = rd.manifest("train")
    assert m["status"] == "complete" and m["headline"]["steps"] == 3 and m["config_values"]["train.lr"] == 1e-3

    # A job stopped by Slurm's SIGTERM (llmctl exits 143 after its checkpoint) requeues itself.
    env = _slurm_env(tmp_path, "exit 143")
    stopped = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 143 and (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_launch_slurm_checks_its_flags(tmp_path):
    path, rd = _setup(tmp_path, "run", train=T)
    r = invoke_cli("launch", "slurm", str(path), "--nodes", "0", "--gpus-per-node", "8")
    assert r.returncode == 2 and "--nodes 0" in r.stderr
    r = invoke_cli("launch", "slurm", str(path), "--nodes", "2", "--gpus-per-node", "8", "--time", "4h")
    assert r.returncode == 2 and "--time '4h'" in r.stderr and "4:00:00" in r.stderr


def test_a_launcher_checks_resume_against_the_world_its_ranks_form(tmp_path):
    """`train --nproc 2` after a stop: the launcher (one process) must accept the 2-rank checkpoint
    its ranks will continue, and one process must still refuse it."""
    from llmctl.config import stage_values
    from llmctl.errors import ConfigError
    from llmctl.rundir import atomic_write_json
    from llmctl.train.checkpoints import META, pick_resume, resume_fingerprint

    path, rd = _setup(tmp_path, "run", train=T)
    cfg = load_config(path)
    ckpt = rd.checkpoint_dir(2)
    ckpt.mkdir(parents=True)
    atomic_write_json(ckpt / META, {"step": 2, "fingerprint": resume_fingerprint(cfg, rd, world_size=2),
                                    "config_values": stage_values(cfg, "train")})
    assert pick_resume(cfg, rd, None, world_size=2) == ckpt
    with pytest.raises(ConfigError, match=r"world_size \(2 -> 1\)"):
        pick_resume(cfg, rd, None)
