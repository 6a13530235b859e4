"""Evaluation breadth (issue #29): ROUGE / exact match / token F1, lm-eval tasks, pass@k in a
sandbox, the bias probe and counterfactual augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import invoke_cli
from llmctl.config import load_config


# --------------------------------------------------------------------------- generation metrics
def test_squad_normalisation_exact_match_and_token_f1():
    from llmctl.evaluation.textmetrics import exact_match, normalize_answer, token_f1

    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert exact_match("the Paris.", "paris") and not exact_match("paris france", "paris")
    # common tokens {sat}: precision 1/2, recall 1/4 (articles dropped from both) -> F1 1/3
    assert token_f1("the cats sat", "the cat sat on the mat") == pytest.approx(1 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c d") == 0.0


def test_rouge_uses_the_porter_stemmer_and_averages_over_examples():
    from rouge_score import rouge_scorer

    from llmctl.metrics import text_metrics

    hyps, refs = ["the cats sat", "a dog ran home quickly"], ["the cat sat on the mat", "the dog ran home"]
    out = text_metrics(hyps, refs, ["rouge1", "rouge2", "rougeL"])
    # by hand, example 1 with stemming (cats -> cat): unigram P 3/3, R 3/6 -> F 2/3
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    first = sc.score(refs[0], hyps[0])["rouge1"].fmeasure
    assert first == pytest.approx(2 / 3)
    for k in ("rouge1", "rouge2", "rougeL"):
        want = sum(sc.score(r, h)[k].fmeasure for h, r in zip(hyps, refs)) / 2 * 100
        assert out[k] == pytest.approx(want, abs=1e-4)
    assert "bleu" not in out and "signatures" not in out  # only what eval.metrics asked for


def test_eval_metrics_choose_what_is_computed_and_what_leads(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("eval", str(path), "--set", "eval.metrics=[token_f1, rougeL]", "--set", "eval.perplexity=false", "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    g = json.loads(rd.results_path.read_text())["generation"]
    assert {"token_f1", "rougeL", "copy_prompt_token_f1", "copy_prompt_rougeL"} <= set(g) and "bleu" not in g and "rouge1" not in g
    assert head["generation_lead"] == "token_f1" and "baseline_copy_rougeL" in head
    preds = [json.loads(line) for line in rd.predictions_path.read_text().splitlines()]
    assert {"token_f1", "rougeL"} <= set(preds[0]) and "bleu" not in preds[0]
    from llmctl.evaluation.textmetrics import token_f1

    assert g["token_f1"] == pytest.approx(sum(token_f1(p["prediction"], p["reference"]) for p in preds) / len(preds), abs=1e-4)
    from llmctl.pipeline import summarize

    s = summarize(rd)
    assert next(k for k in s if k in ("token_f1", "rougeL", "bleu")) == "token_f1"
    assert s["token_f1"]["copy_prompt_baseline"] == g["copy_prompt_token_f1"]


def test_thresholds_min_and_max_gate_any_headline_metric(trained_run):
    path, cfg, rd = trained_run
    base = ["--set", "eval.metrics=[rougeL]", "--set", "eval.perplexity=false"]
    r = invoke_cli("eval", str(path), *base, "--set", "eval.thresholds.min.rougeL=101", "--json")
    assert r.returncode == 4, r.stderr
    out = json.loads(r.stdout)
    assert out["failed_thresholds"][0]["threshold"] == "eval.thresholds.min.rougeL" and "rougeL" in out["error"]
    r = invoke_cli("eval", str(path), *base, "--set", "eval.thresholds.max.rougeL=100")
    assert r.returncode == 0, r.stderr
    r = invoke_cli("eval", str(path), *base, "--set", "eval.thresholds.min.tasks.nope.acc=0.5")
    assert r.returncode == 4 and "tasks.nope.acc was not measured" in r.stderr
    bad = invoke_cli("eval", str(path), "--set", "eval.thresholds.min.rougeL=high")
    assert bad.returncode == 2 and "eval.thresholds.min" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- lm-eval tasks
def write_mc_task(folder: Path, name: str = "llmctl_lines", n: int = 24) -> Path:
    """A local multiple-choice task (dataset_path: json) from SOURCE_WITH_BLANKS: the start of
    a line, then its true rest among the rests of three other lines."""
    import random

    from conftest import SOURCE_WITH_BLANKS

    lines = [ln for ln in SOURCE_WITH_BLANKS.splitlines() if len(ln.split()) >= 2]
    rng = random.Random(0)
    rows = []
    for i in range(n):
        ln = lines[i % len(lines)]
        cut = len(ln) - len(ln.lstrip()) + len(ln.split()[0])
        others = rng.sample([x for x in lines if x != ln], 3)
        choices = [ln[cut:]] + [o[len(o) - len(o.lstrip()) + len(o.split()[0]):] for o in others]
        rng.shuffle(choices)
        rows.append({"context": ln[:cut], "choices": choices, "label": choices.index(ln[cut:])})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder / f"{name}.yaml"


def _lm_eval_cli(model_dir: Path, task_yaml: Path, out: Path, batch: int = 4) -> dict:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
                        "--device", "cpu", "--batch_size", str(batch), "--tasks", task_yaml.stem, "--include_path", str(task_yaml.parent),
                        "--output_path", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"][task_yaml.stem]


def test_local_task_equals_lm_eval_cli_on_the_same_model(tmp_path, tiny_cfg, sharp_model):
    pytest.importorskip("lm_eval")
    path, _ = tiny_cfg
    task = write_mc_task(tmp_path / "tasks")
    mdir = sharp_model(40)
    r = invoke_cli("eval", str(path), "--model", str(mdir), "--set", f"eval.tasks=[{task}]", "--set", "eval.perplexity=false",
                   "--set", "eval.generation=false", "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    ours = json.loads(Path(head["results"]).read_text())["tasks"]["llmctl_lines"]
    theirs = _lm_eval_cli(mdir, task, tmp_path / "lm_eval_out")
    for m in ("acc", "acc_norm"):
        assert ours[m] == pytest.approx(theirs[f"{m},none"], abs=1e-9), (m, ours, theirs)
        assert ours[f"{m}_stderr"] == pytest.approx(theirs[f"{m}_stderr,none"], abs=1e-9)
    assert ours["samples"] == 24 and head["tasks.llmctl_lines.acc"] == ours["acc"]
    assert 0.25 < ours["acc"] < 1.0  # the model knows the text, and the task is not trivial to it
    # The comparison can fail: another model scores differently on the same questions.
    other = invoke_cli("eval", str(path), "--model", str(sharp_model(5)), "--set", f"eval.tasks=[{task}]", "--set", "eval.perplexity=false",
                       "--set", "eval.generation=false", "--json")
    assert json.loads(other.stdout)["tasks.llmctl_lines.acc"] != ours["acc"]


def test_hub_task_without_cached_data_fails_offline_in_one_line(trained_run):
    pytest.importorskip("lm_eval")
    path, cfg, rd = trained_run
    r = invoke_cli("eval", str(path), "--set", "eval.tasks=[arc_easy]", "--set", "eval.perplexity=false", "--set", "eval.generation=false",
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "arc_easy" in ln]
    assert err and "not in the Hugging Face cache" in err[0] and "local task YAML" in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_task_specs_fail_before_any_model_work(tmp_path, trained_run):
    from llmctl.errors import ConfigError
    from llmctl.evaluation import tasks

    path, cfg, rd = trained_run
    task = write_mc_task(tmp_path / "t")
    rel = tmp_path / "rel.yaml"
    rel.write_text(task.read_text().replace(str((tmp_path / "t" / "llmctl_lines.jsonl").resolve()), "data/lines.jsonl"))
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    for spec, want in [(rel, "data_files 'data/lines.jsonl' not found"), (tmp_path / "notask.yaml", "defines no task"),
                       (tmp_path / "missing.yaml", "does not exist")]:
        r = invoke_cli("eval", str(path), "--set", f"eval.tasks=[{spec}]", "--set", "eval.perplexity=false", "--set", "eval.generation=false")
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, (spec, r.stderr)
    # An unknown name: lm-eval's KeyError becomes a one-line config error with the nearest names.
    class TM:
        all_tasks = ["arc_easy", "arc_challenge", "hellaswag"]

    err = tasks._load_error(KeyError("Spec 'arc_esay' is not a registered task/group/tag name or valid YAML path"), ["arc_esay"], TM())
    assert isinstance(err, ConfigError) and "did you mean arc_easy" in str(err)
    names, include, registry = tasks.resolve([str(task), "hellaswag"])
    assert names == ["llmctl_lines", "hellaswag"] and include == [str(task.parent.resolve())] and registry


def test_task_thresholds_and_compare_init(tmp_path, trained_run):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from llmctl.evaluation.tasks import run_tasks
    from llmctl.modeling import build_from_scratch

    path, cfg, rd = trained_run
    task = write_mc_task(tmp_path / "t", n=12)
    r = invoke_cli("eval", str(path), "--set", f"eval.tasks=[{task}]", "--set", "eval.perplexity=false", "--set", "eval.generation=false",
                   "--set", "eval.compare_init=true", "--set", "eval.thresholds.min.tasks.llmctl_lines.acc=1.01", "--json")
    assert r.returncode == 4, r.stderr
    out = json.loads(r.stdout)
    assert out["failed_thresholds"][0]["metric"] == "tasks.llmctl_lines.acc" and "tasks.llmctl_lines.acc" in out["error"]
    res = json.loads(rd.results_path.read_text())
    assert res["tasks"]["llmctl_lines"]["acc"] == out["tasks.llmctl_lines.acc"]
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    init = run_tasks(build_from_scratch(cfg, tok).eval(), tok, [str(task)], num_fewshot=None, limit=None, batch_size=4)
    assert out["init_tasks.llmctl_lines.acc"] == init["llmctl_lines"]["acc"] == res["init"]["tasks"]["llmctl_lines"]["acc"]
    # a cached eval is gated again (thresholds never change the numbers)
    again = invoke_cli("eval", str(path), "--set", f"eval.tasks=[{task}]", "--set", "eval.perplexity=false", "--set", "eval.generation=false",
                       "--set", "eval.compare_init=true", "--set", "eval.thresholds.min.tasks.llmctl_lines.acc=0", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["cached"] is True
    # the model card quotes every task metric with its stderr
    from llmctl.stages import export

    cur = load_config(path, [f"eval.tasks=[{task}]", "eval.perplexity=false", "eval.generation=false", "eval.compare_init=true"])
    card = export._model_card(cur, rd, ["hf"])
    rec = res["tasks"]["llmctl_lines"]
    assert f"- lm-eval llmctl_lines: acc {rec['acc']:.4f} ± {rec['acc_stderr']:.4f}, acc_norm {rec['acc_norm']:.4f}" in card, card


# --------------------------------------------------------------------------- pass@k in a sandbox
def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    from llmctl.evaluation.codeexec import pass_at_k

    for n, c, k in [(10, 1, 1), (10, 3, 5), (20, 0, 10), (5, 5, 1), (10, 8, 5), (200, 13, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)


def test_shipped_tasks_pass_with_their_solutions_and_fail_without():
    from llmctl.evaluation.codeexec import execute_all, load_tasks, program

    tasks = load_tasks(None, "all")
    assert len(tasks) >= 20 and {t["split"] for t in tasks} == {"train", "test"}
    good = execute_all([(i, program(t, t["canonical_solution"])) for i, t in enumerate(tasks)], 10, 256, 2)
    assert all(r["outcome"] == "pass" for r in good.values()), [(tasks[i]["task_id"], r) for i, r in good.items() if r["outcome"] != "pass"]
    bad = execute_all([(i, program(t, "\n    return None\n")) for i, t in enumerate(tasks)], 10, 256, 2)
    assert all(r["outcome"] in ("fail", "error") for r in bad.values())
    assert sum(r["outcome"] == "fail" for r in bad.values()) > len(tasks) // 2


def _marker_processes(marker: str) -> int:
    n = 0
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "cmdline").read_bytes() + (p / "environ").read_bytes():
                n += 1
        except OSError:
            pass
    return n


def test_sandbox_limits(tmp_path, monkeypatch):
    """Each limit tested on a program that tries to break it."""
    import socket
    import time

    from llmctl.evaluation.codeexec import isolation, run_sample

    iso = isolation()
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(444, None, 0, 1) >= 1:  # the kernel offers Landlock (its ABI version): the sandbox must use it
        assert iso["landlock"], iso
    # an infinite loop: killed at the timeout, counted as timeout
    t0 = time.time()
    assert run_sample("while True:\n    pass\n", 2, 256)["outcome"] == "timeout"
    assert time.time() - t0 < 10
    # a fork bomb: refused (RLIMIT_NPROC, or the Python guard as root), and nothing survives the sample
    marker = f"llmctl-forkbomb-{tmp_path.name}"
    r = run_sample(f"import os\nos.environ['M'] = '{marker}'\nwhile True:\n    os.fork()\n", 5, 256)
    assert r["outcome"] == "error" and ("Resource temporarily unavailable" in r["detail"] or "disabled" in r["detail"]), r
    time.sleep(0.5)
    assert _marker_processes(marker) == 0
    # writing outside the temporary directory: refused by the kernel (Landlock); inside it works
    target = tmp_path / "escaped.txt"
    if iso["landlock"]:
        r = run_sample(f"open({str(target)!r}, 'w').write('x')\n", 5, 256)
        assert r["outcome"] == "error" and "PermissionError" in r["detail"], r
        assert not target.exists()
        assert run_sample("import os\nos.remove('/etc/hostname')\n", 5, 256)["outcome"] == "error"
    assert run_sample("open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'\n", 5, 256)["outcome"] == "pass"
    # a socket: no network (a new network namespace), not even this host's loopback
    if iso["namespaces"]:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        r = run_sample(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", 5, 256)
        assert r["outcome"] == "error" and "OSError" in r["detail"], r
        srv.settimeout(0.2)
        with pytest.raises(socket.timeout):
            srv.accept()
        srv.close()
    # memory: RLIMIT_AS turns a 2 GiB allocation into MemoryError
    assert run_sample("x = bytearray(2 ** 31)\n", 5, 256)["detail"].startswith("MemoryError")
    # a stripped environment and a temporary working directory
    monkeypatch.setenv("LLMCTL_SECRET_TOKEN", "hunter2")
    r = run_sample(f"import os\nassert 'LLMCTL_SECRET_TOKEN' not in os.environ\nassert os.getcwd() != {str(Path.cwd())!r}\n"
                   "assert os.getcwd().split('/')[-1].startswith('llmctl-code-')\n", 5, 256)
    assert r["outcome"] == "pass", r


def test_eval_code_reports_pass_at_k_and_every_sample(trained_run, tmp_path):
    path, cfg, rd = trained_run
    f = tmp_path / "tasks.jsonl"
    f.write_text(json.dumps({"task_id": "t/0", "prompt": "def one():\n    return 1\n# ", "entry_point": "one", "tests": "assert one() == 1\n"}) + "\n"
                 + json.dumps({"task_id": "t/1", "prompt": "def two():", "entry_point": "two", "tests": "assert two() == 2\n"}) + "\n")
    r = invoke_cli("eval", str(path), "--set", "eval.code.enabled=true", "--set", f"eval.code.path={f}", "--set", "eval.code.samples=5",
                   "--set", "eval.code.max_new_tokens=6", "--set", "eval.perplexity=false", "--set", "eval.generation=false",
                   "--set", "eval.thresholds.min.pass@1=0.9", "--json")
    assert r.returncode == 4, r.stderr  # a random model does not write two()
    head = json.loads(r.stdout)
    code = json.loads(rd.results_path.read_text())["code"]
    rows = [json.loads(line) for line in Path(code["file"]).read_text().splitlines()]
    assert len(rows) == 10 and sum(code["outcomes"].values()) == 10
    assert {"pass@1", "pass@5"} <= set(head) and "pass@10" not in head
    from llmctl.evaluation.codeexec import pass_at_k

    per = {t: sum(x["outcome"] == "pass" for x in rows if x["task_id"] == t) for t in ("t/0", "t/1")}
    assert head["pass@1"] == pytest.approx(sum(pass_at_k(5, c, 1) for c in per.values()) / 2, abs=1e-4)
    assert per["t/1"] == 0 and code["per_task"] == per
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "def f():"}\n')
    r = invoke_cli("eval", str(path), "--set", "eval.code.enabled=true", "--set", f"eval.code.path={bad}", "--set", "eval.perplexity=false",
                   "--set", "eval.generation=false")
    assert r.returncode == 2 and f"{bad}:1: missing entry_point, tests" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- bias probe
def test_bias_probe_scores_whole_sentences_and_reports_share_gap_and_worst(trained_run, tmp_path):
    import numpy as np
    import torch

    from llmctl.evaluation.bias import bootstrap_interval, load_pairs

    path, cfg, rd = trained_run
    shipped = load_pairs([], [])
    assert len(shipped) >= 40 and {p["group"] for p in shipped} >= {"gender", "age"}
    r = invoke_cli("eval", str(path), "--set", "eval.bias.enabled=true", "--set", "eval.bias.groups=[gender]", "--set", "eval.bias.worst=3",
                   "--set", "eval.perplexity=false", "--set", "eval.generation=false", "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    b = json.loads(rd.results_path.read_text())["bias"]
    rows = [json.loads(line) for line in Path(b["file"]).read_text().splitlines()]
    assert len(rows) == b["pairs"] == head["bias.pairs"] == sum(p["group"] == "gender" for p in shipped)
    # independently: each sentence's log-likelihood after BOS from one forward pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(rd.model_dir).eval(), AutoTokenizer.from_pretrained(rd.model_dir)

    def ll(text):
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None]).sum().item()

    for row in rows[:4]:
        assert row["gap"] == pytest.approx(ll(row["stereotyped"]) - ll(row["anti_stereotyped"]), abs=2e-3)
    gaps = [x["gap"] for x in rows]
    assert head["bias.stereotype_share"] == round(np.mean([g > 0 for g in gaps]), 4)
    assert b["mean_gap"] == pytest.approx(np.mean(gaps), abs=1e-3)
    lo, hi = b["mean_gap_ci95"]
    assert lo <= b["mean_gap"] <= hi and (lo, hi) == pytest.approx(bootstrap_interval(gaps, 1000, cfg.run.seed), abs=1e-3)
    assert [w["gap"] for w in b["worst_pairs"]] == sorted([g for g in gaps if g > 0], reverse=True)[:3]
    # a gate on it: a model that never prefers the stereotype would pass max 0.0 only if share is 0
    r = invoke_cli("eval", str(path), "--set", "eval.bias.enabled=true", "--set", "eval.perplexity=false", "--set", "eval.generation=false",
                   "--set", "eval.thresholds.max.bias.stereotype_share=-0.1")
    assert r.returncode == 4 and "bias.stereotype_share" in r.stderr


def test_bias_probe_sees_a_model_that_learned_a_stereotype(tmp_path):
    """A tiny model trained on text where nurses are 'she' and engineers 'he' prefers the
    stereotyped sentence of pairs it never saw verbatim, with an interval above 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import train_tiny_tokenizer
    from llmctl.evaluation.bias import probe

    texts = [f"the {job} said that {p} was {w} today ." for job, p in (("nurse", "she"), ("engineer", "he"))
             for w in ("tired", "busy", "happy", "late", "early", "calm")]
    tok = train_tiny_tokenizer(texts * 2 + ["he she"], tmp_path / "m", vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(map(len, ids))
    x = torch.tensor([s + [tok.eos_token_id] * (L - len(s)) for s in ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"group": "gender", "stereotyped": f"the {j} said that {p} was {w} today .",
                                     "anti_stereotyped": f"the {j} said that {q} was {w} today ."}) + "\n"
                         for j, p, q in (("nurse", "she", "he"), ("engineer", "he", "she")) for w in ("sad", "here", "tired")))

    class B:
        paths, groups, bootstrap, worst = [str(f)], [], 1000, 2

    out, rows = probe(model, tok, B, 0, 8)
    assert out["stereotype_share"] == 1.0 and out["mean_gap_ci95"][0] > 0
    # bad files fail in one line naming the file and line
    from llmctl.errors import DataError

    f.write_text('{"group": "gender", "stereotyped": "the nurse was she", "anti_stereotyped": "a completely different sentence here"}\n')
    with pytest.raises(DataError, match=f"{f}:1: the sentences differ"):
        probe(model, tok, B, 0, 8)


