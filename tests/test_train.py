"""`llmctl train`: scratch and pretrained, LoRA, resume after SIGKILL, SIGTERM, NaN, DDP."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, build_prepared_run, invoke_cli, run_cli, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.rundir import RunDir, atomic_write_json
from llmctl.stages import train


def _setup(tmp_path, name="run", **sections):
    d = tiny_config_dict(tmp_path / name, **sections)
    path = write_config(tmp_path / f"{name}.yaml", d)
    cfg = load_config(path)
    rd = build_prepared_run(Path(cfg.run.dir), cfg)
    return path, cfg, rd


def _losses(rd: RunDir) -> dict[int, float]:
    out = {}
    for line in rd.metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # the last record of a step wins (a resumed run rewrites it)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_scratch(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    path, cfg, rd = _setup(tmp_path, model={"arch": arch})
    res = train.run(cfg, rd)
    assert res["steps"] == 4 and res["val_loss"] is not None and res["init_val_loss"] is not None
    m = rd.manifest("train")
    assert m["status"] == "complete" and m["lineage"]["prepare"]["id"] == rd.manifest("prepare")["id"]
    model = AutoModelForCausalLM.from_pretrained(rd.model_dir)
    assert model.config.model_type == arch and model.config.vocab_size >= 300
    assert (rd.model_dir / "generation_config.json").is_file() and (rd.model_dir / "tokenizer.json").is_file()
    assert sorted(_losses(rd)) == [1, 2, 3, 4]
    names = sorted(p.name for p in rd.checkpoints_dir.iterdir())
    assert names == ["step-000002", "step-000004"]
    again = train.run(cfg, rd)
    assert again["cached"] is True


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    over = {"train": {"max_steps": 8, "save_every": 4, "eval_every": 100, "log_every": 1, "lr": 1e-2}}
    pa, ca, rda = _setup(tmp_path, "a", **over)
    train.run(ca, rda)
    full = _losses(rda)

    pb, cb, rdb = _setup(tmp_path, "b", **over)
    r = run_cli("train", str(pb), env={"LLMCTL_FAULT_KILL_AFTER_SAVE": "4"})
    assert r.returncode == -signal.SIGKILL
    assert rdb.manifest("train")["status"] == "running"  # killed: nothing claims completion
    assert not rdb.model_dir.exists()
    assert [p.name for p in train.complete_checkpoints(rdb)] == ["step-000004"]
    r = invoke_cli("train", str(pb))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    resumed = _losses(rdb)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(resumed[step] - full[step]) < 1e-4, (step, resumed[step], full[step])

    # A change that makes resuming unsafe is refused with the fix.
    (rdb.stage_dir("train") / "manifest.json").unlink()
    r = invoke_cli("train", str(pb), "--set", "model.hidden_size=64")
    assert r.returncode == 2 and "cannot be resumed safely" in r.stderr and "model.hidden_size: 32 -> 64" in r.stderr and "--force" in r.stderr


def test_partial_checkpoint_is_ignored(tmp_path):
    path, cfg, rd = _setup(tmp_path)
    rd.checkpoints_dir.mkdir(parents=True)
    (rd.checkpoints_dir / "step-000002").mkdir()  # no llmctl.json: a save that never finished
    (rd.checkpoints_dir / "checkpoint-3").mkdir()
    assert train.complete_checkpoints(rd) == []


def test_sigterm_saves_checkpoint_and_exits_143(tmp_path):
    path, cfg, rd = _setup(tmp_path, train={"max_steps": 100000, "save_every": 100000, "eval_every": 100000, "log_every": 1})
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "train", str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if rd.metrics_path.is_file() and '"loss"' in rd.metrics_path.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "resume" in err
    assert rd.manifest("train")["status"] == "interrupted"
    assert train.complete_checkpoints(rd), "a checkpoint must be saved on SIGTERM"


def test_nan_loss_stops_with_clear_error(tmp_path):
    path, cfg, rd = _setup(tmp_path, train={"lr": 1e30, "max_grad_norm": None, "max_steps": 6, "warmup_steps": 0, "scheduler": "constant"})
    r = invoke_cli("train", str(path))
    assert r.returncode == 1 and "NaN" in r.stderr and "Traceback" not in r.stderr
    assert rd.manifest("train")["status"] == "failed" and not rd.model_dir.exists()


def test_missing_prepare_exit_3(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run"))
    r = invoke_cli("train", str(path))
    assert r.returncode == 3 and "run 'llmctl prepare" in r.stderr


def test_lora_adapter_and_merged_model_agree(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.modeling import build_from_scratch

    path, cfg, rd = _setup(tmp_path, model={"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}, train={"lr": 5e-2})
    res = train.run(cfg, rd)
    assert res["trainable_parameters"] < res["parameters"]
    assert (rd.adapter_dir / "adapter_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    base = build_from_scratch(cfg, tok)
    adapted = PeftModel.from_pretrained(base, rd.adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(rd.model_dir).eval()
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    with torch.no_grad():
        a, b = adapted(ids).logits, merged(ids).logits
        plain = build_from_scratch(cfg, tok).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter changed something


def test_finetune_pretrained_local_dir(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import sentences, train_tiny_tokenizer

    tokdir = tmp_path / "base"
    tok = train_tiny_tokenizer(sentences(64, seed=1), tokdir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)).save_pretrained(tokdir)
    path, cfg, rd = _setup(tmp_path, model={"name_or_path": str(tokdir)}, tokenizer={"name_or_path": str(tokdir)})
    res = train.run(cfg, rd)
    assert res["steps"] == 4
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(rd.model_dir)
    assert m.get_input_embeddings().weight.shape[0] >= len(AutoTokenizer.from_pretrained(rd.model_dir))


def test_pretrained_with_new_tokenizer_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    mdir = tmp_path / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)).save_pretrained(mdir)
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", model={"name_or_path": str(mdir)}))
    # Refused before any work: prepare would otherwise train a tokenizer the model cannot read.
    for cmd in (("config", "validate"), ("prepare",), ("train",)):
        r = invoke_cli(*cmd, str(path))
        assert r.returncode == 2 and f"set tokenizer.name_or_path: {mdir}" in r.stderr and "Traceback" not in r.stderr, (cmd, r.stderr)
    assert not (tmp_path / "run").exists()


def test_two_processes_match_one(tmp_path):
    """DDP on CPU (gloo): 2 ranks x 2 sequences == 1 rank x 4 sequences, step by step."""
    one = {"train": {"max_steps": 3, "micro_batch_size": 4, "log_every": 1, "eval_every": 100, "save_every": 100}}
    p1, c1, rd1 = _setup(tmp_path, "one", **one)
    r = invoke_cli("train", str(p1))
    assert r.returncode == 0, r.stderr
    two = {"train": {"max_steps": 3, "micro_batch_size": 2, "log_every": 1, "eval_every": 100, "save_every": 100}}
    p2, c2, rd2 = _setup(tmp_path, "two", **two)
    r = run_cli("train", str(p2), "--nproc", "2", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert rd2.manifest("train")["headline"]["world_size"] == 2
    res = json.loads(r.stdout)  # exactly one object: the launcher's, with rank 0's numbers
    assert res["world_size"] == 2 and res["steps"] == 3 and r.stderr.count("model: llama") == 1  # only rank 0 talks
    a, b = _losses(rd1), _losses(rd2)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])


def test_parse_duration():
    assert train.parse_duration("1h30m") == 5400 and train.parse_duration(90) == 90 and train.parse_duration("45s") == 45
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match="train.max_time"):
        train.parse_duration("soon")


def test_max_time_ends_cleanly(tmp_path):
    path, cfg, rd = _setup(tmp_path, train={"max_steps": 100000, "max_time": 3, "save_every": 100000, "eval_every": 100000})
    res = train.run(cfg, rd)
    assert res["stopped_by"] == "max_time" and 0 < res["steps"] < 100000
    assert rd.model_dir.is_dir() and train.complete_checkpoints(rd)


def _snapshot(rd: RunDir) -> dict:
    files = [rd.model_dir / "model.safetensors", rd.manifest_path("train"), rd.stage_dir("train") / "config.yaml", rd.metrics_path]
    return {str(f): f.read_bytes() for f in files if f.is_file()} | {"checkpoints": [p.name for p in train.complete_checkpoints(rd)]}


def test_finished_run_is_never_modified_by_a_rerun(tmp_path):
    from llmctl.errors import ConfigError

    path, cfg, rd = _setup(tmp_path)
    train.run(cfg, rd)
    before = _snapshot(rd)
    # Bookkeeping only (logging, cadence): up to date, nothing touched. (A budget is a result key
    # once the schedule is fitted to it, which the default cosine schedule would be.)
    res = train.run(load_config(path, ["train.log_every=3", "train.save_every=1", "train.eval_every=1"]), rd)
    assert res["cached"] is True and _snapshot(rd) == before
    # A key that changes the result: refused with what changed and the fix; nothing touched.
    with pytest.raises(ConfigError) as e:
        train.run(load_config(path, ["train.lr=1e-5"]), rd)
    msg = str(e.value)
    assert "train.lr: 0.0003 -> 1e-05" in msg and "--force" in msg and "--set train.lr=0.0003" in msg, msg
    assert _snapshot(rd) == before
    with pytest.raises(ConfigError, match="train.max_steps: 4 -> 8"):
        train.run(load_config(path, ["train.max_steps=8"]), rd)
    assert _snapshot(rd) == before
    # --force starts over and records what it did.
    res = train.run(load_config(path, ["train.lr=1e-5"]), rd, force=True)
    assert res["steps"] == 4 and rd.manifest("train")["config_values"]["train.lr"] == 1e-5
    assert "lr: 1.0e-05" in (rd.stage_dir("train") / "config.yaml").read_text()


def test_resume_refuses_a_changed_result_key_and_obeys_a_new_cadence(tmp_path):
    from llmctl.errors import ConfigError

    path, cfg, rd = _setup(tmp_path, train={"max_steps": 6, "save_every": 2, "eval_every": 100, "keep_last": 10})
    train.run(cfg, rd)
    # As if killed right after step 2's checkpoint.
    shutil.rmtree(rd.model_dir)
    for p in train.complete_checkpoints(rd)[1:]:
        shutil.rmtree(p)
    m = rd.manifest("train")
    m["status"] = "interrupted"
    atomic_write_json(rd.manifest_path("train"), m)
    before = _snapshot(rd)
    # The Trainer would restore the old optimizer and schedule and ignore a new lr: refuse.
    with pytest.raises(ConfigError) as e:
        train.run(load_config(path, ["train.lr=1e-5"]), rd)
    msg = str(e.value)
    assert "cannot be resumed" in msg and "train.lr: 0.0003 -> 1e-05" in msg and "--force" in msg and "--set train.lr=0.0003" in msg
    assert _snapshot(rd) == before
    # Checkpoint cadence never changes the result: resume, and follow the new cadence.
    res = train.run(load_config(path, ["train.save_every=3"]), rd)
    assert res["steps"] == 6 and rd.manifest("train")["status"] == "complete"
    assert [p.name for p in train.complete_checkpoints(rd)] == ["step-000002", "step-000003", "step-000006"]


def test_force_takes_the_lock_before_deleting(tmp_path):
    from filelock import FileLock

    from llmctl.errors import LockedError

    path, cfg, rd = _setup(tmp_path)
    train.run(cfg, rd)
    before = _snapshot(rd)
    with FileLock(rd.stage_dir("train") / ".lock"):  # a running job holds the lock
        with pytest.raises(LockedError):
            train.run(cfg, rd, force=True)
    assert _snapshot(rd) == before


def test_nan_is_caught_on_the_step_it_happens_not_the_next_log_step(tmp_path):
    import re

    from llmctl.errors import LlmctlError

    path, cfg, rd = _setup(tmp_path, train={"lr": 1e30, "max_grad_norm": None, "max_steps": 6, "scheduler": "constant",
                                             "log_every": 100, "save_every": 1, "eval_every": 100, "keep_last": 10})
    with pytest.raises(LlmctlError, match="NaN") as e:
        train.run(cfg, rd)
    nan_step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    steps = [json.loads((p / train.META).read_text())["step"] for p in train.complete_checkpoints(rd)]
    assert nan_step < 6 and all(s < nan_step for s in steps), (nan_step, steps)
    assert rd.manifest("train")["status"] == "failed" and not rd.model_dir.exists()


def test_collective_device_follows_the_backend(monkeypatch):
    """NCCL takes only CUDA tensors: the stop flag's all-reduce must not use a CPU tensor there."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert train.collective_device("nccl") == torch.device("cuda", 1)
    assert train.collective_device("gloo") == torch.device("cpu")
    assert train.collective_device("cpu:gloo,cuda:nccl") == torch.device("cpu")


