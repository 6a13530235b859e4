"""`llmctl eval`: perplexity against independent computations, sacreBLEU parity, gates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke_cli
from llmctl.config import load_config
from llmctl.modeling import load_for_inference
from llmctl.metrics import sliding_nll, text_metrics, windows
from llmctl.stages import evaluate


def _model(rd):
    return load_for_inference(str(rd.model_dir))


def test_windows_cover_every_token_once():
    for n, L, s in [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 8, 8), (17, 5, 2)]:
        targets = [j for _, b, e in windows(n, L, s) for j in range(b, e)]
        assert targets == list(range(1, n + 1))
        assert all(e - 1 - st <= L for st, _, e in windows(n, L, s))


def test_perplexity_matches_token_by_token_computation(trained_run):
    import torch

    _, cfg, rd = trained_run
    model, tok = _model(rd)
    ids = tok(" ".join(["the quick brown fox jumps over a lazy dog"] * 6), add_special_tokens=False)["input_ids"]
    L = 16
    nll, count = sliding_nll(model, ids, tok.bos_token_id, L, stride=1, batch_size=8)
    s = [tok.bos_token_id] + ids
    ref = 0.0
    with torch.no_grad():
        for j in range(1, len(s)):  # each token from its own forward pass, max context L
            ctx = torch.tensor([s[max(0, j - L) : j]])
            ref -= torch.log_softmax(model(ctx).logits[0, -1].float(), -1)[s[j]].item()
    assert count == len(ids)
    assert abs(nll - ref) / ref < 1e-5
    # disjoint windows score the same tokens with less context: a larger loss here
    nll2, count2 = sliding_nll(model, ids, tok.bos_token_id, L, stride=L)
    assert count2 == count and nll2 != pytest.approx(nll, rel=1e-6)


def _lm_eval_rolling(model_dir, text: str, L: int) -> float:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), backend="causal", dtype="float32", max_length=L, device="cpu", add_bos_token=False)
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    return -lm.loglikelihood_rolling([req])[0]


def test_text_file_scored_as_written_agrees_with_lm_eval(tmp_path, tiny_cfg, sharp_model):
    """`eval.text_paths` on source with blank lines and indentation = lm-eval, on a sharp model."""
    from transformers import AutoTokenizer

    from conftest import SOURCE_WITH_BLANKS

    path, _ = tiny_cfg
    text = SOURCE_WITH_BLANKS
    f = tmp_path / "config_reader.py"
    f.write_text(text)
    mdir = sharp_model()
    tok = AutoTokenizer.from_pretrained(mdir)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    L = 32
    assert n > 3 * L  # several rolling windows
    r = invoke_cli("eval", str(path), "--model", str(mdir), "--set", f"eval.text_paths=[{f}]", "--set", f"eval.max_length={L}",
                "--set", "eval.generation=false", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(Path(json.loads(r.stdout)["results"]).read_text())["perplexity"]
    ours = res["mean_loss"] * res["tokens"]
    theirs = _lm_eval_rolling(mdir, text, L)
    assert res["tokens"] == n and res["bytes"] == len(text.encode())
    assert res["mean_loss"] < 0.3 * math.log(len(tok))  # sharp: context decides every token
    assert ours == pytest.approx(theirs, rel=1e-4)
    # The comparison can fail: the text split into paragraphs and re-joined with EOS (the old
    # reading), or one window over the whole file, each give a clearly different number.
    model, _ = load_for_inference(str(mdir))
    paras = [p for p in text.split("\n\n") if p.strip()]
    joined = [t for p in paras for t in tok(p.strip("\n"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    old, _ = sliding_nll(model, joined, tok.bos_token_id, L, stride=L)
    assert abs(old - theirs) / theirs > 0.05
    ids = tok(text, add_special_tokens=False)["input_ids"]
    whole, _ = sliding_nll(model, ids, tok.bos_token_id, 128, stride=128)
    assert abs(whole - theirs) / theirs > 0.05


def test_each_file_is_its_own_document(tmp_path, tiny_cfg, sharp_model):
    """Two files score as two lm-eval requests (each from BOS), not one stream."""
    from conftest import SOURCE_WITH_BLANKS

    path, _ = tiny_cfg
    a, b = SOURCE_WITH_BLANKS, SOURCE_WITH_BLANKS.replace("Config", "Settings")
    (tmp_path / "a.py").write_text(a)
    (tmp_path / "b.txt").write_text(b)
    mdir = sharp_model(40)
    r = invoke_cli("eval", str(path), "--model", str(mdir), "--set", f"eval.text_paths=[{tmp_path / 'a.py'},{tmp_path / 'b.txt'}]",
                "--set", "eval.max_length=32", "--set", "eval.generation=false", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(Path(json.loads(r.stdout)["results"]).read_text())["perplexity"]
    theirs = _lm_eval_rolling(mdir, a, 32) + _lm_eval_rolling(mdir, b, 32)
    assert res["mean_loss"] * res["tokens"] == pytest.approx(theirs, rel=1e-4)


def test_bleu_equals_sacrebleu_cli(tmp_path):
    hyps = ["the cat sat on the mat", "a quick brown fox", "", "hello world again"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "nothing here", "hello world"]
    ours = text_metrics(hyps, refs)
    (tmp_path / "h.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "r.txt").write_text("\n".join(refs) + "\n")
    r = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "r.txt"), "-i", str(tmp_path / "h.txt"), "-m", "bleu", "chrf", "ter", "-b", "-w", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bleu, chrf, ter = json.loads(r.stdout)
    assert (ours["bleu"], ours["chrf"], ours["ter"]) == (bleu, chrf, ter)
    assert ours["signatures"]["bleu"].startswith("nrefs:1|")


def test_eval_writes_results_and_predictions(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("eval", str(path), "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    res = json.loads(rd.results_path.read_text())
    assert res["perplexity"]["tokens"] == head["ppl_tokens"] > 0
    p = res["perplexity"]
    # Independently: disjoint windows of block_size targets over [BOS] + the validation stream.
    import torch
    from datasets import load_from_disk

    model, tok = _model(rd)
    ids = [t for row in load_from_disk(str(rd.dataset_dir))["validation"]["input_ids"] for t in row]
    s, L, nll = [tok.bos_token_id] + ids, cfg.data.block_size, 0.0
    with torch.no_grad():
        for b in range(1, len(s), L):
            inp = torch.tensor([s[b - 1 : min(b + L, len(s)) - 1]])
            logp = torch.log_softmax(model(inp).logits[0].float(), -1)
            nll -= logp[torch.arange(inp.shape[1]), torch.tensor(s[b : b + inp.shape[1]])].sum().item()
    assert p["tokens"] == len(ids)
    assert p["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
    assert res["generation"]["examples"] == 8 and "signatures" in res["generation"]
    assert "unigram_perplexity" in p and "copy_prompt_bleu" in res["generation"]
    preds = [json.loads(line) for line in rd.predictions_path.read_text().splitlines()]
    assert len(preds) == 8 and {"prompt", "reference", "prediction", "bleu", "chrf"} <= set(preds[0])
    assert rd.manifest("eval")["status"] == "complete"
    again = invoke_cli("eval", str(path), "--json")
    assert json.loads(again.stdout)["cached"] is True


def test_threshold_failure_exits_4(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("eval", str(path), "--set", "eval.thresholds.perplexity_max=1.5", "--set", "eval.generation=false")
    assert r.returncode == 4
    assert "perplexity" in r.stderr and "perplexity_max 1.5" in r.stderr
    assert rd.results_path.is_file()  # the numbers are still written


def test_eval_on_text_files_and_external_model(trained_run, tmp_path):
    path, cfg, rd = trained_run
    f = tmp_path / "held.txt"
    f.write_text("the quick brown fox\n\njumps over a lazy dog\n")
    r = invoke_cli("eval", str(path), "--model", str(rd.model_dir), "--set", f"eval.text_paths=[{f}]", "--set", "eval.generation=false", "--json")
    assert r.returncode == 0, r.stderr
    _, tok = _model(rd)
    assert json.loads(r.stdout)["ppl_tokens"] == len(tok(f.read_text(), add_special_tokens=False)["input_ids"])


def test_missing_model_and_missing_train(tmp_path, tiny_cfg):
    path, cfg = tiny_cfg
    r = invoke_cli("eval", str(path))
    assert r.returncode == 3 and "llmctl" in r.stderr
    r = invoke_cli("eval", str(path), "--model", str(tmp_path / "nope"), "--set", f"eval.text_paths=[{path}]")
    assert r.returncode == 3 and "cannot load model" in r.stderr and "Traceback" not in r.stderr


def test_compare_init_reports_before_numbers(trained_run):
    path, cfg, rd = trained_run
    cfg2 = load_config(path, ["eval.compare_init=true", "eval.generation=false"])
    # A model that is not the initialisation: compare_init must score the initialisation itself.
    import torch
    from datasets import load_from_disk

    from llmctl.modeling import build_from_scratch

    model, tok = _model(rd)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    model.save_pretrained(rd.model_dir)
    res = evaluate.run(cfg2, rd, force=True)
    init = build_from_scratch(cfg2, tok).eval()
    ids = [t for row in load_from_disk(str(rd.dataset_dir))["validation"]["input_ids"] for t in row]
    L = cfg2.data.block_size
    nll, n = sliding_nll(init, ids, tok.bos_token_id, L, stride=L)
    assert res["init_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert abs(res["perplexity"] - res["init_perplexity"]) > 0.01 * res["init_perplexity"]  # two different models


def _other_model(rd, out, seed: int = 1):
    """The run's architecture and tokenizer with other weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_pretrained(rd.model_dir)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(rd.model_dir).save_pretrained(out)
    return out


