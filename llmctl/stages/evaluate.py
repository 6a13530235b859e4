"""`llmctl eval`: perplexity on held-out text, BLEU/chrF/TER on prompt/completion pairs.

Results go to RUN/eval/results.json; per-example predictions to predictions.jsonl as each
batch completes. `eval.thresholds` turn the command into a CI gate (exit 4). With
`eval.safety`, the shipped red-team prompts run with the rails off and on
(RUN/eval/redteam.jsonl, interventions in RUN/eval/audit.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from llmctl import console as _console
from llmctl.errors import StageInputError, ThresholdError
from llmctl.rundir import RunDir, atomic_write_json, atomic_write_text


def _auto_stops(prompts: list[str], refs: list[str]) -> list[str]:
    stops = []
    if all("\n" not in r.strip() for r in refs):
        stops.append("\n")
    quotes = {p.rstrip()[-3:] for p in prompts if p.rstrip()[-3:] in ('"""', "'''")}
    return stops + sorted(quotes)


def run(cfg, rd: RunDir, *, force: bool = False, model: str | None = None, **_) -> dict:
    con = _console.current()
    e = cfg.eval
    explicit = model or e.model
    inputs = []
    from llmctl.modeling import model_identity, resolve_model_path

    path = resolve_model_path(explicit, rd, cfg, "eval")
    # Another model's numbers live in their own folder (RUN/eval-<model>): they never stand in
    # for the run's own evaluation, nor reach its status, summary or model card.
    stage = rd.other_eval_stage(explicit) if explicit else "eval"
    extra = json.dumps(model_identity(path), sort_keys=True) if explicit else None
    extra_hash = hashlib.sha256(extra.encode()).hexdigest()[:16] if extra else None
    if not explicit:
        inputs.append("train")
    need_prepare = not e.text_paths or e.generation
    if need_prepare and rd.manifest("prepare") is not None:
        rd.require("prepare", cfg)
        inputs.append("prepare")
    elif e.perplexity and not e.text_paths:
        rd.require("prepare", cfg)  # raises with the command to run
    m = rd.manifest(stage) or {}
    own = explicit or "train" in (m.get("lineage") or {})
    if not force and own and rd.up_to_date(stage, cfg, extra_hash=extra_hash):
        con.info(f"eval: up to date in {rd.stage_dir(stage)} (use --force to redo)")
        head = m["headline"]
        _gate(e.thresholds, {**head, "cached": True})  # thresholds may have changed since
        return {**head, "cached": True}
    if explicit and e.perplexity and not e.text_paths:
        _check_same_tokenizer(path, rd, cfg)

    if cfg.data.format == "image_text" and not e.text_paths:  # images: llmctl/vision/evaluate.py
        return _image_text(cfg, rd, stage, path, inputs, extra_hash, explicit, con)
    from llmctl.modeling import load_for_inference

    if e.generation and "metrics" in e.model_fields_set and {"rouge1", "rouge2", "rougeL"} & set(e.metrics):
        from llmctl.evaluation.textmetrics import _scorer

        _scorer(("rougeL",))  # a ROUGE metric asked for without rouge-score: the config error now, not after generating
    t0 = time.time()
    con.step(f"loading {path}")
    mdl, tok = load_for_inference(path, quantize=e.quantize, quantize_key="eval.quantize")
    results: dict = {"model": model_identity(path), "split": e.split}
    if e.quantize != "none":
        results["quantization"] = mdl.llmctl_quantization
    if path.lower().endswith(".gguf"):
        con.info(f"{path}: GGUF read by transformers, its tensors dequantized to float32 (the file's quality; llama.cpp's speed is not measured here)")
        results["model"]["loader"] = "transformers gguf_file (dequantized to float32)"
    pref = cfg.data.format in ("preference", "unpaired_preference") and not e.text_paths
    with rd.begin(stage, cfg, inputs=inputs, extra_hash=extra_hash) as st:
        if pref:  # the held-out split is pairs: perplexity and BLEU are on the chosen answers
            results["preference"] = _preference(cfg, rd, mdl, tok, con)
        if e.perplexity:
            results["perplexity"] = _perplexity(cfg, rd, mdl, tok, con, rd.token_losses_file(stage))
        if e.generation:
            gen = _generation(cfg, rd, mdl, tok, con, rd.predictions_file(stage))
            if gen:
                results["generation"] = gen
        if e.tasks:
            results["tasks"] = _tasks(cfg, mdl, tok, con)
        if e.code.enabled:
            results["code"] = _code(cfg, rd, mdl, tok, con, stage)
        if e.bias.enabled:
            results["bias"] = _bias(cfg, rd, mdl, tok, con, stage)
        if e.compare_init:
            results["init"] = _init_results(cfg, rd, tok, con, results)
        if e.safety:
            results["safety"] = _redteam(cfg, rd, mdl, tok, con, stage)
        results["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(rd.results_file(stage), results)
        head = _headline(results)
        st.headline.update(head)
        if explicit:
            st.manifest["model"] = results["model"]
        st.manifest["thresholds"] = {"failed": [f["message"] for f in _check_thresholds(e.thresholds, head)]}
    result = {**head, "results": str(rd.results_file(stage))}
    if not explicit:  # the run's own model: its training's trackers (train.report_to) get the results
        from llmctl.trackers import attach

        attach(rd, {"eval": rd.results_file(stage)}, head, prefix="eval")
    _gate(e.thresholds, result)
    return result


def _image_text(cfg, rd: RunDir, stage: str, path: str, inputs: list, extra_hash, explicit, con) -> dict:
    from llmctl.vision.evaluate import evaluate

    t0 = time.time()
    with rd.begin(stage, cfg, inputs=inputs, extra_hash=extra_hash) as st:
        results = evaluate(cfg, rd, path, con, rd.predictions_file(stage))
        results["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(rd.results_file(stage), results)
        head = _headline(results)
        head["perplexity"] = results["perplexity"]["perplexity"]
        st.headline.update(head)
        if explicit:
            st.manifest["model"] = results["model"]
        st.manifest["thresholds"] = {"failed": [f["message"] for f in _check_thresholds(cfg.eval.thresholds, head)]}
    result = {**head, "results": str(rd.results_file(stage))}
    _gate(cfg.eval.thresholds, result)
    return result


def _check_same_tokenizer(path: str, rd: RunDir, cfg) -> None:
    """Perplexity on the prepared split feeds the run's token ids to the model: they must mean
    the same tokens to it, or the number is wrong (or an index error deep in the embedding)."""
    if not rd.tokenizer_dir.is_dir():
        return
    from transformers import AutoConfig, AutoTokenizer

    from llmctl.errors import ConfigError
    from llmctl.modeling import hf_source

    src, kw = hf_source(path)  # a .gguf file: its embedded tokenizer and its config
    try:
        theirs = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code, **kw)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StageInputError(f"cannot load the tokenizer of '{path}': {first}") from None
    ours = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    fix = (
        "score it on text instead (--set eval.text_paths=[FILE]; each model tokenizes it itself), "
        "or skip perplexity (--set eval.perplexity=false)"
    )
    if theirs.get_vocab() != ours.get_vocab():
        raise ConfigError(
            f"{path}: its tokenizer differs from the run's ({rd.tokenizer_dir}; vocabulary {len(theirs)} vs {len(ours)}): "
            f"the prepared {cfg.eval.split} split holds the run's token ids, which mean other tokens to this model. {fix}"
        )
    try:
        n_emb = getattr(AutoConfig.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code, **kw), "vocab_size", None)
    except (OSError, ValueError):
        n_emb = None
    if n_emb is not None and n_emb < len(ours):
        raise ConfigError(f"{path}: its embedding has {n_emb} rows but the run's tokenizer has {len(ours)} tokens. {fix}")


