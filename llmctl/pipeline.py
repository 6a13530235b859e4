"""`llmctl run`: the stages in order, each skipping itself when complete and up to date,
then one summary of what the run produced."""

from __future__ import annotations

import json
import time
from typing import Callable, Sequence

from llmctl import console as _console
from llmctl.errors import ConfigError


def stage_range(stages: Sequence[str], first: str | None, last: str | None) -> list[str]:
    for name, value in (("--from", first), ("--to", last)):
        if value is not None and value not in stages:
            raise ConfigError(f"{name} {value!r}: expected one of {', '.join(stages)}")
    i = stages.index(first) if first else 0
    j = stages.index(last) if last else len(stages) - 1
    if i > j:
        raise ConfigError(f"--from {first} comes after --to {last}")
    return list(stages[i : j + 1])


def run_pipeline(cfg, rd, get_stage: Callable, stages: Sequence[str], first=None, last=None) -> dict:
    con = _console.current()
    t0 = time.time()
    ran, skipped = [], []
    for name in stage_range(stages, first, last):
        if name == "generate" and not (cfg.generate.prompts or cfg.generate.prompts_file):
            con.info("generate: no generate.prompts in the config, skipped")
            continue
        con.step(name)
        res = get_stage(name).run(cfg, rd, force=False) or {}
        (skipped if res.get("cached") else ran).append(name)
    summary = summarize(rd)
    summary.update({"ran": ran, "skipped_up_to_date": skipped, "wall_seconds": round(time.time() - t0, 1)})
    return summary


def summarize(rd) -> dict:
    """The headline of every stage in one place: data, model, training, quality, artifacts."""
    out: dict = {"run_dir": str(rd.root)}
    p = (rd.manifest("prepare") or {}).get("headline", {})
    t = (rd.manifest("train") or {}).get("headline", {})
    e = (rd.manifest("eval") or {}).get("headline", {})
    x = rd.manifest("export") or {}
    if p:
        out["data"] = f"{p.get('documents')} documents, {p.get('train_tokens')} train tokens, vocab {p.get('vocab_size')}"
    if t:
        out["model"] = f"{(t.get('parameters') or 0) / 1e6:.2f}M parameters"
        out["training"] = f"{t.get('steps')} steps in {t.get('seconds')} s ({t.get('tokens_per_s')} tokens/s)"
        if t.get("init_val_ppl") is not None:
            out["val_perplexity_before_after"] = f"{t.get('init_val_ppl')} -> {t.get('val_ppl')}"
    if e:
        if "perplexity" in e:
            before = e.get("init_perplexity", "?")
            out["eval_perplexity_before_after"] = f"{before} -> {e['perplexity']} (unigram baseline {e.get('baseline_unigram_perplexity', '?')})"
        if "bleu" in e:
            before = e.get("init_bleu", "?")
            out["bleu_before_after"] = f"{before} -> {e['bleu']} (copy-prompt baseline {e.get('baseline_copy_bleu', '?')}, {e.get('examples')} pairs)"
    if rd.outputs_path.is_file():
        first = rd.outputs_path.read_text().splitlines()[:1]
        if first:
            rec = json.loads(first[0])
            out["sample"] = (rec["prompt"] + rec["output"])[:300]
    if x.get("status") == "complete":
        h = x.get("headline", {})
        out["exports"] = ", ".join(f"{f} ({h.get(f + '_mb')} MB)" for f in x.get("formats", []))
    return out