def test_eval_of_another_model_never_stands_in_for_the_runs_own(trained_run, tmp_path):
    path, cfg, rd = trained_run
    cfg = load_config(path, ["eval.generation=false"])
    other = _other_model(rd, tmp_path / "other")
    theirs = evaluate.run(cfg, rd, model=str(other))
    sub = rd.other_eval_stage(str(other))
    assert sub.startswith("eval-other-") and rd.manifest(sub)["status"] == "complete"
    assert json.loads(rd.results_file(sub).read_text())["perplexity"]["perplexity"] == theirs["perplexity"]
    assert rd.manifest("eval") is None and not rd.results_path.exists()  # the run's own eval is untouched
    ours = evaluate.run(cfg, rd)
    assert "cached" not in ours and ours["perplexity"] != theirs["perplexity"]
    assert evaluate.run(cfg, rd)["cached"] is True
    assert evaluate.run(cfg, rd, model=str(other))["cached"] is True
    assert json.loads(rd.results_path.read_text())["perplexity"]["perplexity"] == ours["perplexity"]
    # An eval/ written by another model (older llmctl wrote it there) is not the run's own.
    m = rd.manifest("eval")
    m["lineage"].pop("train")
    from llmctl.rundir import atomic_write_json

    atomic_write_json(rd.manifest_path("eval"), m)
    assert "cached" not in evaluate.run(cfg, rd)
    # Thresholds never change the numbers, so a cached eval is still checked against new ones.
    from llmctl.errors import ThresholdError

    with pytest.raises(ThresholdError):
        evaluate.run(load_config(path, ["eval.generation=false", "eval.thresholds.perplexity_max=1.0001"]), rd)