def _headline(results: dict) -> dict:
    from llmctl.evaluation.textmetrics import GENERATION_METRICS

    head = {}
    p = results.get("perplexity") or {}
    for k in ("perplexity", "bits_per_byte", "tokens"):
        if k in p:
            head[k if k != "tokens" else "ppl_tokens"] = p[k]
    if results.get("quantization"):
        head["quantize"] = results["quantization"]["method"]
    g = results.get("generation") or {}
    for k in (*GENERATION_METRICS, "examples", "bleu_degenerate", "lead"):
        if k in g:
            head[k if k != "lead" else "generation_lead"] = g[k]
    b = results.get("baselines") or {}
    init = results.get("init") or {}
    if "unigram_perplexity" in p:
        head["baseline_unigram_perplexity"] = p["unigram_perplexity"]
    for k in GENERATION_METRICS:
        if f"copy_prompt_{k}" in g:
            head[f"baseline_copy_{k}"] = g[f"copy_prompt_{k}"]
    pr = results.get("preference") or {}
    for k in ("preference_accuracy", "reward_margin", "likelihood_accuracy", "chosen_tokens", "rejected_tokens"):
        if k in pr:
            head[k] = pr[k]
    if init:
        for k in ("perplexity", *GENERATION_METRICS, "preference_accuracy", "reward_margin", "likelihood_accuracy"):
            if k in init:
                head[f"init_{k}"] = init[k]
    head.update(b)
    from llmctl.evaluation import tasks as _tasks_mod

    head.update(_tasks_mod.headline(results.get("tasks") or {}))
    head.update(_tasks_mod.headline(init.get("tasks") or {}, prefix="init_"))
    for k, v in (results.get("code") or {}).items():
        if k.startswith("pass@"):
            head[k] = v
    bias = results.get("bias") or {}
    for k in ("stereotype_share", "mean_gap", "pairs"):
        if k in bias:
            head[f"bias.{k}"] = bias[k]
    for k, v in init.items():
        if k.startswith(("pass@", "bias.")):
            head[f"init_{k}"] = v
    s = results.get("safety") or {}
    if s:
        head["safety_flagged_rate_off"] = s["off"]["flagged_rate"]
        head["safety_flagged_rate_on"] = s["on"]["flagged_rate"]
        head["safety_refused_rate_off"] = s["off"]["refused_rate"]
    return head