# --------------------------------------------------------------------------- counterfactual augmentation
def test_counterfactual_swaps_words_with_case_and_her_his():
    from llmctl.data.counterfactual import swap

    assert swap("He gave her his book.") == ("She gave him her book.", 3)
    assert swap("The book is hers, not his.") == ("The book is his, not hers.", 2)
    assert swap("I saw her and her dog; HE laughed") == ("I saw him and his dog; SHE laughed", 3)
    assert swap("The King met the queen.") == ("The Queen met the king.", 2)
    assert swap("the river stones glow") == ("the river stones glow", 0)


def test_prepare_counterfactual_adds_swapped_copies_and_reports_the_balance(tmp_path):
    from datasets import load_from_disk

    from conftest import tiny_config_dict, write_config
    from llmctl.rundir import RunDir
    from llmctl.stages import prepare

    docs = [f"{s} walked to the market and {p} bought bread for {o} family today." for s, p, o in
            [("The man", "he", "his")] * 6 + [("The woman", "she", "her")] * 2] + [f"River stones glow under the pale moon number {i} tonight." for i in range(8)]
    docs = [d.replace("market", f"market {i}") for i, d in enumerate(docs)]  # no duplicates for dedup to remove
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    d = tiny_config_dict(tmp_path / "run", data={"paths": [str(f)], "validation_fraction": 0.0, "block_size": 16,
                                                 "curate": {"enabled": True, "near_dedup": {"enabled": False}, "language": False,
                                                            "counterfactual": "gender"}})
    cfg = load_config(write_config(tmp_path / "c.yaml", d))
    rd = RunDir(cfg.run.dir)
    prepare.run(cfg, rd)
    rep = json.loads(rd.report_path.read_text())["counterfactual"]
    assert rep["documents_added"] == 8 and rep["words_swapped"] == 8 * 3
    b, a = rep["term_groups_before"]["groups"], rep["term_groups_after"]["groups"]
    assert b["male"]["count"] == 6 * 3 and b["female"]["count"] == 2 * 3
    assert a["male"]["count"] == a["female"]["count"] == 8 * 3  # balanced after
    stats = json.loads(rd.stats_path.read_text())
    assert stats["splits"]["train"]["documents"] == 16 + 8
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    text = tok.decode([t for row in load_from_disk(str(rd.dataset_dir))["train"]["input_ids"] for t in row])
    assert "The woman walked to the market 0 and she bought bread for her family" in text  # the copy of a "man" document
    # a format it cannot apply to is refused at load time
    bad = dict(d, data={**d["data"], "format": "preference"}, train={**d["train"], "method": "dpo"})
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match="counterfactual"):
        load_config(write_config(tmp_path / "b.yaml", bad))


def test_rouge_without_rouge_score_is_skipped_by_default_and_an_error_when_asked_for(tiny_cfg, monkeypatch):
    import importlib.util
    import sys

    from llmctl.errors import ConfigError
    from llmctl.evaluation import textmetrics
    from llmctl.stages.evaluate import _generation_metrics

    path, cfg = tiny_cfg
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    textmetrics._scorer.cache_clear()
    try:
        assert _generation_metrics(cfg) == ["bleu", "chrf", "ter", "exact_match", "token_f1"]
        asked = load_config(path, ["eval.metrics=[rougeL, bleu]"])
        assert _generation_metrics(asked) == ["rougeL", "bleu"]
        with pytest.raises(ConfigError, match=r"pip install 'llmctl\[eval\]'"):
            textmetrics.rouge_scores(["a"], ["a"], ("rougeL",))
    finally:
        textmetrics._scorer.cache_clear()
