"""`llmctl distill`: the loss, pruning, the teacher's lineage and staleness, accumulation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_prepared_run, build_trained_run, invoke_cli, run_cli, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.errors import ConfigError, StageInputError
from llmctl.stages import distill


def _tiny_llama(n_layers=4, seed=0, vocab=50, inter=64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    mc = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=inter, num_hidden_layers=n_layers, num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(mc).eval()


def _tiny_gpt2(n_layers=3, seed=0, vocab=50):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_inner=64, n_layer=n_layers, n_head=2, n_positions=64)).eval()


# --------------------------------------------------------------------------- the loss
def test_loss_is_alpha_kl_t2_plus_ce_masked_and_chunking_changes_nothing():
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    s = torch.randn(2, 6, 11, requires_grad=True)
    t = torch.randn(2, 6, 13)  # a teacher with a padded vocabulary: its 2 extra rows are ignored
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3:] = -100
    T, alpha = 2.0, 0.3
    mask = labels[:, 1:] != -100
    ss, tt, yy = s[:, :-1][mask], t[:, :-1][mask][:, :11], labels[:, 1:][mask]
    ce = F.cross_entropy(ss, yy, reduction="sum")
    pt, ps = F.softmax(tt / T, -1), F.softmax(ss / T, -1)
    fwd = (pt * (pt.log() - ps.log())).sum()
    rev = (ps * (ps.log() - pt.log())).sum()
    for kl, want_kl in (("forward", fwd), ("reverse", rev)):
        want = alpha * T * T * want_kl + (1 - alpha) * ce
        grads = []
        for chunk in (1, 3, 1000):
            s.grad = None
            total, ce_sum, kl_sum, n = distill.distill_loss_sum(s, t, labels, alpha=alpha, temperature=T, kl=kl, chunk=chunk)
            assert n == int(mask.sum()) == 7
            assert torch.allclose(total, want, atol=1e-5) and torch.allclose(kl_sum, want_kl, atol=1e-5) and torch.allclose(ce_sum, ce, atol=1e-5)
            total.backward()
            grads.append(s.grad.clone())
        assert torch.allclose(grads[0], grads[2], atol=1e-6) and torch.allclose(grads[1], grads[2], atol=1e-6)
        assert grads[0][0, 3:].abs().sum() == 0  # masked positions get no gradient
    total, ce_sum, kl_sum, _ = distill.distill_loss_sum(s, None, labels, alpha=0.0, temperature=T, kl="forward", chunk=4)
    assert torch.allclose(total, ce) and kl_sum == 0  # alpha 0: CE only, no teacher needed


def test_teacher_rows_equal_the_teachers_logits():
    import torch

    for teacher in (_tiny_llama(2), _tiny_gpt2(2)):
        ids = torch.randint(0, 50, (2, 7))
        full = teacher(input_ids=ids).logits[:, :-1].reshape(-1, 50)
        idx = torch.tensor([0, 5, 11])
        got = distill._teacher_rows(teacher, {"input_ids": ids})(idx)
        assert torch.allclose(got, full[idx], atol=1e-5)


# --------------------------------------------------------------------------- pruning
def test_block_influence_drops_the_layer_that_does_nothing_and_generate_works(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.config import DistillConfig

    m = _tiny_llama(4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: influence 0
        m.model.layers[2].self_attn.o_proj.weight.zero_()
        m.model.layers[2].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 50, (2, 9))
    batches = [{"input_ids": ids, "labels": ids}]
    info = distill.prune(m, DistillConfig(teacher="x", student_init="prune", keep_layers=3, mlp_size=40), batches)
    assert info["dropped_layers"] == [2] and info["block_influence"][2] < 1e-6 < min(info["block_influence"][i] for i in (0, 1, 3))
    assert m.config.num_hidden_layers == 3 and [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1, 2]
    assert m.config.intermediate_size == 40 and m.model.layers[0].mlp.up_proj.weight.shape == (40, 32)
    out = m.generate(ids[:, :4], max_new_tokens=5, do_sample=False)  # IndexError in the cache if not renumbered
    m.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert torch.equal(back.generate(ids[:, :4], max_new_tokens=5, do_sample=False), out)

    g = _tiny_gpt2(3)
    info = distill.prune(g, DistillConfig(teacher="x", student_init="prune", drop_layers=[0], mlp_size=16), batches)
    assert info["dropped_layers"] == [0] and g.config.n_layer == 2 and g.config.n_inner == 16
    assert [b.attn.layer_idx for b in g.transformer.h] == [0, 1]
    g.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    g.save_pretrained(tmp_path / "g")
    AutoModelForCausalLM.from_pretrained(tmp_path / "g")

    with pytest.raises(ConfigError, match="keep_layers"):
        distill.prune(_tiny_llama(2), DistillConfig(teacher="x", student_init="prune", keep_layers=2), batches)


def test_config_checks():
    with pytest.raises(ConfigError, match="nothing is pruned"):
        load_config(None, ["distill.teacher=x", "distill.student_init=prune"])
    with pytest.raises(ConfigError, match="need distill.student_init: prune"):
        load_config(None, ["distill.teacher=x", "distill.keep_layers=2"])
    with pytest.raises(ConfigError, match="teacher"):
        load_config(None, ["distill.alpha=0.5"])
    with pytest.raises(ConfigError, match="did you mean 'distill.temperature'"):
        load_config(None, ["distill.teacher=x", "distill.temprature=2"])
    # no distill section: the train stage's config hash is what it was before distill existed
    plain = load_config(None)
    assert plain.section_hash("model", "train", "run.seed", "distill") == plain.section_hash("model", "train", "run.seed")


# --------------------------------------------------------------------------- the stage
def _teacher_and_student(tmp_path, teacher_layers=2, train=None, **distill_keys):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tcfg = load_config(write_config(tmp_path / "t.yaml", tiny_config_dict(tmp_path / "teacher", model={"n_layers": teacher_layers})))
    build_trained_run(tmp_path / "teacher", tcfg)
    keys = {"teacher": str(tmp_path / "teacher"), "student_init": "prune", "drop_layers": [0], **distill_keys}
    path = write_config(tmp_path / "s.yaml", tiny_config_dict(tmp_path / "student", distill=keys, train=train or {}))
    cfg = load_config(path)
    rd = build_prepared_run(tmp_path / "student", cfg)
    return path, cfg, rd


def _losses(rd) -> dict[int, float]:
    out = {}
    for line in rd.metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_grad_accumulation_1x8_equals_2x4(tmp_path):
    """The Trainer's accumulation pitfall: compute_loss must be scaled by num_items_in_batch."""
    losses = []
    for mb, ga in ((8, 1), (4, 2)):
        _, cfg, rd = _teacher_and_student(tmp_path / f"{mb}x{ga}", train={"max_steps": 2, "micro_batch_size": mb, "grad_accum": ga, "eval_every": 100, "save_every": 100, "lr": 1e-2})
        distill.run(cfg, rd)
        losses.append(_losses(rd))
    assert sorted(losses[0]) == [1, 2]
    for step in (1, 2):
        assert abs(losses[0][step] - losses[1][step]) < 1e-4, losses


