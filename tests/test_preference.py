"""Preference training: data.format=preference, train.method dpo/orpo/simpo, the preference eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, tiny_config_dict, write_config

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def write_pairs(path: Path, n: int = 40, extra: list[dict] | None = None) -> Path:
    """Pairs whose chosen answer repeats the prompt's word and whose rejected answer is noise."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append({"prompt": f"say {w} {i}:", "chosen": f" {w} {w} {w}", "rejected": f" zz qq {i % 3}"})
    rows += extra or []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_unpaired(path: Path, n: int = 40) -> Path:
    """kto's rows: the pairs' answers as labelled completions (labels as bools and as strings)."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        good = i % 2 == 0
        rows.append({"prompt": f"say {w} {i}:", "completion": f" {w} {w} {w}" if good else f" zz qq {i % 3}",
                     "label": good if i % 4 else ("true" if good else "false")})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_config(tmp_path: Path, train: dict | None = None, data: dict | None = None, **sections) -> Path:
    """A tiny preference run in tmp_path/run: pairs for dpo/orpo/simpo, labelled rows for kto."""
    kto = (train or {}).get("method") == "kto"
    rows = write_unpaired(tmp_path / "rows.jsonl") if kto else write_pairs(tmp_path / "pairs.jsonl")
    cfg = tiny_config_dict(tmp_path / "run", **sections)
    cfg["data"].update({"paths": [str(rows)], "format": "unpaired_preference" if kto else "preference",
                        "validation_fraction": 0.2, "block_size": 48}, **(data or {}))
    cfg["train"].update({"method": "dpo", "lr": 5e-3, "eval_every": 100, "save_every": 100}, **(train or {}))
    return write_config(tmp_path / "cfg.yaml", cfg)


# --------------------------------------------------------------------------- data
def test_prepare_writes_pairs_and_drops_equal_answers(tmp_path):
    from datasets import load_from_disk

    extra = [{"prompt": "same", "chosen": "x", "rejected": "x"}, {"prompt": "same2", "chosen": " y ", "rejected": "y"}]
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=20, extra=extra)
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(pairs)], "format": "preference", "validation_fraction": 0.2})
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode == 0, r.stderr
    ds = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) + len(ds["validation"]) == 20
    assert ds["train"].column_names == ["prompt", "chosen", "rejected"]
    stats = json.loads((tmp_path / "run" / "prepare" / "stats.json").read_text())
    assert stats["format"] == "preference"
    assert stats["skipped_reasons"] == {"chosen_equals_rejected": 2}
    assert stats["splits"]["train"]["examples"] == len(ds["train"]) and stats["splits"]["train"]["tokens"] > 0


def test_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a", "good": "b", "rejected": "c"}) + "\n")
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(p)], "format": "preference"})
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode != 0
    assert "pairs.jsonl:2" in r.stderr and "chosen" in r.stderr and "data.chosen_field" in r.stderr


def test_field_names_configurable_and_dedup_on_the_pair(tmp_path):
    from datasets import load_from_disk

    rows = [{"q": f"q{i % 5}", "good": "yes", "bad": f"no{i % 5}"} for i in range(20)]  # 5 distinct pairs, each 4 times
    rows += [{"q": "q0", "good": "yes", "bad": "other"}]  # same prompt and chosen, another rejected: a new pair
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(p)], "format": "preference", "prompt_field": "q", "chosen_field": "good", "rejected_field": "bad",
                        "validation_fraction": 0.0, "curate": {"enabled": True, "near_dedup": {"enabled": False}}})
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode == 0, r.stderr
    ds = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))
    assert len(ds["train"]) == 6
    report = json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())
    assert not report["plan"].get("quality") and not report["plan"].get("language")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("train, data, words", [
    ({"method": "orpo", "loss_type": "ipo"}, {}, ["train.loss_type", "orpo"]),
    ({"method": "dpo", "simpo_gamma": 0.5}, {}, ["train.simpo_gamma", "dpo"]),
    ({"method": "sft", "beta": 0.1}, {"format": "text"}, ["train.beta", "sft"]),
    ({"method": "kto"}, {"format": "preference"}, ["train.method=kto", "unpaired_preference"]),
    ({"method": "dpo", "desirable_weight": 2.0}, {}, ["train.desirable_weight", "kto"]),
    ({"method": "dpo"}, {"format": "text"}, ["data.format=text", "preference"]),
    ({"method": "dpo"}, {"distill": {"teacher": "runs/x"}}, ["distill section", "train.method: sft"]),
])
def test_wrong_key_for_method_is_exit_2(tmp_path, train, data, words):
    sections = {"distill": data.pop("distill")} if "distill" in data else {}
    r = invoke_cli("config", "validate", str(pref_config(tmp_path, train=train, data=data, **sections)))
    assert r.returncode == 2, r.stdout + r.stderr
    for w in words:
        assert w in r.stderr + r.stdout


# --------------------------------------------------------------------------- training
def _implicit_accuracy(run: Path, method_ref: bool = True) -> float:
    """Share of the training pairs where the trained model's log-ratio against the
    initialisation favours chosen (the DPO implicit reward), computed here independently."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.config import load_config
    from llmctl.modeling import build_from_scratch

    tok = AutoTokenizer.from_pretrained(run / "prepare" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run / "train" / "model").eval()
    cfg = load_config(run.parent / "cfg.yaml")
    torch.manual_seed(0)
    ref = build_from_scratch(cfg, tok).eval()

    def logp(m, p, a):
        ids = tok(p + a, add_special_tokens=False)["input_ids"]
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = m(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        return sum(lp[i - 1, ids[i]].item() for i in range(n, len(ids)))

    ds = load_from_disk(str(run / "prepare" / "dataset"))["train"]
    wins = [logp(model, r["prompt"], r["chosen"]) - logp(ref, r["prompt"], r["chosen"])
            > logp(model, r["prompt"], r["rejected"]) - logp(ref, r["prompt"], r["rejected"]) for r in ds]
    return sum(wins) / len(wins)


def test_dpo_raises_preference_accuracy_on_its_pairs(tmp_path):
    cfg = pref_config(tmp_path, train={"max_steps": 8, "beta": 0.5})
    for stage in ("prepare", "train"):
        r = invoke_cli(stage, str(cfg))
        assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["preference"]["method"] == "dpo"
    assert "seeded initialisation" in manifest["preference"]["reference_model"]
    logged = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    acc = [m["rewards/accuracies"] for m in logged if "rewards/accuracies" in m]
    assert acc, logged[:3]
    assert (run / "train" / "model" / "config.json").exists()
    assert _implicit_accuracy(run) > 0.8


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "train" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # the last record of a step wins (a resumed run rewrites it)
    return out


# Every method through the same machinery. dpo and kto (the two trainers with a reference model)
# run on the default tier; orpo and simpo, whose trainers differ only in the loss, on the slow one.
METHODS = ["dpo", "kto", pytest.param("orpo", marks=pytest.mark.slow), pytest.param("simpo", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", METHODS)
def test_resumes_after_a_kill_like_an_uninterrupted_run(tmp_path, method):
    from tests.conftest import run_cli

    train = {"method": method, "max_steps": 6, "save_every": 3, "log_every": 1}
    runs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs[name] = pref_config(tmp_path / name, train=train)
        assert invoke_cli("prepare", str(runs[name])).returncode == 0
    assert invoke_cli("train", str(runs["a"])).returncode == 0
    r = run_cli("train", str(runs["b"]), env={"LLMCTL_FAULT_KILL_AFTER_SAVE": "3"})
    assert r.returncode == -9, r.stderr
    r = invoke_cli("train", str(runs["b"]))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    full, resumed = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert sorted(resumed) == list(range(1, 7))
    assert len({round(v, 6) for v in full.values()}) > 1, full  # the model moved: equal losses below mean something
    for step in range(4, 7):  # the reference model is rebuilt the same: the same losses after the resume
        assert abs(resumed[step] - full[step]) < 1e-4, (step, resumed[step], full[step])


@pytest.mark.parametrize("method", ["dpo", pytest.param("kto", marks=pytest.mark.slow), pytest.param("orpo", marks=pytest.mark.slow),
                                    pytest.param("simpo", marks=pytest.mark.slow)])  # one handler for every method: dpo covers it
def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, method):
    import signal
    import subprocess
    import sys
    import time

    cfg = pref_config(tmp_path, train={"method": method, "max_steps": 100000, "log_every": 1})
    assert invoke_cli("prepare", str(cfg)).returncode == 0
    metrics = tmp_path / "run" / "train" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "train", str(cfg)], cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and '"loss"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "resume" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())["status"] == "interrupted"
    assert any((tmp_path / "run" / "train" / "checkpoints").glob("step-*/llmctl.json")), err


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo", "simpo"])
def test_max_time_and_nan_stop_every_method(tmp_path, method):
    """max_time ends cleanly with a model and a checkpoint; a NaN step fails the run (exit 1, no
    model) on the step it happens; the manifest names the reference for methods that have one."""
    cfg = pref_config(tmp_path, train={"method": method, "max_steps": 100000, "max_time": 2})
    assert invoke_cli("prepare", str(cfg)).returncode == 0
    r = invoke_cli("train", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["stopped_by"] == "max_time" and 0 < res["steps"] < 100000 and "val_ppl" not in res
    run = tmp_path / "run"
    assert (run / "train" / "model" / "config.json").exists()
    assert any((run / "train" / "checkpoints").glob("step-*/llmctl.json"))
    ref = json.loads((run / "train" / "manifest.json").read_text())["preference"]["reference_model"]
    assert (ref is not None and "seeded initialisation" in ref) == (method in ("dpo", "kto")), ref

    r = invoke_cli("train", str(cfg), "--force", "--set", "train.lr=1e30", "--set", "train.max_grad_norm=null",
                   "--set", "train.scheduler=constant", "--set", "train.max_steps=6", "--set", "train.max_time=null")
    assert r.returncode == 1 and "NaN" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert json.loads((run / "train" / "manifest.json").read_text())["status"] == "failed"
    assert not (run / "train" / "model").exists()


@pytest.mark.parametrize("method, keys", [("orpo", {"beta": 0.2}), ("simpo", {"simpo_gamma": 0.3})])
def test_orpo_and_simpo_train_and_save_a_model(tmp_path, method, keys):
    cfg = pref_config(tmp_path, train={"method": method, "max_steps": 3, **keys})
    for stage in ("prepare", "train"):
        r = invoke_cli(stage, str(cfg))
        assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert (run / "train" / "model" / "config.json").exists()
    pref = json.loads((run / "train" / "manifest.json").read_text())["preference"]
    assert pref["method"] == method and pref["reference_model"] is None
    # no reference to keep still; the start's log-probs are recorded for eval's reference (the start)
    assert len(pref["reference_probe"]["logps"]) == 16 and "after_training" not in pref["reference_probe"]
    assert sorted(_losses(run)) == [1, 2, 3]
    _counts_tokens(run)


def _counts_tokens(run):
    """tokens and tokens/s in metrics.jsonl count the pairs' tokens (TRL's batches have no input_ids:
    the Trainer alone counted 0)."""
    recs = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    tokens = [r["tokens"] for r in recs]
    assert tokens[0] > 0 and tokens == sorted(set(tokens)) and all(r["tokens_per_s"] > 0 for r in recs), recs


# --------------------------------------------------------------------------- eval
def test_eval_reports_preference_accuracy_and_gates_on_it(tmp_path, monkeypatch):
    cfg = pref_config(tmp_path, train={"max_steps": 8, "beta": 0.5}, eval={"compare_init": True})
    for stage in ("prepare", "train"):
        r = invoke_cli(stage, str(cfg))
        assert r.returncode == 0, r.stderr
    r = invoke_cli("eval", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    p = res["preference"]
    assert p["pairs"] == 8 and p["preference_accuracy"] >= 0.75 and p["reward_margin"] > 0
    assert p["chosen_tokens"] > 0 and p["rejected_tokens"] > 0
    assert "chosen answers" in res["perplexity"]["source"]
    assert res["init"]["preference_accuracy"] == 0.0 and res["init"]["reward_margin"] == 0.0  # the start is the reference
    # BLEU of the generated answers against the chosen ones, before and after: what tuning did to writing them
    assert res["generation"]["examples"] == 8 and "bleu" in res["init"] and res["generation"]["bleu"] >= 0
    preds = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {r["reference"] for r in preds} <= {f"{w} {w} {w}" for w in WORDS}
    r = invoke_cli("eval", str(cfg), "--set", "eval.thresholds.preference_accuracy_min=0.7")
    assert r.returncode == 0, r.stderr

    # The model card names the method, its reference model and the preference numbers.
    r = invoke_cli("export", str(cfg), "--set", "export.formats=[hf]")
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "run" / "export" / "hf" / "README.md").read_text()
    assert "method: dpo (beta 0.5); reference model: the seeded initialisation" in card, card
    assert f"preference accuracy {p['preference_accuracy']} (the starting model: 0.0)" in card, card

    # The gate: a model that prefers too few chosen answers fails it (exit 4), naming the threshold.
    from llmctl.stages import evaluate

    monkeypatch.setattr(evaluate, "_preference", lambda *a, **k: {**p, "preference_accuracy": 0.25})
    r = invoke_cli("eval", str(cfg), "--force", "--set", "eval.thresholds.preference_accuracy_min=0.7", "--set", "eval.compare_init=false")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "eval.thresholds.preference_accuracy_min" in r.stderr


def _probe_logps(model, run: Path, rows: int) -> list[float]:
    """The log-probs ReferenceProbe records, of `model` on the first `rows` validation pairs."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from llmctl.train.preference import answer_logps, row_answers

    tok = AutoTokenizer.from_pretrained(run / "prepare" / "tokenizer")
    ds = load_from_disk(str(run / "prepare" / "dataset"))["validation"].select(range(rows))
    prompts, answers = row_answers(ds)
    return [x for x, _ in answer_logps(model, tok, prompts, answers, 48, 8)]


def test_the_reference_is_the_untouched_start_in_training_and_in_eval(tmp_path, monkeypatch):
    """After DPO training, the frozen reference scores the held-out rows exactly as the untouched
    initialisation (rebuilt here) does, and so does the reference eval rebuilds; eval refuses a
    reference that is not the start (exit 3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.config import load_config
    from llmctl.modeling import build_from_scratch

    cfg = pref_config(tmp_path, train={"max_steps": 6, "beta": 0.5})
    for stage in ("prepare", "train", "eval"):
        r = invoke_cli(stage, str(cfg))
        assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    probe = json.loads((run / "train" / "manifest.json").read_text())["preference"]["reference_probe"]
    assert probe["split"] == "validation" and probe["rows"] == 8 and len(probe["logps"]) == 16
    assert probe["after_training"] == {"max_abs_diff": 0.0, "unchanged": True}

    init = build_from_scratch(load_config(cfg), AutoTokenizer.from_pretrained(run / "prepare" / "tokenizer")).eval()
    expect = _probe_logps(init, run, 8)
    assert all(abs(a - b) < 1e-4 for a, b in zip(probe["logps"], expect)), (probe["logps"], expect)
    tuned = _probe_logps(AutoModelForCausalLM.from_pretrained(run / "train" / "model"), run, 8)
    assert max(abs(a - b) for a, b in zip(tuned, expect)) > 0.05  # the probe tells the trained model from its start
    check = json.loads((run / "eval" / "results.json").read_text())["preference"]["reference_check"]
    assert check["matches_training"] and check["max_abs_diff"] < 1e-4 and check["unchanged_by_training"], check

    # Eval with a reference that is not the start (here: the tuned model) stops with the fix.
    from llmctl.train import preference

    monkeypatch.setattr(preference, "reference_model", lambda cfg, tok: AutoModelForCausalLM.from_pretrained(run / "train" / "model").eval())
    r = invoke_cli("eval", str(cfg), "--force")
    assert r.returncode == 3 and "is not the one" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_lora_dpo_on_top_of_a_previous_run(tmp_path):
    """The starting model is a previous run's model (model.name_or_path); with LoRA the
    reference is that base with the adapter disabled, and eval rebuilds it from the same path."""
    from llmctl.config import load_config
    from tests.conftest import build_trained_run

    sft = load_config(write_config(tmp_path / "sft.yaml", tiny_config_dict(tmp_path / "sft")))
    base = build_trained_run(tmp_path / "sft", sft).model_dir
    cfg = pref_config(tmp_path, train={"max_steps": 6, "lr": 2e-2}, tokenizer={"name_or_path": str(base)},
                      model={"name_or_path": str(base), "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}})
    for stage in ("prepare", "train", "eval"):
        r = invoke_cli(stage, str(cfg))
        assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    pref = json.loads((run / "train" / "manifest.json").read_text())["preference"]
    assert pref["reference_model"] == f"{base} (LoRA adapter disabled)"
    assert pref["reference_identity"]["path"] == str(base.resolve()) and pref["reference_identity"]["model_hash"]
    res = json.loads((run / "eval" / "results.json").read_text())["preference"]
    assert res["pairs"] == 8 and res["reward_margin"] != 0.0
    assert res["reference_check"]["matches_training"] and res["reference_check"]["unchanged_by_training"]

    # The adapter-disabled base of the trained adapter is the untouched starting model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = _probe_logps(AutoModelForCausalLM.from_pretrained(base), run, 8)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "train" / "adapter")
    with tuned.disable_adapter():
        disabled = _probe_logps(tuned, run, 8)
    assert all(abs(a - b) < 1e-4 for a, b in zip(disabled, start)), (disabled, start)
    assert max(abs(a - b) for a, b in zip(_probe_logps(tuned, run, 8), start)) > 0.01  # the adapter itself moved
    probe = json.loads((run / "train" / "manifest.json").read_text())["preference"]["reference_probe"]
    assert all(abs(a - b) < 1e-4 for a, b in zip(probe["logps"], start)) and probe["after_training"]["unchanged"]

    # Staleness: the starting model retrained in place is another reference, so this run is stale
    # and is not continued or silently kept; the same model again (touched, same bytes) is not.
    import os

    w = base / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert invoke_cli("train", str(cfg)).returncode == 0  # same bytes: up to date
    from tests.conftest import save_random_model
    from llmctl.rundir import RunDir

    save_random_model(RunDir(tmp_path / "sft"), sft, seed=1)
    r = invoke_cli("train", str(cfg))
    assert r.returncode == 2 and "starting (reference) model's weights" in r.stderr and "--force" in r.stderr, r.stderr
    r = invoke_cli("status", str(run), "--json")
    assert "starting (reference) model" in r.stdout, r.stdout


def test_chat_pairs_share_their_prompt_rendered_with_the_template(tmp_path):
    from datasets import load_from_disk

    rows = []
    for i in range(12):
        ask = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"name {WORDS[i % 8]} {i}"}]
        rows.append({"chosen": ask + [{"role": "assistant", "content": WORDS[i % 8]}],
                     "rejected": ask + [{"role": "assistant", "content": f"no {i}"}]})
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}) + "\n")
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(p)], "format": "preference", "validation_fraction": 0.0})
    cfg["train"].update({"method": "dpo", "max_steps": 2})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    r = invoke_cli("prepare", str(path))
    assert r.returncode != 0 and "pairs.jsonl:13" in r.stderr and "last assistant turn" in r.stderr
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for stage in ("prepare", "train"):
        r = invoke_cli(stage, str(path))
        assert r.returncode == 0, r.stderr
    row = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))["train"][0]
    assert "be brief" in row["prompt"] and "name " in row["prompt"] and "be brief" not in row["chosen"]
    assert row["chosen"].strip() and row["chosen"] != row["rejected"]
    assert row["chosen"].endswith("<|endoftext|>")  # one EOS: TRL adds none to an answer ending on it