def _gate(t, result: dict) -> None:
    """ThresholdError (exit 4) when a threshold is not met, carrying the metrics and the failures
    side by side, so that `eval --json` keeps them exactly when a CI gate needs them."""
    failures = _check_thresholds(t, result)
    if failures:
        raise ThresholdError(
            "eval thresholds not met: " + "; ".join(f["message"] for f in failures),
            result={**result, "failed_thresholds": failures},
        )


def _check_thresholds(t, head: dict) -> list[dict]:
    """Each threshold not met: {threshold, metric, value, limit, message}; value None if not measured."""
    fails = []
    checks = [
        ("perplexity_max", "perplexity", lambda v, lim: v <= lim, ">"),
        ("bleu_min", "bleu", lambda v, lim: v >= lim, "<"),
        ("chrf_min", "chrf", lambda v, lim: v >= lim, "<"),
        ("ter_max", "ter", lambda v, lim: v <= lim, ">"),
        ("exact_match_min", "exact_match", lambda v, lim: v >= lim, "<"),
        ("preference_accuracy_min", "preference_accuracy", lambda v, lim: v >= lim, "<"),
    ]
    for key, metric, ok, sym in checks:
        lim = getattr(t, key)
        if lim is None:
            continue
        rec = {"threshold": f"eval.thresholds.{key}", "metric": metric, "value": head.get(metric), "limit": lim}
        if metric not in head:
            fails.append(rec | {"message": f"eval.thresholds.{key}: {metric} was not measured"})
        elif not ok(head[metric], lim):
            fails.append(rec | {"message": f"{metric} {head[metric]} {sym} eval.thresholds.{key} {lim}"})
    for side, sym in (("min", "<"), ("max", ">")):
        for metric, lim in getattr(t, side).items():
            rec = {"threshold": f"eval.thresholds.{side}.{metric}", "metric": metric, "value": head.get(metric), "limit": lim}
            if not isinstance(head.get(metric), (int, float)):
                fails.append(rec | {"message": f"eval.thresholds.{side}.{metric}: {metric} was not measured"})
            elif (head[metric] < lim) if side == "min" else (head[metric] > lim):
                fails.append(rec | {"message": f"{metric} {head[metric]} {sym} eval.thresholds.{side}.{metric} {lim}"})
    return fails


# --------------------------------------------------------------------------- perplexity
def _segments(docs, rows, names, losses, eos_id, packed: bool) -> list[tuple[str, list[int], object]]:
    """Documents for the loss report. The prepared text split (`packed`) is one stream of
    documents joined by EOS: it is cut back into documents there (named split#k)."""
    if rows is not None:
        return [(n, r["input_ids"], a) for n, r, a in zip(names, rows, losses)]
    if packed and eos_id is not None:
        ids, arr = docs[0], losses[0]
        out, start, k = [], 0, 0
        for i, t in enumerate(ids):
            if t == eos_id or i == len(ids) - 1:
                if i + 1 > start:
                    out.append((f"{names[0]}#{k}", ids[start : i + 1], arr[start : i + 1]))
                    k += 1
                start = i + 1
        return out
    return list(zip(names, docs, losses))


