"""`llmctl eval` for data.format=image_text: perplexity of the held-out captions (answer
tokens only, each with its image), and generated captions scored by exact match, BLEU, chrF
and ROUGE against the references, next to two baselines that make the numbers read honestly:
the most frequent training caption for every image, and the untrained model (eval.compare_init)."""

from __future__ import annotations

import json
import math
from collections import Counter

from llmctl.errors import StageInputError


def _split(rd, name: str):
    from datasets import load_from_disk

    ds = load_from_disk(str(rd.dataset_dir))
    if name not in ds:
        raise StageInputError(f"{rd.dataset_dir} has no {name} split (it has {', '.join(ds)}): set eval.split to one of them, "
                              "or give prepare a data.validation_fraction / data.test_fraction")
    return ds


def caption_nll(model, rows, collate, batch_size: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the answer tokens (labels != -100), images given."""
    import torch

    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
            labels = batch.pop("labels").to(model.device)
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()
            shift, target = logits[:, :-1], labels[:, 1:]
            keep = target != -100
            lp = torch.nn.functional.cross_entropy(shift[keep], target[keep], reduction="sum")
            nll += lp.item()
            n += int(keep.sum())
    return nll, n


def train_captions(ds, tok) -> list[str]:
    """The training split's captions, read back from its answer tokens."""
    out = []
    for labels in ds["train"]["labels"]:
        ids = [t for t in labels if t != -100 and t != tok.eos_token_id]
        out.append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def score(hyps: list[str], refs: list[str]) -> dict:
    from llmctl.metrics import text_metrics

    out = text_metrics(hyps, refs)
    try:
        from rouge_score import rouge_scorer

        sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        out["rougeL"] = round(100 * sum(sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / max(len(refs), 1), 4)
    except ImportError:
        pass
    return out


def captions(model, proc, pairs, cfg) -> list[str]:
    from llmctl.generation import Sampling
    from llmctl.vision.infer import generate, open_image

    e = cfg.eval
    sp = Sampling(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature, stop=tuple(e.stop or ("\n",)),
                  seed=cfg.run.seed)
    out = []
    for i in range(0, len(pairs), e.batch_size):
        chunk = pairs.select(range(i, min(i + e.batch_size, len(pairs))))
        res = generate(model, proc, list(chunk["prompt"]), [open_image(b) for b in chunk["image"]], sp)
        out += [r["text"].strip() for r in res]
    return out


def model_results(model, proc, ds, pairs, cfg, con, label: str) -> tuple[dict, list[str]]:
    """{perplexity..., generation...} of one model, and its captions."""
    from llmctl.metrics import perplexity_summary
    from llmctl.vision.infer import Collator

    e = cfg.eval
    rows = ds[e.split].with_format("torch")
    con.step(f"{label}: caption perplexity on {len(rows)} held-out images")
    nll, n = caption_nll(model, rows, Collator(proc.tokenizer.pad_token_id), e.batch_size)
    res = {"perplexity": perplexity_summary(nll, n, n_bytes=sum(len(r) for r in (pairs["reference"] if pairs is not None else [])))}
    hyps: list[str] = []
    if e.generation and pairs is not None:
        con.step(f"{label}: captioning {len(pairs)} held-out images")
        hyps = captions(model, proc, pairs, cfg)
        res["generation"] = score(hyps, list(pairs["reference"]))
    return res, hyps


def evaluate(cfg, rd, path: str, con, predictions_path) -> dict:
    """results.json's content for an image-text run; predictions to `predictions_path`."""
    from datasets import load_from_disk

    from llmctl.modeling import model_identity
    from llmctl.rundir import atomic_write_text
    from llmctl.vision.infer import load_model

    e = cfg.eval
    ds = _split(rd, e.split)
    all_pairs = load_from_disk(str(rd.pairs_dir)) if rd.pairs_dir.is_dir() else {}
    pairs = _first(all_pairs[e.split], e.max_examples) if e.split in all_pairs else None
    con.step(f"loading {path}")
    model, proc = load_model(path)
    mine, hyps = model_results(model, proc, ds, pairs, cfg, con, "model")
    results = {"model": model_identity(path), "split": e.split, "perplexity": mine["perplexity"]}
    if "generation" in mine:
        majority, freq = Counter(train_captions(ds, proc.tokenizer)).most_common(1)[0]
        results["majority_caption"] = {"caption": majority, "train_count": freq}
        results["generation"] = mine["generation"]
        results.update(_against_majority(mine["generation"], list(pairs["reference"]), majority))
        lines = [json.dumps({"prompt": p, "reference": r, "prediction": h, "exact_match": h.strip() == r.strip()})
                 for p, r, h in zip(pairs["prompt"], pairs["reference"], hyps)]
        atomic_write_text(predictions_path, "\n".join(lines) + "\n")
        # The other held-out split too (the builtin shapes: validation = seen pairings, test = unseen ones).
        for other in [s for s in ("validation", "test") if s != e.split and s in all_pairs and e.generation]:
            op = _first(all_pairs[other], e.max_examples)
            con.step(f"model: captioning {len(op)} held-out images of the {other} split")
            gen = score(captions(model, proc, op, cfg), list(op["reference"]))
            results.setdefault("other_splits", {})[other] = {"generation": gen, **_against_majority(gen, list(op["reference"]), majority)}
    if e.compare_init:
        results["init"] = _init(cfg, proc, ds, pairs, con)
    return results


def _first(pairs, n: int | None):
    return pairs.select(range(min(len(pairs), n))) if n else pairs


def _against_majority(gen: dict, refs: list[str], majority: str) -> dict:
    """The most frequent training caption scored on the same references, and the ratio of exact matches."""
    base = score([majority] * len(refs), refs)
    em, bem = gen["exact_match"], base["exact_match"]
    return {"baselines": {"baseline_majority_exact_match": bem, "baseline_majority_bleu": base["bleu"], "baseline_majority_chrf": base["chrf"]},
            "exact_match_vs_majority": round(em / bem, 2) if bem else (math.inf if em else None)}


def _init(cfg, proc, ds, pairs, con) -> dict:
    """The untrained model's numbers: the seeded initialisation, or the pretrained base."""
    from llmctl.vision.model import build

    init = build(cfg, proc.tokenizer).eval()
    res, _ = model_results(init, proc, ds, pairs, cfg, con, "untrained model")
    out = {"perplexity": res["perplexity"]["perplexity"]}
    for k in ("exact_match", "bleu", "chrf"):
        if k in res.get("generation", {}):
            out[k] = res["generation"][k]
    return out