def test_kto_trains_on_labelled_completions_and_eval_scores_them(tmp_path):
    path = pref_config(tmp_path, train={"method": "kto", "beta": 0.5, "max_steps": 8})
    p = tmp_path / "rows.jsonl"
    for stage in ("prepare", "train", "eval"):
        r = invoke_cli(stage, str(path))
        assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    assert json.loads((run / "train" / "manifest.json").read_text())["preference"]["method"] == "kto"
    _counts_tokens(run)
    res = json.loads((run / "eval" / "results.json").read_text())["preference"]
    assert res["desirable"] + res["undesirable"] == 8 and res["preference_accuracy"] >= 0.75 and res["reward_margin"] > 0

    p.write_text(json.dumps({"prompt": "a", "completion": "b", "label": "maybe"}) + "\n")
    r = invoke_cli("prepare", str(path), "--force")
    assert r.returncode != 0 and "rows.jsonl:1" in r.stderr and "'label'" in r.stderr


def test_builtin_corpus_gives_pairs_whose_rejected_answer_comes_from_another_file(tmp_path):
    from datasets import load_from_disk

    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"] = {"source": "builtin", "format": "preference", "max_bytes": 200000, "block_size": 64, "curate": {"enabled": False}}
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode == 0, r.stderr
    ds = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))["train"]
    assert len(ds) > 20
    assert all(row["chosen"] != row["rejected"] for row in ds)
    assert sum(row["rejected"] in row["prompt"] for row in ds) < len(ds) / 4  # not the prompt's own lines


