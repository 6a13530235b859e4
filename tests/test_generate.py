"""`llmctl generate`: batching, seeds, stop strings, chat templates, stdin, errors."""

from __future__ import annotations

import json

from conftest import invoke_cli
from llmctl.generation import Sampling, generate_batch
from llmctl.inference.stops import cut_at_stop


def _model(rd):
    from llmctl.modeling import load_for_inference

    return load_for_inference(str(rd.model_dir))


def test_batched_equals_unbatched_greedy(trained_run):
    import torch

    _, cfg, rd = trained_run
    model, tok = _model(rd)
    # Sharp weights: a freshly initialised model's logits are nearly flat, so a padding or
    # position bug could leave every argmax unchanged; these make each token depend on context.
    torch.manual_seed(0)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.35)
    prompts = ["the quick", "seven wizards quietly judge boxing", "river"]
    sp = Sampling(max_new_tokens=8, do_sample=False)
    together = [r["text"] for r in generate_batch(model, tok, prompts, sp)]
    alone = [generate_batch(model, tok, [p], sp)[0]["text"] for p in prompts]
    assert len(set(alone)) == len(alone)  # the output depends on the prompt
    assert together == alone
    assert all("<|pad|>" not in t for t in together)


def test_same_seed_same_output(trained_run):
    _, cfg, rd = trained_run
    model, tok = _model(rd)
    sp = Sampling(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    a = generate_batch(model, tok, ["the"], sp)[0]["text"]
    b = generate_batch(model, tok, ["the"], sp)[0]["text"]
    sp.seed = 8
    c = [generate_batch(model, tok, ["the"], Sampling(**{**sp.__dict__, "seed": s}))[0]["text"] for s in (8, 9, 10)]
    assert a == b and any(x != a for x in c)


def test_stop_strings_cut_output(trained_run):
    _, cfg, rd = trained_run
    model, tok = _model(rd)
    free = generate_batch(model, tok, ["the"], Sampling(max_new_tokens=16))[0]["text"]
    stop = free[3:6]
    assert stop.strip()
    res = generate_batch(model, tok, ["the"], Sampling(max_new_tokens=16, stop=(stop,)))[0]
    assert res["finish_reason"] == "stop" and stop not in res["text"] and free.startswith(res["text"])
    assert cut_at_stop("abc\ndef", ["\n"]) == ("abc", True)


def test_cli_prompts_json_and_outputs_file(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("generate", str(path), "-p", "the quick", "-p", "river", "--json", "--set", "generate.num_return_sequences=2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompts"] == 2 and out["outputs"] == 4
    rec = out["results"][0]
    assert {"prompt", "output", "prompt_tokens", "completion_tokens", "finish_reason"} <= set(rec)
    assert rec["finish_reason"] in ("eos", "stop", "length")
    lines = rd.outputs_path.read_text().splitlines()
    assert len(lines) == 4


def test_stdin_and_file_prompts(trained_run, tmp_path):
    path, cfg, rd = trained_run
    r = invoke_cli("generate", str(path), "--json", input="the quick\nriver stones\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompts"] == 2
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "the"}) + "\n")
    r = invoke_cli("generate", str(path), "--prompts-file", str(f), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["prompts"] == 1


def test_chat_messages_use_template(trained_run, tmp_path):
    from transformers import AutoTokenizer

    from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE

    path, cfg, rd = trained_run
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    r = invoke_cli("generate", str(path), "--prompts-file", str(f), "--json")
    assert r.returncode == 2 and "chat template" in r.stderr
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(rd.model_dir)
    r = invoke_cli("generate", str(path), "--prompts-file", str(f), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["prompt"].endswith("<|assistant|>\n")


def test_no_prompts_and_missing_model(tiny_cfg, trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("generate", str(path), input="")
    assert r.returncode == 2 and "no prompts" in r.stderr
    r = invoke_cli("generate", str(path), "-p", "x", "--model", "/nonexistent/model")
    assert r.returncode == 3 and "Traceback" not in r.stderr


def _teacher_forced(model, prompt_ids, new_ids):
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + new_ids])).logits[0].float(), -1)
    n = len(prompt_ids)
    return [float(lp[n - 1 + k, t]) for k, t in enumerate(new_ids)], lp


def test_logprobs_are_raw_and_match_a_teacher_forced_pass(trained_run):
    """Sampled at temperature 1.7, the recorded logprobs are still those of the raw logits."""
    import pytest

    _, cfg, rd = trained_run
    model, tok = _model(rd)
    prompts = ["the quick", "seven wizards quietly judge boxing"]
    res = generate_batch(model, tok, prompts, Sampling(max_new_tokens=10, do_sample=True, temperature=1.7, top_k=0, seed=3, logprobs=4))
    for p, r in zip(prompts, res):
        lps = r["logprobs"]
        ids = [x["id"] for x in lps]
        assert tok.decode(ids) == r["text"] and len(ids) == r["completion_tokens"]
        want, lp = _teacher_forced(model, tok(p, add_special_tokens=False)["input_ids"], ids)
        assert [x["logprob"] for x in lps] == pytest.approx(want, abs=1e-4)
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        for k, x in enumerate(lps):
            row = lp[n - 1 + k]
            assert x["entropy"] == pytest.approx(float(-(row.exp() * row).sum()), abs=1e-4)
            assert [t["id"] for t in x["top"]] == row.topk(4).indices.tolist()