def test_a_model_with_another_tokenizer_is_refused_before_scoring(trained_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import sentences, train_tiny_tokenizer

    path, cfg, rd = trained_run
    other = tmp_path / "foreign"
    tok = train_tiny_tokenizer(sentences(40, seed=7, length=(2, 4)) + ["zebra quartz xylophone"], other, vocab_size=290)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)).save_pretrained(other)
    r = invoke_cli("eval", str(path), "--model", str(other), "--set", "eval.generation=false")
    assert r.returncode == 2, r.stderr
    assert "tokenizer differs" in r.stderr and "eval.text_paths" in r.stderr and "Traceback" not in r.stderr
    assert not any(p.name.startswith("eval") for p in rd.root.iterdir())  # refused before anything was written


def test_short_references_make_bleu_degenerate_and_eval_says_so(trained_run, capsys):
    from datasets import Dataset, DatasetDict

    from llmctl import console

    path, cfg, rd = trained_run
    import shutil

    shutil.rmtree(rd.pairs_dir)
    DatasetDict({"validation": Dataset.from_dict({"prompt": ["the quick", "a lazy", "river"], "reference": [" brown", " dog", " stones glow"]})}).save_to_disk(str(rd.pairs_dir))
    console.set_current(console.Console())
    res = evaluate.run(load_config(path, ["eval.perplexity=false"]), rd)
    err = capsys.readouterr().err
    assert res["bleu"] == 0 and res["bleu_degenerate"] is True
    assert "BLEU is 0 by construction" in err and "chrF" in err