def test_validate_warns_about_preference_training_from_scratch(tmp_path):
    r = invoke_cli("config", "validate", str(pref_config(tmp_path)))
    assert r.returncode == 0 and "train.method=dpo with no model.name_or_path" in r.stderr


# --------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("method", ["dpo", pytest.param("kto", marks=pytest.mark.slow), pytest.param("orpo", marks=pytest.mark.slow),
                                    pytest.param("simpo", marks=pytest.mark.slow)])  # the launch is the same for every method: dpo covers it
def test_two_processes_match_one(tmp_path, method):
    """`--nproc 2` (gloo on CPU): 2 ranks x 2 pairs == 1 rank x 4 pairs, step by step, with the
    reference copy on each rank; one result, one model, the lineage written by rank 0. kto's
    KL term pairs each completion with another of the same rank's batch, so 2 x 2 is another
    estimate than 1 x 4: it is checked to train, not to match. orpo's NLL term is a mean over each
    rank's own tokens (DDP then averages the ranks), not over the whole batch's: it matches to 0.1%."""
    from tests.conftest import run_cli

    losses = {}
    for name, nproc, batch in (("one", 1, 4), ("two", 2, 2)):
        (tmp_path / name).mkdir()
        cfg = pref_config(tmp_path / name, train={"method": method, "max_steps": 3, "micro_batch_size": batch, "log_every": 1})
        assert invoke_cli("prepare", str(cfg)).returncode == 0
        r = run_cli("train", str(cfg), "--nproc", "2", "--json", timeout=600) if nproc == 2 else invoke_cli("train", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)  # exactly one object: the launcher's, with rank 0's numbers
        assert res["world_size"] == nproc and res["steps"] == 3
        run = tmp_path / name / "run"
        assert json.loads((run / "train" / "manifest.json").read_text())["preference"]["method"] == method
        assert (run / "train" / "model" / "model.safetensors").is_file()
        losses[name] = _losses(run)
    a, b = losses["one"], losses["two"]
    assert sorted(a) == sorted(b) == [1, 2, 3]
    if method != "kto":
        for s in a:
            assert abs(a[s] - b[s]) < (1e-3 * abs(a[s]) if method == "orpo" else 1e-4), (s, a[s], b[s])