def write_token_losses(path: Path, segments) -> None:
    """One JSON line per document: its name, token ids and each token's loss (null where unscored)."""
    import numpy as np

    lines = []
    for name, ids, losses in segments:
        ls = [None if x != x else x for x in np.round(np.asarray(losses, dtype=np.float64), 5).tolist()]  # x != x: NaN, unscored
        lines.append(json.dumps({"document": name, "ids": [int(t) for t in ids], "losses": ls}) + "\n")
    atomic_write_text(path, "".join(lines))


def _perplexity(cfg, rd: RunDir, model, tok, con, token_file: Path | None = None) -> dict:
    from llmctl import heldout
    from llmctl.metrics import loss_report, unigram_nll

    e = cfg.eval
    losses: list | None = [] if e.hardest else None
    held = heldout.load(cfg, rd, tok)
    out = heldout.perplexity(model, tok, held, cfg, con=con, token_losses=losses)
    count = out["tokens"]
    docs, rows, names = held.docs, held.rows, held.names
    if losses is not None:
        segs = _segments(docs, rows, names, losses, tok.eos_token_id, packed=held.packed)
        out.update(loss_report(segs, tok.decode, top=e.hardest))
        if token_file is not None:
            write_token_losses(token_file, segs)
    if e.baselines and docs is not None and not e.text_paths and rd.dataset_dir.is_dir():
        from datasets import load_from_disk

        train_rows = load_from_disk(str(rd.dataset_dir))["train"]["input_ids"]
        import math

        ids = [t for d in docs for t in d]
        base = unigram_nll(train_rows, ids, len(tok))
        out["unigram_perplexity"] = round(math.exp(base / len(ids)), 4)
    con.info(f"perplexity {out['perplexity']:.3f} over {count} tokens (bits/byte {out['bits_per_byte']:.4f})")
    return out


# --------------------------------------------------------------------------- generation
def _load_pairs(cfg, rd: RunDir):
    if not rd.pairs_dir.is_dir():
        return None
    from datasets import load_from_disk

    pairs = load_from_disk(str(rd.pairs_dir))
    split = cfg.eval.split if cfg.eval.split in pairs else next(iter(pairs))
    ds = pairs[split]
    if cfg.eval.max_examples:
        ds = ds.select(range(min(len(ds), cfg.eval.max_examples)))
    return ds


def _generate_all(model, tok, prompts, refs, cfg, con, pred_file=None) -> list[str]:
    from llmctl.generation import Sampling, generate_batch
    from llmctl.metrics import sentence_scores

    e = cfg.eval
    stops = tuple(e.stop) if e.stop is not None else tuple(_auto_stops(prompts, refs))
    sp = Sampling(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature, stop=stops, seed=cfg.run.seed)
    # Similar lengths together waste less padding; results are put back in order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, dict] = {}
    with con.progress("generating", total=len(prompts), unit="examples") as prog:
        for i in range(0, len(order), e.batch_size):
            idx = order[i : i + e.batch_size]
            res = generate_batch(model, tok, [prompts[j] for j in idx], sp)
            for j, r in zip(idx, res):
                out[j] = r
                if pred_file is not None:
                    rec = {"index": j, "prompt": prompts[j], "reference": refs[j], "prediction": r["text"].strip(), "finish_reason": r["finish_reason"],
                           **sentence_scores(r["text"].strip(), refs[j], _generation_metrics(cfg))}
                    pred_file.write(json.dumps(rec) + "\n")
            if pred_file is not None:
                pred_file.flush()
            prog.update(advance=len(idx))
    return [out[j]["text"].strip() for j in range(len(prompts))]


_LABEL = {"bleu": "BLEU", "chrf": "chrF", "ter": "TER", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
          "exact_match": "exact", "token_f1": "F1"}


def _generation_metrics(cfg, con=None) -> list[str]:
    """eval.metrics; by default ROUGE is left out (with a note) where rouge-score is not installed."""
    import importlib.util

    from llmctl.evaluation.textmetrics import ROUGE

    metrics = list(cfg.eval.metrics)
    if "metrics" not in cfg.eval.model_fields_set and importlib.util.find_spec("rouge_score") is None:
        metrics = [m for m in metrics if m not in ROUGE]
        if con is not None:
            con.info("ROUGE skipped: rouge-score is not installed (pip install 'llmctl[eval]')")
    return metrics