def test_cli_distill_lineage_staleness_and_later_stages(tmp_path):
    path, cfg, rd = _teacher_and_student(tmp_path, alpha=0.7)
    r = invoke_cli("distill", str(path), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == 4 and res["pruned_layers"] == [0] and res["alpha"] == 0.7
    m = rd.manifest("train")
    teacher_m = json.loads((tmp_path / "teacher" / "train" / "manifest.json").read_text())
    assert m["teacher"]["run_id"] == teacher_m["id"] and len(m["teacher"]["model_hash"]) == 64
    assert m["student_init"]["student_layers"] == 1
    recs = [json.loads(x) for x in rd.metrics_path.read_text().splitlines()]
    assert any("kl_loss" in x and "ce_loss" in x for x in recs)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(rd.model_dir).num_hidden_layers == 1
    r = invoke_cli("generate", str(path), "--prompt", "the quick", "--json")  # later stages see an ordinary RUN/train
    assert r.returncode == 0, r.stderr
    rd.require("train", cfg)

    # The teacher is re-trained: the student is stale, and the message names distill.
    teacher_m["id"] = "retrained"
    (tmp_path / "teacher" / "train" / "manifest.json").write_text(json.dumps(teacher_m))
    with pytest.raises(StageInputError, match=r"teacher .* was re-run since.*llmctl distill"):
        rd.require("train", cfg)
    # `llmctl train` on a distill config points to distill.
    from llmctl.stages import train

    with pytest.raises(ConfigError, match="llmctl distill"):
        train.run(cfg, rd)


def test_tokenizer_mismatch_exits_2_before_any_work(tmp_path):
    tcfg = load_config(write_config(tmp_path / "t.yaml", tiny_config_dict(tmp_path / "teacher", tokenizer={"vocab_size": 280})))
    build_trained_run(tmp_path / "teacher", tcfg)
    teacher_dir = tmp_path / "teacher" / "train" / "model"
    path = write_config(tmp_path / "s.yaml", tiny_config_dict(tmp_path / "student", distill={"teacher": str(teacher_dir)}))
    cfg = load_config(path)
    rd = build_prepared_run(tmp_path / "student", cfg)
    with pytest.raises(ConfigError, match="tokenizer differs") as e:
        distill.run(cfg, rd)
    assert e.value.exit_code == 2 and not rd.stage_dir("train").exists()
    missing = load_config(path, [f"distill.teacher={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        distill.run(missing, rd)


def test_teacher_dir_weights_change_makes_student_stale(tmp_path):
    from llmctl.rundir import teacher_changed

    tcfg = load_config(write_config(tmp_path / "t.yaml", tiny_config_dict(tmp_path / "teacher")))
    build_trained_run(tmp_path / "teacher", tcfg)
    rec = distill.teacher_record(str(tmp_path / "teacher" / "train" / "model"))
    assert rec["kind"] == "dir" and teacher_changed(rec) is None
    w = Path(rec["path"]) / "model.safetensors"
    w.touch()  # same bytes, new mtime: not a change
    assert teacher_changed(rec) is None
    build_trained_run(tmp_path / "teacher2", tcfg, seed=1)
    w.write_bytes((tmp_path / "teacher2" / "train" / "model" / "model.safetensors").read_bytes())
    assert "weights" in teacher_changed(rec)


def test_run_pipeline_distills_when_the_config_has_a_teacher(tmp_path):
    from llmctl.pipeline import run_pipeline
    from llmctl.rundir import RunDir

    called = []

    class Stage:
        def __init__(self, name):
            self.name = name

        def run(self, cfg, rd, force=False):
            called.append(self.name)
            return {}

    cfg = load_config(None, [f"run.dir={tmp_path}", "distill.teacher=somewhere"])
    run_pipeline(cfg, RunDir(tmp_path), Stage, ("prepare", "train", "eval"))
    assert called == ["prepare", "distill", "eval"]
    called.clear()
    run_pipeline(load_config(None, [f"run.dir={tmp_path}"]), RunDir(tmp_path), Stage, ("prepare", "train", "eval"))
    assert called == ["prepare", "train", "eval"]


def test_resume_after_sigkill_matches_uninterrupted_and_a_new_teacher_is_refused(tmp_path):
    import signal

    over = {"max_steps": 4, "save_every": 2, "eval_every": 100, "lr": 1e-2}
    _, ca, rda = _teacher_and_student(tmp_path / "a", train=over)
    distill.run(ca, rda)
    full = _losses(rda)

    pb, cb, rdb = _teacher_and_student(tmp_path / "b", train=over)
    r = run_cli("distill", str(pb), env={"LLMCTL_FAULT_KILL_AFTER_SAVE": "2"})
    assert r.returncode == -signal.SIGKILL and rdb.manifest("train")["status"] == "running"
    r = invoke_cli("distill", str(pb))
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr
    resumed = _losses(rdb)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - full[step]) < 1e-4, (step, resumed, full)

    # Another teacher under the same checkpoints: resuming would mix two teachers.
    (rdb.stage_dir("train") / "manifest.json").unlink()
    tm = tmp_path / "b" / "teacher" / "train" / "manifest.json"
    tm.write_text(tm.read_text().replace(json.loads(tm.read_text())["id"], "another-teacher"))
    with pytest.raises(ConfigError, match="cannot be resumed safely.*the teacher"):
        distill.run(cb, rdb)


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """Distillation is training: SIGTERM mid-run saves a checkpoint and exits 143, then resumes."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    from llmctl.stages import train

    path, _, rd = _teacher_and_student(tmp_path, train={"max_steps": 100000, "save_every": 100000, "eval_every": 100000, "log_every": 1})
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "distill", str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (rd.metrics_path.is_file() and '"loss"' in rd.metrics_path.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "resume" in err and "Traceback" not in err
    assert rd.manifest("train")["status"] == "interrupted"
    assert train.complete_checkpoints(rd), "a checkpoint must be saved on SIGTERM"


@pytest.mark.slow  # torchrun's launch: test_train.py::test_two_processes_match_one; distill's result and lineage: test_cli_distill_*
def test_nproc_2_distills_under_torchrun(tmp_path):
    """`--nproc 2`: two ranks, each with its own teacher copy, one result and one model."""
    path, _, rd = _teacher_and_student(tmp_path, train={"max_steps": 2, "micro_batch_size": 2, "eval_every": 100, "save_every": 100})
    r = run_cli("distill", str(path), "--nproc", "2", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["world_size"] == 2 and res["steps"] == 2
    assert rd.manifest("train")["status"] == "complete" and (rd.model_dir / "model.safetensors").is_file()
    assert rd.manifest("train").get("teacher"), "the teacher's lineage is recorded under torchrun too"


def test_report_to_tensorboard_holds_the_trainer_state_and_the_distill_losses(tmp_path):
    """`train.report_to: [tensorboard]` under distill: the events, read back with tensorboard's own
    EventAccumulator, equal the run's trainer_state.json (loss, and distill's kl_loss/ce_loss)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, cfg, rd = _teacher_and_student(tmp_path, train={"max_steps": 4, "save_every": 4, "eval_every": 100, "log_every": 1,
                                                          "report_to": ["tensorboard"]})
    r = invoke_cli("distill", str(path))
    assert r.returncode == 0, r.stderr
    state = json.loads((rd.checkpoint_dir(4) / "trainer_state.json").read_text())
    acc = EventAccumulator(str(rd.stage_dir("train") / "tensorboard"))
    acc.Reload()
    for key in ("loss", "kl_loss", "ce_loss"):
        want = [(h["step"], h[key]) for h in state["log_history"] if key in h]
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert [s for s, _ in want] == [1, 2, 3, 4] and [s for s, _ in got] == [s for s, _ in want], key
        assert all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for (_, x), (_, y) in zip(got, want)), (key, got, want)  # float32 in the events
    tags = acc.Tags()["tensors"]
    assert "config/text_summary" in tags and "lineage/text_summary" in tags
    assert acc.Scalars("final/val_loss")[0].value == pytest.approx(rd.manifest("train")["headline"]["val_loss"], rel=1e-6)