# --------------------------------------------------------------------------- the safety demo's data
def test_safety_pairs_refuse_comply_and_keep_the_red_team_prompts_held_out(tmp_path):
    import subprocess
    import sys

    from llmctl.safety import is_refusal, load_redteam
    from tests.conftest import REPO

    data = REPO / "configs" / "data" / "safety-pairs.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) >= 100 and {r["category"] for r in rows} == {"secrets", "pii", "abuse", "jailbreak"}
    assert all(is_refusal(r["chosen"]) and not is_refusal(r["rejected"]) for r in rows)
    red = {it["prompt"].strip().lower() for it in load_redteam()}
    assert not red & {r["prompt"].strip().lower() for r in rows}  # eval's red team measures on prompts training never saw
    # the committed file is what its generator writes
    gen = tmp_path / "make_safety_pairs.py"
    gen.write_text((REPO / "configs" / "data" / "make_safety_pairs.py").read_text().replace(
        'HERE = Path(__file__).resolve().parent\n', f'HERE = Path({str(tmp_path)!r})\n').replace(
        "HERE.parents[1]", repr(str(REPO)) + " and Path(" + repr(str(REPO)) + ")"))
    subprocess.run([sys.executable, str(gen)], check=True, capture_output=True)
    assert (tmp_path / "safety-pairs.jsonl").read_text() == data.read_text()


def test_is_refusal():
    from llmctl.safety import is_refusal

    assert is_refusal(" I can't help with that.") and is_refusal("Sorry, I cannot do that") and is_refusal("REFUSED", "REFUSED")
    assert is_refusal("I won’t write insults.")  # a typographic apostrophe
    assert not is_refusal("Sure, here it is: AKIAABCDEFGHIJKLMNOP") and not is_refusal("def f(x):\n    return x  # I can't")
