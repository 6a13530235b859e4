"""`llmctl run`: the stages in order, each skipping itself when complete and up to date,
then one summary of what the run produced."""

from __future__ import annotations

import json
import time
from typing import Callable, Sequence

from llmctl import console as _console
from llmctl.errors import ConfigError, LlmctlError


def stage_range(stages: Sequence[str], first: str | None, last: str | None) -> list[str]:
    for name, value in (("--from", first), ("--to", last)):
        if value is not None and value not in stages:
            raise ConfigError(f"{name} {value!r}: expected one of {', '.join(stages)}")
    i = stages.index(first) if first else 0
    j = stages.index(last) if last else len(stages) - 1
    if i > j:
        raise ConfigError(f"--from {first} comes after --to {last}")
    return list(stages[i : j + 1])


def in_order(cfg, stages: Sequence[str]) -> list[str]:
    """The stages as this config needs them: `generate.engine: llama.cpp` decodes the run's GGUF
    export, so export comes before generate."""
    stages = list(stages)
    if cfg.generate.engine == "llama.cpp" and "generate" in stages and "export" in stages and stages.index("export") > stages.index("generate"):
        stages.remove("export")
        stages.insert(stages.index("generate"), "export")
    return stages


def run_pipeline(cfg, rd, get_stage: Callable, stages: Sequence[str], first=None, last=None) -> dict:
    con = _console.current()
    t0 = time.time()
    ran, skipped = [], []
    for name in stage_range(in_order(cfg, stages), first, last):
        if name == "generate" and not (cfg.generate.prompts or cfg.generate.prompts_file):
            con.info("generate: no generate.prompts in the config, skipped")
            continue
        module = name
        if name == "train" and getattr(cfg, "distill", None) is not None:
            module = "distill"  # a config with a teacher trains its model by distillation, into the same RUN/train
        con.step(module)
        try:
            res = get_stage(module).run(cfg, rd, force=False) or {}
        except LlmctlError as e:  # --json: which stage stopped the run, and what ran before it
            e.result = {**(e.result or {}), "failed_stage": name, "ran": ran, "skipped_up_to_date": skipped}
            raise
        (skipped if res.get("cached") else ran).append(name)
    summary = summarize(rd)
    summary.update({"ran": ran, "skipped_up_to_date": skipped, "wall_seconds": round(time.time() - t0, 1)})
    from llmctl.errors import StageInputError
    from llmctl.report import write as write_report  # one page about the whole run: open it, or scp it

    try:
        summary["report"] = write_report(rd, cfg)["report"]
    except StageInputError as e:  # stages that wrote nothing to show: the run itself stands
        con.warn(f"report: {e}")
        summary["report"] = None
    return summary


def _numbers(**kw) -> dict:
    """Only the values that were measured; numbers stay numbers (for --json)."""
    return {k: v for k, v in kw.items() if v is not None}


def summarize(rd) -> dict:
    """The headline of every stage in one place: data, model, training, quality, artifacts."""
    out: dict = {"run_dir": str(rd.root)}
    p = (rd.manifest("prepare") or {}).get("headline", {})
    t = (rd.manifest("train") or {}).get("headline", {})
    e = (rd.manifest("eval") or {}).get("headline", {})
    x = rd.manifest("export") or {}
    if p:
        out["data"] = _numbers(documents=p.get("documents"), train_tokens=p.get("train_tokens"), vocab_size=p.get("vocab_size"))
    if t:
        out["model"] = _numbers(parameters=t.get("parameters"), trainable_parameters=t.get("trainable_parameters"))
        out["training"] = _numbers(
            steps=t.get("steps"), seconds=t.get("seconds"), tokens_per_s=t.get("tokens_per_s"),
            val_perplexity_before=t.get("init_val_ppl"), val_perplexity_after=t.get("val_ppl"),
        )
    if e:
        if "perplexity" in e:
            out["eval_perplexity"] = _numbers(before=e.get("init_perplexity"), after=e["perplexity"], unigram_baseline=e.get("baseline_unigram_perplexity"))
        lead = e.get("generation_lead")  # eval.metrics' first: the generation metric the summary leads with
        if lead and lead != "bleu" and lead in e:
            out[lead] = _numbers(before=e.get(f"init_{lead}"), after=e[lead], copy_prompt_baseline=e.get(f"baseline_copy_{lead}"), pairs=e.get("examples"))
        if "bleu" in e and not e.get("bleu_degenerate"):
            out["bleu"] = _numbers(before=e.get("init_bleu"), after=e["bleu"], copy_prompt_baseline=e.get("baseline_copy_bleu"), pairs=e.get("examples"))
        elif "bleu" in e:
            # References too short for 4-grams: BLEU is 0 whatever the model says, so lead with
            # the metrics that still measure something.
            out["chrf"] = _numbers(before=e.get("init_chrf"), after=e.get("chrf"), copy_prompt_baseline=e.get("baseline_copy_chrf"), pairs=e.get("examples"))
            out["exact_match"] = _numbers(before=e.get("init_exact_match"), after=e.get("exact_match"))
            out["bleu_degenerate"] = "every reference is shorter than 4 tokens: BLEU is 0 by construction"
    own_outputs = "train" in ((rd.manifest("generate") or {}).get("lineage") or {})  # not another model's (older llmctl wrote them here)
    if own_outputs and rd.outputs_path.is_file():
        first = rd.outputs_path.read_text().splitlines()[:1]
        if first:
            rec = json.loads(first[0])
            out["sample"] = (rec["prompt"] + rec["output"])[:300]
    if x.get("status") == "complete":
        h = x.get("headline", {})
        out["exports_mb"] = _numbers(**{f: h.get(f + "_mb") for f in x.get("formats", [])})
    return out