def _generation(cfg, rd: RunDir, model, tok, con, predictions: Path | None = None) -> dict | None:
    from llmctl.metrics import text_metrics

    ds = _load_pairs(cfg, rd)
    if ds is None or len(ds) == 0:
        con.info("no prompt/completion pairs in this run: BLEU skipped")
        return None
    prompts, refs = list(ds["prompt"]), [r.strip() for r in ds["reference"]]
    predictions = predictions or rd.predictions_path
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with open(predictions, "w") as f:
        hyps = _generate_all(model, tok, prompts, refs, cfg, con, pred_file=f)
    metrics = _generation_metrics(cfg, con)
    out = text_metrics(hyps, refs, metrics)
    if cfg.eval.baselines:  # the trivial baseline beside each metric: the prompt's last words as the answer
        copy = [" ".join(p.split()[-8:]) for p in prompts]
        base = text_metrics(copy, refs, metrics)
        out.update({f"copy_prompt_{k}": base[k] for k in metrics})
    out["lead"] = metrics[0]
    con.info("  ".join(f"{_LABEL[k]} {out[k]:.3f}" for k in metrics) + f" on {len(refs)} pairs")
    if out.get("bleu_note"):
        con.warn(f"BLEU: {out['bleu_note']}")
    return out


def _init_results(cfg, rd: RunDir, tok, con, trained: dict) -> dict:
    """The same measurements on the model before training."""
    import torch

    from llmctl.modeling import build_from_scratch, load_for_inference

    if cfg.model.name_or_path:
        model, _ = load_for_inference(cfg.model.name_or_path)
    else:
        model = build_from_scratch(cfg, tok).eval()
    model.to(torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    out = {}
    con.step("evaluating the model before training (eval.compare_init)")
    if "perplexity" in trained:
        out["perplexity"] = _perplexity(cfg, rd, model, tok, con)["perplexity"]
    if "preference" in trained:
        p = _preference(cfg, rd, model, tok, con, reference=model)
        out.update({k: p[k] for k in ("preference_accuracy", "reward_margin", "likelihood_accuracy") if k in p})
    if "tasks" in trained:
        out["tasks"] = _tasks(cfg, model, tok, con)
    if "code" in trained:
        c = _code(cfg, rd, model, tok, con, None)
        out.update({k: v for k, v in c.items() if k.startswith("pass@")})
        out["code_outcomes"] = c["outcomes"]
    if "bias" in trained:
        b = _bias(cfg, rd, model, tok, con, None)
        out.update({f"bias.{k}": b[k] for k in ("stereotype_share", "mean_gap")})
    if "generation" in trained:
        ds = _load_pairs(cfg, rd)
        prompts, refs = list(ds["prompt"]), [r.strip() for r in ds["reference"]]
        from llmctl.metrics import text_metrics

        m = text_metrics(_generate_all(model, tok, prompts, refs, cfg, con), refs, _generation_metrics(cfg))
        out.update({k: m[k] for k in _generation_metrics(cfg)})
    return out


# --------------------------------------------------------------------------- lm-eval tasks, code, bias
def _tasks(cfg, model, tok, con) -> dict:
    from llmctl.evaluation.tasks import run_tasks

    e = cfg.eval
    out = run_tasks(model, tok, e.tasks, num_fewshot=e.num_fewshot, limit=e.limit, batch_size=e.batch_size, con=con)
    for task, rec in out.items():
        shown = [f"{m} {v:.4f}" + (f" ± {rec[m + '_stderr']:.4f}" if isinstance(rec.get(m + "_stderr"), float) else "")
                 for m, v in rec.items() if isinstance(v, float) and "_stderr" not in m]
        con.info(f"{task}: {', '.join(shown)} on {rec.get('samples', '?')} questions")
    return out


def _code(cfg, rd: RunDir, model, tok, con, stage: str | None) -> dict:
    """pass@k on code tasks in the sandbox (llmctl.evaluation.codeexec); samples to code_samples.jsonl."""
    from llmctl.evaluation import codeexec

    out, rows = codeexec.evaluate(model, tok, cfg.eval.code, cfg.run.seed, cfg.eval.batch_size, con)
    if stage is not None:
        atomic_write_text(rd.code_samples_file(stage), "".join(json.dumps(r) + "\n" for r in rows))
        out["file"] = str(rd.code_samples_file(stage))
    ks = "  ".join(f"{k} {out[k]:.3f}" for k in out if k.startswith("pass@"))
    con.info(f"code: {ks} on {out['tasks']} tasks x {out['samples_per_task']} samples; outcomes " +
             ", ".join(f"{k} {v}" for k, v in out["outcomes"].items()))
    return out


def _bias(cfg, rd: RunDir, model, tok, con, stage: str | None) -> dict:
    """The bias probe (llmctl.evaluation.bias); every pair to bias_pairs.jsonl."""
    from llmctl.evaluation.bias import probe

    out, rows = probe(model, tok, cfg.eval.bias, cfg.run.seed, cfg.eval.batch_size)
    if stage is not None:
        atomic_write_text(rd.bias_pairs_file(stage), "".join(json.dumps(r) + "\n" for r in rows))
        out["file"] = str(rd.bias_pairs_file(stage))
    for g, s in out["groups"].items():
        lo, hi = s["mean_gap_ci95"]
        con.info(f"bias probe {g}: prefers the stereotyped sentence in {s['stereotype_share']:.0%} of {s['pairs']} pairs; "
                 f"mean log-likelihood gap {s['mean_gap']:+.3f} nats (95% CI {lo:+.3f} to {hi:+.3f})")
    return out


# --------------------------------------------------------------------------- preference pairs
def _preference(cfg, rd: RunDir, model, tok, con, reference=None) -> dict:
    """On the held-out pairs: how often the model's implicit reward, beta * (log p(answer) -
    log p_ref(answer)), is higher for chosen than for rejected (ties count as misses, so the
    reference itself scores 0), the mean reward margin, how often the model alone gives chosen
    the higher log-likelihood, and the mean answer lengths in tokens. The reference is the
    starting model (llmctl.train.preference.reference_model)."""
    from datasets import load_from_disk

    from llmctl.train.preference import DEFAULT_BETA, answer_logps, reference_model

    e = cfg.eval
    ds = load_from_disk(str(rd.dataset_dir))
    if e.split not in ds:
        raise StageInputError(f"{rd.dataset_dir} has no '{e.split}' split: set eval.split to one of {', '.join(ds)} or data.{e.split}_fraction and re-run prepare")
    pairs = ds[e.split]
    if e.max_examples:
        pairs = pairs.select(range(min(len(pairs), e.max_examples)))
    device = next(model.parameters()).device
    ref = reference if reference is not None else reference_model(cfg, tok).to(device)
    t = cfg.train
    beta = t.beta if t.beta is not None else DEFAULT_BETA.get(t.method, 0.1)
    check = _reference_check(cfg, rd, ref, tok) if reference is None else {}
    if "label" in pairs.column_names:
        return {**_unpaired(cfg, pairs, model, ref, tok, con, beta), **check}
    prompts = list(pairs["prompt"])
    con.step(f"scoring {len(pairs)} preference pairs ({e.split}) against the reference model")
    lp = {k: answer_logps(model, tok, prompts, list(pairs[k]), cfg.data.block_size, e.batch_size) for k in ("chosen", "rejected")}
    ref_lp = lp if ref is model else {k: answer_logps(ref, tok, prompts, list(pairs[k]), cfg.data.block_size, e.batch_size) for k in ("chosen", "rejected")}
    # A pair with an answer too long to score at all is left out (and counted).
    keep = [i for i in range(len(prompts)) if lp["chosen"][i][1] and lp["rejected"][i][1]]
    c, r = [lp["chosen"][i][0] for i in keep], [lp["rejected"][i][0] for i in keep]
    rc, rr = [ref_lp["chosen"][i][0] for i in keep], [ref_lp["rejected"][i][0] for i in keep]
    margins = [beta * ((a - ra) - (b - rb)) for a, ra, b, rb in zip(c, rc, r, rr)]
    n = max(len(keep), 1)
    out = {
        "pairs": len(keep),
        "preference_accuracy": round(sum(m > 0 for m in margins) / n, 4),
        "reward_margin": round(sum(margins) / n, 4),
        "likelihood_accuracy": round(sum(a > b for a, b in zip(c, r)) / n, 4),
        "chosen_tokens": round(sum(lp["chosen"][i][1] for i in keep) / n, 2),
        "rejected_tokens": round(sum(lp["rejected"][i][1] for i in keep) / n, 2),
        "beta": beta,
        **check,
    }
    if len(keep) < len(prompts):
        out["unscored_pairs"] = len(prompts) - len(keep)
        con.warn(f"{out['unscored_pairs']} pair(s) left out: an answer alone does not fit in data.block_size={cfg.data.block_size}")
    con.info(f"preference accuracy {out['preference_accuracy']:.3f}  reward margin {out['reward_margin']:.3f}  "
             f"likelihood accuracy {out['likelihood_accuracy']:.3f} on {out['pairs']} pairs")
    return out


def _reference_check(cfg, rd: RunDir, ref, tok) -> dict:
    """The reference eval rebuilt, scored on the rows whose log-probs training recorded for its own
    reference (train.preference.ReferenceProbe): {reference_check: ...}; a float32 reference that
    differs is another model than the one training measured against, and fails the eval."""
    import torch
    from datasets import load_from_disk

    from llmctl.train.preference import ReferenceProbe, probe_diff, probe_matches, reference_name

    rec = ((rd.manifest("train") or {}).get("preference") or {}).get("reference_probe") or {}
    if not rec.get("logps"):
        return {}  # trained before the probe existed
    rows = load_from_disk(str(rd.dataset_dir))[rec["split"]]
    now = ReferenceProbe(cfg, tok, rows.select(range(min(len(rows), rec["rows"]))), rec["split"]).score(ref)
    out = {"rows": rec["rows"], "split": rec["split"], "max_abs_diff": probe_diff(now, rec["logps"]),
           "matches_training": probe_matches(now, rec["logps"])}
    if rec.get("after_training") is not None:
        out["unchanged_by_training"] = rec["after_training"]["unchanged"]
    if not out["matches_training"] and next(ref.parameters()).dtype == torch.float32:
        from llmctl.hints import command

        name = reference_name(cfg) or cfg.model.name_or_path or "the seeded initialisation"
        fix = command("train", cfg, rd.root, "--force")
        raise StageInputError(
            f"the reference model eval rebuilt ({name}) is not the one {rd.stage_dir('train')} trained against: its log-probs on "
            f"{rec['rows']} {rec['split']} rows differ by up to {out['max_abs_diff']} nats. Run '{fix}' to train against this one",
            hint=fix,
        )
    return {"reference_check": out}


def _unpaired(cfg, rows, model, ref, tok, con, beta: float) -> dict:
    """kto's rows {prompt, completion, label}: preference_accuracy is the share whose implicit
    reward has the label's sign (positive for a desirable completion, negative for an
    undesirable one; zero is a miss), reward_margin the mean reward of the desirable rows less
    that of the undesirable ones; chosen/rejected_tokens their mean lengths."""
    from llmctl.train.preference import answer_logps

    e = cfg.eval
    prompts, answers, labels = list(rows["prompt"]), list(rows["completion"]), list(rows["label"])
    con.step(f"scoring {len(rows)} labelled completions ({e.split}) against the reference model")
    lp = answer_logps(model, tok, prompts, answers, cfg.data.block_size, e.batch_size)
    ref_lp = lp if ref is model else answer_logps(ref, tok, prompts, answers, cfg.data.block_size, e.batch_size)
    keep = [i for i in range(len(rows)) if lp[i][1]]
    reward = {i: beta * (lp[i][0] - ref_lp[i][0]) for i in keep}
    good, bad = [i for i in keep if labels[i]], [i for i in keep if not labels[i]]

    def mean(xs) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    out = {
        "pairs": len(keep),
        "desirable": len(good),
        "undesirable": len(bad),
        "preference_accuracy": round(mean([(reward[i] > 0) if labels[i] else (reward[i] < 0) for i in keep]), 4),
        "reward_margin": round(mean([reward[i] for i in good]) - mean([reward[i] for i in bad]), 4),
        "chosen_tokens": round(mean([lp[i][1] for i in good]), 2),
        "rejected_tokens": round(mean([lp[i][1] for i in bad]), 2),
        "beta": beta,
    }
    if len(keep) < len(rows):
        out["unscored_pairs"] = len(rows) - len(keep)
        con.warn(f"{out['unscored_pairs']} row(s) left out: a completion alone does not fit in data.block_size={cfg.data.block_size}")
    con.info(f"preference accuracy {out['preference_accuracy']:.3f}  reward margin {out['reward_margin']:.3f} "
             f"on {len(good)} desirable and {len(bad)} undesirable completions")
    return out


# --------------------------------------------------------------------------- red team
def _rates(flags: list[list[str]]) -> dict:
    n = len(flags)
    cats: dict[str, int] = {}
    for f in flags:
        for c in f:
            cats[c] = cats.get(c, 0) + 1
    flagged = sum(1 for f in flags if f)
    return {"flagged": flagged, "flagged_rate": round(flagged / max(n, 1), 4), "by_category": dict(sorted(cats.items()))}


def _redteam(cfg, rd: RunDir, model, tok, con, stage: str = "eval") -> dict:
    """The shipped adversarial prompts through the model, rails off and on.

    Off: the model's raw output. On: the configured rails (safety.input/output) act on the
    prompt and the output. Both are scored by every detector, as /v1/moderations does; the
    flagged-output rate is the share of outputs in which any detector fires.
    """
    from llmctl import detectors
    from llmctl.generation import Sampling, generate_batch
    from llmctl.safety import CONTENT_FILTER, AuditLog, Blocked, Rails, is_refusal, load_redteam

    e = cfg.eval
    items = load_redteam()
    audit = AuditLog(None)
    rails = Rails(cfg.safety, stage="eval", audit=audit, enabled=True)
    chat = bool(getattr(tok, "chat_template", None))

    def render(p: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) if chat else p

    sp = Sampling(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature, seed=cfg.run.seed)

    def generate(prompts: list[str]) -> list[str]:
        out = []
        for i in range(0, len(prompts), e.batch_size):
            out += [r["text"] for r in generate_batch(model, tok, [render(p) for p in prompts[i : i + e.batch_size]], sp)]
        return out

    con.step(f"red team: {len(items)} adversarial prompts, rails off and on")
    raw = generate([it["prompt"] for it in items])
    # Rails on: the input rail first (a redacted prompt is generated again), then the output rail.
    on_prompt: dict[int, str] = {}
    refused: dict[int, str] = {}
    for i, it in enumerate(items):
        try:
            p = rails.check_input(it["prompt"], it["id"])
        except Blocked as b:
            refused[i] = b.rail
            continue
        if p != it["prompt"]:
            on_prompt[i] = p
    regen = dict(zip(on_prompt, generate(list(on_prompt.values())))) if on_prompt else {}
    rows, flags_off, flags_on, refused_off, refused_on = [], [], [], [], []
    blocked_out = 0
    for i, it in enumerate(items):
        f_off = rails.flagged(raw[i])
        if i in refused:
            text_on, finish = rails.refusal, CONTENT_FILTER
        else:
            text_on, blocked = rails.check_output(regen.get(i, raw[i]), it["id"])
            finish = CONTENT_FILTER if blocked else "ok"
            blocked_out += blocked
        f_on = rails.flagged(text_on) if i not in refused else []
        flags_off.append(f_off)
        flags_on.append(f_on)
        refused_off.append(is_refusal(raw[i], rails.refusal))
        refused_on.append(is_refusal(text_on, rails.refusal))
        # The raw output is stored with PII and secrets replaced: the artifact must not leak them.
        rows.append({
            "id": it["id"], "category": it["category"], "prompt": it["prompt"],
            "output_off": detectors.redact(raw[i])[0], "flagged_off": f_off,
            "output_on": detectors.redact(text_on)[0], "flagged_on": f_on,
            **({"refused_by": refused[i]} if i in refused else {}), **({"content_filter": True} if finish == CONTENT_FILTER else {}),
        })
    atomic_write_text(rd.redteam_file(stage), "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(rd.audit_path(stage), "".join(json.dumps(ev) + "\n" for ev in audit.events))
    out = {
        "prompts": len(items),
        "rails": {"input": rails.actions["input"], "output": rails.actions["output"]},
        "classifier": rails.classifier.name if rails.classifier.available() else None,
        # refused: the answer opens with a refusal (safety.is_refusal); with the rails on, so does a blocked prompt's answer
        "off": {**_rates(flags_off), "refused": sum(refused_off), "refused_rate": round(sum(refused_off) / max(len(items), 1), 4)},
        "on": {**_rates(flags_on), "refused": sum(refused_on), "refused_rate": round(sum(refused_on) / max(len(items), 1), 4), "blocked_inputs": len(refused), "redacted_inputs": len(on_prompt), "blocked_outputs": blocked_out, "interventions": len(audit.events)},
        "file": str(rd.redteam_file(stage)),
    }
    con.info(f"red team: flagged outputs {out['off']['flagged']}/{len(items)} with the rails off, {out['on']['flagged']}/{len(items)} on; "
             f"refusals {out['off']['refused']}/{len(items)} off, {out['on']['refused']}/{len(items)} on")
    return out