def test_hardest_tokens_and_documents_from_kept_token_losses(tmp_path, tiny_cfg, sharp_model):
    """A file the model was trained on vs one of shuffled characters: the per-token losses
    kept in token_losses.jsonl add up to the reported NLL, and the shuffled file is hardest."""
    import random

    from conftest import SOURCE_WITH_BLANKS

    path, _ = tiny_cfg
    a = SOURCE_WITH_BLANKS
    chars = list(a)
    random.Random(0).shuffle(chars)
    (tmp_path / "a.py").write_text(a)
    (tmp_path / "b.txt").write_text("".join(chars))
    mdir = sharp_model(40)
    r = invoke_cli("eval", str(path), "--model", str(mdir), "--set", f"eval.text_paths=[{tmp_path / 'a.py'},{tmp_path / 'b.txt'}]",
                "--set", "eval.max_length=32", "--set", "eval.generation=false", "--set", "eval.hardest=5", "--json")
    assert r.returncode == 0, r.stderr
    from pathlib import Path

    stage = Path(json.loads(r.stdout)["results"]).parent  # another model's eval: RUN/eval-<model>/
    p = json.loads((stage / "results.json").read_text())["perplexity"]
    kept = [json.loads(line) for line in (stage / "token_losses.jsonl").read_text().splitlines()]
    assert [d["document"] for d in kept] == [str(tmp_path / "a.py"), str(tmp_path / "b.txt")]
    losses = [x for d in kept for x in d["losses"]]
    assert None not in losses and len(losses) == p["tokens"]
    assert sum(losses) == pytest.approx(p["mean_loss"] * p["tokens"], rel=1e-4)
    assert sum(b["tokens"] for b in p["token_loss_histogram"]) == p["tokens"]
    hard = p["hardest_tokens"]
    assert len(hard) == 5 and [h["loss"] for h in hard] == sorted((h["loss"] for h in hard), reverse=True)
    assert hard[0]["loss"] == pytest.approx(max(losses), abs=1e-4)
    assert p["hardest_documents"][0]["document"].endswith("b.txt")
    assert p["hardest_documents"][0]["mean_loss"] > 2 * p["hardest_documents"][1]["mean_loss"]


def test_prepared_split_report_is_per_document(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("eval", str(path), "--set", "eval.generation=false", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(rd.results_path.read_text())["perplexity"]
    kept = [json.loads(line) for line in rd.token_losses_file().read_text().splitlines()]
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(rd.tokenizer_dir).eos_token_id
    stream = [t for row in load_from_disk(str(rd.dataset_dir))["validation"]["input_ids"] for t in row]
    assert [t for d in kept for t in d["ids"]] == stream
    assert all(d["ids"][-1] == eos for d in kept[:-1]) and sum(t == eos for t in stream) in (len(kept), len(kept) - 1)
    assert all(d["document"].startswith("validation#") for d in kept)
    assert sum(x for d in kept for x in d["losses"]) == pytest.approx(p["mean_loss"] * p["tokens"], rel=1e-4)


# --------------------------------------------------------------------------- one perplexity (issue #24)
def _chat_run(tmp_path):
    """A prepared chat run (prompts masked, assistant turns labelled) with a random model in train/."""
    from conftest import save_random_model, sentences, tiny_config_dict, write_config
    from llmctl.rundir import RunDir
    from llmctl.stages import prepare

    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "say " + s}, {"role": "assistant", "content": s}]}) + "\n"
                         for s in sentences(30, seed=7)))
    d = tiny_config_dict(tmp_path / "run", data={"paths": [str(f)], "format": "chat", "validation_fraction": 0.3, "block_size": 64},
                         eval={"generation": False, "batch_size": 3})
    path = write_config(tmp_path / "c.yaml", d)
    cfg = load_config(path)
    rd = RunDir(cfg.run.dir)
    prepare.run(cfg, rd)
    return path, save_random_model(rd, cfg)


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_export_report_perplexity_is_evals(fmt, tmp_path, tiny_cfg):
    """The compression report scores every artifact with eval's routine on eval's data: its f32
    row is `llmctl eval`'s perplexity (chat: each answer after its own prompt, not answers strung
    together; text: eval's stride too)."""
    from conftest import build_trained_run
    from llmctl.stages import export

    if fmt == "chat":
        path, rd = _chat_run(tmp_path)
        sets = []
    else:
        path, cfg = tiny_cfg
        rd = build_trained_run(Path(cfg.run.dir), cfg)
        sets = ["eval.stride=8", "eval.generation=false"]  # overlapping windows: each token with more context
    head = evaluate.run(load_config(path, sets), rd)
    export.run(load_config(path, sets + ["export.report=true", "export.report_decode_tokens=0"]), rd)
    rep = rd.manifest("export")["report"]
    f32 = rep["rows"][0]
    assert f32["name"] == "f32 (train/model)" and "error" not in f32, f32
    assert f32["perplexity"] == pytest.approx(head["perplexity"], rel=1e-9, abs=0), (f32, head)
    assert rep["perplexity_tokens"] == head["ppl_tokens"] == rep["perplexity_of_tokens"]
    assert rep["stride"] == (8 if fmt == "text" else rep["window"])
    # A capped report scores a prefix and says it is not eval's number.
    export.run(load_config(path, sets + ["export.report=true", "export.report_decode_tokens=0", "export.report_max_tokens=64"]), rd, force=True)
    rep = rd.manifest("export")["report"]
    assert rep["perplexity_tokens"] <= 64 < rep["perplexity_of_tokens"] == head["ppl_tokens"]
    assert "not the number llmctl eval reports" in rep["notes"][0]