@pytest.mark.slow  # test_two_processes_match_one checks the same under torchrun, on the default tier
def test_nproc_json_is_one_result(tmp_path):
    p, cfg, rd = _setup(tmp_path, train={"max_steps": 2, "micro_batch_size": 2, "eval_every": 100, "save_every": 100})
    r = run_cli("train", str(p), "--nproc", "2", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # exactly one object: the launcher's, with rank 0's numbers
    assert res["world_size"] == 2 and res["steps"] == 2
    assert r.stderr.count("model: llama") == 1  # only rank 0 talks
    assert sorted(p.name for p in rd.model_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_nproc_sigint_saves_and_exits_130(tmp_path):
    path, cfg, rd = _setup(tmp_path, train={"max_steps": 100000, "micro_batch_size": 2, "save_every": 100000, "eval_every": 100000, "log_every": 1})
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "train", str(path), "--nproc", "2"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if rd.metrics_path.is_file() and '"loss"' in rd.metrics_path.read_text():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the launcher; the ranks run in their own sessions
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SignalException" not in err
    assert err.count("interrupted by SIGINT") == 1 and "resume" in err
    assert rd.manifest("train")["status"] == "interrupted"
    assert train.complete_checkpoints(rd), "a checkpoint must be saved on SIGINT"


def _records(rd: RunDir) -> list[dict]:
    return [json.loads(line) for line in rd.metrics_path.read_text().splitlines()]


class _Clock:
    """A clock that ticks a fixed amount per reading: train's timing becomes independent of the machine's load."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_time_fitted_schedule_holds_the_peak_then_decays_in_its_last_fraction(kind):
    s = train.TimeFittedSchedule(kind, warmup=10, total=111, min_ratio=0.1, decay_fraction=0.2)
    lrs = [s(k) for k in range(115)]
    floor = 0.1 if kind == "cosine" else 0.0
    assert lrs[:10] == [k / 10 for k in range(10)]  # warmup
    assert lrs[10:90] == [1.0] * 80  # stable: 80% of the 100 steps after warmup
    decay = lrs[90:111]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and decay[0] == 1.0 and 1.0 > decay[10] > floor
    assert lrs[110] == pytest.approx(floor) and lrs[114] == pytest.approx(floor)  # the last planned step trains at the floor
    whole = train.TimeFittedSchedule(kind, warmup=10, total=111, min_ratio=0.1, decay_fraction=1.0)
    assert 1.0 > whole(30) > whole(60) > whole(90) > floor  # 1.0: the decay spans the run, like the Trainer's curves


def test_max_time_plans_the_schedule_to_end_at_min_lr_and_a_resume_keeps_the_plan(tmp_path, monkeypatch):
    import torch

    from llmctl.errors import ConfigError

    budget = 6.0
    monkeypatch.setattr(train, "time", _Clock(0.05))  # train's clock readings only: a few per step
    over = {"max_steps": 100000, "max_time": budget, "warmup_steps": 3, "lr": 1e-3, "min_lr_ratio": 0.1,
            "save_every": 4, "keep_last": 1000, "keep_best": False, "eval_every": 100000}
    path, cfg, rd = _setup(tmp_path, train=over)
    res = train.run(cfg, rd)
    # The plan, not max_steps, ended the run, and it ended on the schedule's floor.
    assert res["stopped_by"] == "max_time" and 8 < res["steps"] < 100000, res
    assert res["planned_steps"] == res["steps"], res
    logged = [r for r in _records(rd) if "lr" in r]
    assert logged[-1]["step"] == res["steps"]
    assert abs(logged[-1]["lr"] - 1e-3 * 0.1) < 1e-9, logged[-1]
    assert logged[len(logged) // 2]["lr"] == pytest.approx(1e-3)  # warmup-stable-decay: the peak holds, then decays
    # The planned number of steps is what the measured speed fits into the budget.
    sps = res["sec_per_step"]
    assert sps > 0 and logged[-1]["elapsed_s"] > 0.6 * budget, (sps, logged[-1])
    assert logged[-1]["elapsed_s"] < budget + 10 * sps + 1.0, (sps, logged[-1])
    mid = logged[len(logged) // 3]
    measured = (logged[-1]["elapsed_s"] - mid["elapsed_s"]) / (logged[-1]["step"] - mid["step"])
    assert 0.4 < measured / sps < 2.5, (measured, sps)
    # The plan is part of the checkpoint: a resumed run keeps the schedule its checkpoint planned.
    ckpt = train.complete_checkpoints(rd)[1]  # step 8: after the warmup and the first plan
    planned_then = json.loads((ckpt / train.META).read_text())["planned_steps"]
    state = torch.load(ckpt / "scheduler.pt", weights_only=True)["lr_lambdas"][0]
    assert state["planned"] and state["total"] == planned_then > 8
    for p in train.complete_checkpoints(rd)[2:]:
        shutil.rmtree(p)
    shutil.rmtree(rd.model_dir)
    (rd.stage_dir("train") / "manifest.json").unlink()
    # The budget is a result key of a time-fitted schedule: a resume with another one is refused.
    with pytest.raises(ConfigError, match=r"train.max_time: 6.0 -> 600.0.*--set train.max_time=6.0"):
        train.run(load_config(path, ["train.max_time=600"]), rd)
    monkeypatch.setattr(train, "time", _Clock(0.005))  # a faster machine now: the plan, not the clock, ends it
    res2 = train.run(cfg, rd)
    assert res2["steps"] == planned_then == res2["planned_steps"], (res2, planned_then)
    last = [r for r in _records(rd) if "lr" in r][-1]
    assert last["step"] == planned_then and abs(last["lr"] - 1e-4) < 1e-9, last


@pytest.mark.parametrize("native", [False, True])
def test_bf16_training_on_a_cpu_without_native_bf16_says_so_and_how_to_fix_it(tmp_path, monkeypatch, native):
    """On a CPU without AVX-512, torch's bf16 matmuls are plain loops (measured: 120x slower than
    fp32 on this project's AVX2 machine); a run asked for bf16 there still trains, with one line
    on stderr naming the key and the fix. Where oneDNN does bf16, nothing is said."""
    from llmctl.train import build

    monkeypatch.setattr(build, "native_bf16", lambda: native)
    path, _, rd = _setup(tmp_path, train={"max_steps": 2, "precision": "bf16", "device": "cpu"})
    r = invoke_cli("train", str(path))
    assert r.returncode == 0, r.stderr
    said = "train.precision: bf16 on this CPU" in r.stderr
    assert said != native, r.stderr
    if said:
        assert "set train.precision: fp32" in r.stderr