def test_logprobs_stop_at_the_stop_string(trained_run):
    _, cfg, rd = trained_run
    model, tok = _model(rd)
    sp = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, seed=1)
    free = generate_batch(model, tok, ["the"], Sampling(**sp))[0]["text"]
    stop = next(w for i in range(4, len(free) - 3) if "\ufffd" not in (w := free[i : i + 3]) and w.strip() and free.find(w) == i)
    r = generate_batch(model, tok, ["the"], Sampling(**sp, stop=(stop,), logprobs=0))[0]
    assert r["finish_reason"] == "stop" and r["logprobs"]
    joined = tok.decode([x["id"] for x in r["logprobs"]])
    assert r["text"].startswith(joined) and stop not in joined and "top" not in r["logprobs"][0]


def test_cli_logprobs_and_surprisal(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("generate", str(path), "-p", "the quick", "--logprobs", "2", "--set", "generate.do_sample=false")
    assert r.returncode == 0, r.stderr
    rec = json.loads(rd.outputs_path.read_text().splitlines()[0])
    assert len(rec["logprobs"]) == rec["completion_tokens"] and all(len(x["top"]) == 2 for x in rec["logprobs"])
    assert all(x["top"][0]["id"] == x["id"] for x in rec["logprobs"])  # greedy picks the top token
    r = invoke_cli("generate", str(path), "-p", "the quick", "--surprisal", "--set", "generate.do_sample=false")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 + len(rec["logprobs"]) and lines[1].split()[-2] == f"{rec['logprobs'][0]['logprob']:.3f}"


def test_tokens_per_s_counts_the_decoding_only(trained_run, monkeypatch):
    """A slow one-off setup (the lean decoder's onnxruntime graphs are built on first use) does
    not count in tokens/s: only prefill and decoding do."""
    import time

    import llmctl.generation as gen
    from llmctl.config import load_config
    from llmctl.stages import generate

    path, cfg, rd = trained_run
    real = gen._lean_for

    def slow_setup(model, total_len):
        time.sleep(2.0)
        return real(model, total_len)

    monkeypatch.setattr(gen, "_lean_for", slow_setup)
    head = generate.run(load_config(path, ["generate.max_new_tokens=8"]), rd, prompts=["the quick", "river"])
    n = head["completion_tokens"]
    assert n > 0 and head["seconds"] >= 2.0, head
    assert head["tokens_per_s"] > n / 1.0, head  # with the setup counted it would be under n / 2
    assert head["decode_seconds"] < head["seconds"] - 1.9, head  # the setup is in the wall time, not the decode time
    # tokens / decode seconds, up to the headline's rounding (decode_seconds to the millisecond: 6% of an 8 ms decode)
    assert abs(head["tokens_per_s"] * head["decode_seconds"] - n) <= 0.05 * n + head["tokens_per_s"] * 0.0005


def test_generate_with_another_model_never_stands_in_for_the_runs_own(trained_run, tmp_path):
    """`generate --model X` writes RUN/generate-<X>/, as `eval --model` does: RUN/generate/ and
    `llmctl run`'s sample stay the run's own model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.config import load_config
    from llmctl.pipeline import summarize
    from llmctl.rundir import atomic_write_json
    from llmctl.stages import generate

    path, cfg, rd = trained_run
    other = tmp_path / "other"
    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_pretrained(rd.model_dir)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m.save_pretrained(other)
    AutoTokenizer.from_pretrained(rd.model_dir).save_pretrained(other)
    cfg = load_config(path, ["generate.prompts=[the quick]", "generate.max_new_tokens=6"])

    theirs = generate.run(cfg, rd, model=str(other))  # the CLI always passes force
    sub = "generate-" + rd.other_eval_stage(str(other)).removeprefix("eval-")
    assert sub.startswith("generate-other-") and rd.manifest(sub)["status"] == "complete"
    assert rd.manifest(sub)["model"]["path"] == str(other) and theirs["outputs_file"] == str(rd.stage_dir(sub) / "outputs.jsonl")
    assert json.loads((rd.stage_dir(sub) / "outputs.jsonl").read_text().splitlines()[0])["prompt"] == "the quick"
    assert rd.manifest("generate") is None and not rd.outputs_path.exists()  # the run's own generate is untouched
    assert "sample" not in summarize(rd)
    # `llmctl run` (force=False) still generates with the run's model, then skips it as up to date.
    ours = generate.run(cfg, rd, force=False)
    assert "cached" not in ours and rd.manifest("generate")["lineage"]["train"]
    sample = json.loads(rd.outputs_path.read_text().splitlines()[0])
    assert summarize(rd)["sample"] == (sample["prompt"] + sample["output"])[:300]
    assert generate.run(cfg, rd, force=False)["cached"] is True
    assert generate.run(cfg, rd, model=str(other), force=False)["cached"] is True
    # A generate/ written by another model (older llmctl wrote it there) is not the run's own.
    man = rd.manifest("generate")
    man["lineage"].pop("train")
    atomic_write_json(rd.manifest_path("generate"), man)
    assert "sample" not in summarize(rd)
    assert "cached" not in generate.run(cfg, rd, force=False)