def test_loss_is_computed_in_chunks_of_positions_with_the_same_numbers(trained_run, monkeypatch):
    """No [batch, window, vocab] logits: the body runs to hidden states, then lm_head and the
    cross-entropy run on a few scored positions at a time. Same numbers as the full logits."""
    import torch

    from llmctl import metrics

    _, cfg, rd = trained_run
    model, tok = _model(rd)
    V = model.config.vocab_size
    docs = [tok(" ".join(["the quick brown fox jumps over a lazy dog"] * k), add_special_tokens=False)["input_ids"] for k in (2, 5, 7)]
    rows = [{"input_ids": d[:20], "labels": [-100] * 8 + d[8:20]} for d in docs]
    assert metrics._body_and_head(model) is not None  # llama: body + lm_head reproduce the forward (checked once)

    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    monkeypatch.setattr(metrics, "LOSS_CHUNK_BYTES", 4 * V * 5)  # 5 positions per chunk
    chunked = metrics.rolling_nll(model, docs, tok.bos_token_id, 16, 4, batch_size=4), metrics.masked_nll(model, rows, tok.pad_token_id, batch_size=2)
    hook.remove()
    assert shapes and all(len(s) == 2 and s[0] <= 5 and s[1] == V for s in shapes), shapes  # never [B, T, V]

    monkeypatch.setattr(metrics, "_body_and_head", lambda m: None)  # the plain path: model(...).logits, [B, T, V]
    full = metrics.rolling_nll(model, docs, tok.bos_token_id, 16, 4, batch_size=4), metrics.masked_nll(model, rows, tok.pad_token_id, batch_size=2)
    for (n_c, c_c), (n_f, c_f) in zip(chunked, full):
        assert c_c == c_f and n_c == pytest.approx(n_f, rel=1e-6), (chunked, full)
    # and the plain path is what the old code computed: one forward, log-softmax at every position
    with torch.no_grad():
        s = torch.tensor([[tok.bos_token_id] + docs[0]])
        ref = -torch.log_softmax(model(s).logits[0, :-1].float(), -1).gather(1, s[0, 1:, None]).sum().item()
    assert metrics.rolling_nll(model, docs[:1], tok.bos_token_id, 64, 64)[0] == pytest.approx(ref, rel=1e-6)


def test_a_head_that_is_not_a_plain_linear_map_keeps_the_full_logits(trained_run):
    """A model whose forward does more to the logits than lm_head (soft-capping, scaling) fails
    the one-time check and is scored through its own forward."""
    import torch

    from llmctl import metrics

    _, cfg, rd = trained_run
    model, tok = _model(rd)
    forward = model.forward

    def capped(*a, **kw):
        out = forward(*a, **kw)
        out.logits = 5 * torch.tanh(out.logits / 5)
        return out

    model.forward = capped
    assert metrics._body_and_head(model) is None
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        s = torch.tensor([[tok.bos_token_id] + ids])
        ref = -torch.log_softmax(model(s).logits[0, :-1].float(), -1).gather(1, s[0, 1:, None]).sum().item()
    assert metrics.rolling_nll(model, [ids], tok.bos_token_id, 32, 32)[0] == pytest.approx(ref, rel=1e-6)
