"""Perplexity with a sliding window (every token scored exactly once), sacreBLEU metrics, and the generation metrics of llmctl.evaluation.textmetrics."""

from __future__ import annotations

import math
import weakref
from collections import Counter


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(input_start, target_start, end) over s = [prefix] + tokens, targets s[1..n].

    Each window predicts targets s[target_start:end] from input s[input_start:end-1], with
    as much context as max_length allows. stride == max_length gives disjoint windows
    (lm-eval's loglikelihood_rolling); a smaller stride gives each target more context.
    """
    out = []
    b = 1
    while b <= n_tokens:
        e = min(b + stride, n_tokens + 1)
        start = max(0, e - 1 - max_length)
        out.append((start, b, e))
        b = e
    return out


# Logits are made a chunk of scored positions at a time: [chunk, vocab] float32 of at most this
# many bytes, never [batch, window, vocab] (16 x 2048 x 128k vocab would be 16.8 GB). Small
# enough that an eval batch of a 32k-vocabulary model already fills it, so a 128k vocabulary
# costs no more working memory (bench/bounded.py measures both); large enough that the output
# layer's matmul is still hundreds of positions at a time (128 at a 128k vocabulary).
LOSS_CHUNK_BYTES = 64 * 2**20
_SPLIT_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> body + lm_head reproduce its logits


def _body_and_head(model):
    """(the model without its output layer, that layer) when the two reproduce `model(...).logits`.

    Checked once per model against its own forward on a few tokens: a model whose head does more
    than a linear map (logit soft-capping, scaling) keeps the plain path.
    """
    import torch

    if model in _SPLIT_OK:
        return _SPLIT_OK[model]
    body, head = getattr(model, "base_model", model), model.get_output_embeddings()
    split = None
    if body is not model and head is not None:
        probe = torch.arange(8, device=model.device).view(1, -1) % max(1, model.config.vocab_size)
        try:
            with torch.no_grad():
                want = model(input_ids=probe, use_cache=False).logits.float()
                got = head(body(input_ids=probe, use_cache=False).last_hidden_state).float()
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                split = (body, head)
        except (TypeError, ValueError, AttributeError, RuntimeError):  # a body that wants other inputs: the plain path
            split = None
    _SPLIT_OK[model] = split
    return split


def token_nll(model, input_ids, targets, attention_mask=None):
    """Per-position NLL [B, T] (float32; 0 where `targets` is -100) of `targets[b, t]` after
    `input_ids[b, :t + 1]`, i.e. targets already shifted.

    The model body runs once to hidden states; its output layer and the cross-entropy then run on
    the scored positions only, LOSS_CHUNK_BYTES of logits at a time: peak memory does not grow
    with batch x window x vocabulary. The numbers are those of `model(...).logits`.
    """
    import torch
    import torch.nn.functional as F

    device = model.device
    input_ids, targets = input_ids.to(device), targets.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    split = _body_and_head(model)
    if split is None:  # the plain path: a [B, T, V] tensor
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none").view(targets.shape)
    body, head = split
    hidden = body(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    flat = targets.reshape(-1)
    scored = (flat != -100).nonzero().squeeze(1)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=device)
    vocab = model.config.vocab_size or 1
    step = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    for i in range(0, scored.shape[0], step):
        at = scored[i : i + step]
        out[at] = F.cross_entropy(head(hidden[at]).float(), flat[at], reduction="none")
    return out.view(targets.shape)


def sliding_nll(model, ids: list[int], prefix_id: int, max_length: int, stride: int, batch_size: int = 8, progress=None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of `ids` given `prefix_id` before the first."""
    return rolling_nll(model, [ids], prefix_id, max_length, stride, batch_size=batch_size, progress=progress)


def rolling_nll(model, docs: list[list[int]], prefix_id: int, max_length: int, stride: int, batch_size: int = 8, progress=None,
                token_losses: list | None = None) -> tuple[float, int]:
    """Summed NLL (nats) and token count over documents, each scored on its own.

    Every document starts from `prefix_id` (BOS) and is cut into windows as `windows` says;
    no window spans two documents (lm-eval's loglikelihood_rolling, one request per
    document). Windows of all documents are batched together. With `token_losses` (a list),
    it receives one float32 array per document: the loss of each of its tokens.
    """
    import numpy as np
    import torch

    if stride > max_length:
        raise ValueError("stride must be <= max_length")
    seqs = [torch.tensor([prefix_id] + list(ids), dtype=torch.long) for ids in docs]
    wins = [(d, *w) for d, ids in enumerate(docs) for w in windows(len(ids), max_length, stride)]
    wins.sort(key=lambda w: w[3] - w[1], reverse=True)  # windows of like length batched together: little padding
    if token_losses is not None:
        token_losses[:] = [np.full(len(ids), np.nan, dtype=np.float32) for ids in docs]
    total, count = 0.0, 0
    for i in range(0, len(wins), batch_size):
        chunk = wins[i : i + batch_size]
        L = max(e - 1 - st for _, st, _, e in chunk)
        inp = torch.zeros((len(chunk), L), dtype=torch.long)
        tgt = torch.full((len(chunk), L), -100, dtype=torch.long)
        for r, (d, st, b, e) in enumerate(chunk):
            s = seqs[d]
            n = e - 1 - st
            inp[r, :n] = s[st : e - 1]
            # position k predicts s[st + k + 1]; score only targets b..e-1
            first = b - 1 - st
            tgt[r, first:n] = s[b:e]
        with torch.no_grad():
            # Right padding under causal attention: no real token sees a pad, so no mask is
            # needed, and without one attention takes its fused causal kernel.
            nll = token_nll(model, inp, tgt)
        total += nll.sum().item()
        count += int((tgt != -100).sum())
        if token_losses is not None:
            per = nll.float().cpu().numpy()
            for r, (d, st, b, e) in enumerate(chunk):
                first = b - 1 - st
                token_losses[d][b - 1 : e - 1] = per[r, first : first + e - b]
        if progress is not None:
            progress.update(advance=len(chunk))
    return total, count


def masked_nll(model, rows: list[dict], pad_id: int, batch_size: int = 8, token_losses: list | None = None) -> tuple[float, int]:
    """Summed NLL over labelled positions of prepared prompt/completion or chat rows. With
    `token_losses`, one float32 array per row: each token's loss (NaN where unlabelled)."""
    import numpy as np
    import torch

    from llmctl.data.formats import pad_right

    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        inp, lab, mask = pad_right(chunk, pad_id)
        # Position k predicts token k + 1: the last position predicts nothing.
        shift_labels = torch.cat([lab[:, 1:], torch.full((len(chunk), 1), -100, dtype=torch.long)], dim=1)
        with torch.no_grad():
            nll = token_nll(model, inp, shift_labels, attention_mask=mask)[:, :-1]
        shift_labels = shift_labels[:, :-1]
        total += nll.sum().item()
        count += int((shift_labels != -100).sum())
        if token_losses is not None:
            per = nll.float().cpu().numpy()
            for r, row in enumerate(chunk):
                a = np.full(len(row["input_ids"]), np.nan, dtype=np.float32)
                k = len(row["input_ids"])
                lab_r = np.asarray(row["labels"][1:k])
                a[1:k] = np.where(lab_r != -100, per[r, : k - 1], np.nan)
                token_losses.append(a)
    return total, count


LOSS_BINS = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def loss_report(segments: list[tuple[str, list[int], "object"]], decode, top: int = 10, context: int = 12) -> dict:
    """The hardest tokens and documents, and a histogram of token loss (nats).

    `segments`: (name, token ids, per-token losses with NaN where unscored). A token is shown
    with the `context` tokens before it; a document's loss is the mean over its scored tokens.
    """
    import numpy as np

    lens = [len(losses) for _, _, losses in segments]
    cat = np.concatenate([np.asarray(losses, dtype=np.float64) for _, _, losses in segments]) if segments else np.zeros(0)
    scored = np.flatnonzero(~np.isnan(cat))  # positions in the concatenation, document by document
    allx = cat[scored]
    edges = list(LOSS_BINS) + [float("inf")]
    counts = np.histogram(allx, bins=edges)[0].tolist() if len(allx) else [0] * (len(edges) - 1)
    hist = [{"from": a, "to": None if b == float("inf") else b, "tokens": c} for a, b, c in zip(edges[:-1], edges[1:], counts)]
    hardest = []
    starts = np.cumsum([0] + lens)
    for g in scored[np.argsort(-allx, kind="stable")[:top]]:  # ties: the earlier token first
        s = int(np.searchsorted(starts, g, side="right")) - 1
        i, (name, ids, _) = int(g - starts[s]), segments[s]
        hardest.append({"document": name, "position": i, "token": decode([ids[i]]), "loss": round(float(cat[g]), 4),
                        "context": decode(ids[max(0, i - context) : i])})
    docs = []
    for name, ids, losses in segments:
        arr = np.asarray(losses, dtype=np.float64)
        ok = ~np.isnan(arr)
        if ok.any():
            docs.append({"document": name, "tokens": int(ok.sum()), "mean_loss": round(float(arr[ok].mean()), 4)})
    docs.sort(key=lambda d: -d["mean_loss"])
    return {
        "token_loss_histogram": hist,
        "median_token_loss": round(float(np.median(allx)), 4) if len(allx) else None,
        "hardest_tokens": hardest,
        "hardest_documents": docs[:top],
    }


def perplexity_summary(nll: float, n_tokens: int, n_bytes: int) -> dict:
    mean = nll / max(n_tokens, 1)
    return {
        "tokens": n_tokens,
        "bytes": n_bytes,
        "mean_loss": round(mean, 6),
        "perplexity": round(math.exp(min(mean, 700)), 4),
        "bits_per_byte": round(nll / math.log(2) / max(n_bytes, 1), 6),
    }


def unigram_nll(train_rows, eval_ids: list[int], vocab_size: int) -> float:
    """A trivial baseline: add-one unigram model from the training split's token counts."""
    counts: Counter = Counter()
    for row in train_rows:
        counts.update(row)
    total = sum(counts.values()) + vocab_size
    return -sum(math.log((counts.get(t, 0) + 1) / total) for t in eval_ids)


def text_metrics(hyps: list[str], refs: list[str], metrics=None) -> dict:
    """Corpus BLEU, chrF, TER with their sacreBLEU signatures, ROUGE-1/2/L, and SQuAD-style
    exact match and token F1 (llmctl.evaluation.textmetrics): those in `metrics` (default all)."""
    from llmctl.evaluation.textmetrics import GENERATION_METRICS, ROUGE, rouge_scores, squad_scores

    want = tuple(metrics) if metrics is not None else GENERATION_METRICS
    out: dict = {}
    sigs = {}
    if {"bleu", "chrf", "ter"} & set(want):
        from sacrebleu.metrics import BLEU, CHRF, TER

        for name, m in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
            if name in want:
                out[name] = round(m.corpus_score(hyps, [refs]).score, 4)
                sigs[name] = str(m.get_signature())
    out.update(rouge_scores(hyps, refs, tuple(k for k in ROUGE if k in want))[0])
    squad = squad_scores(hyps, refs)[0]
    out.update({k: v for k, v in squad.items() if k in want})
    out["examples"] = len(refs)
    if sigs:
        out["signatures"] = sigs
    note = bleu_degenerate(refs) if "bleu" in want else None
    if note:
        out["bleu_degenerate"] = True
        out["bleu_note"] = note
    return out


def bleu_degenerate(refs: list[str]) -> str | None:
    """Why corpus BLEU says nothing about these references, or None.

    BLEU multiplies 1- to 4-gram precisions: when no reference has 4 tokens (sacreBLEU's 13a
    tokenization) there is no 4-gram to match and BLEU is 0 whatever the predictions are.
    """
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    longest = max((len(tok(r).split()) for r in refs), default=0)
    if longest < 4:
        return f"every reference is shorter than 4 tokens (longest {longest}): BLEU is 0 by construction; read chrF and exact match"
    return None


def sentence_scores(hyp: str, ref: str, metrics=None) -> dict:
    """One prediction's scores (for predictions.jsonl): those of `metrics` (default all)."""
    from llmctl.evaluation.textmetrics import GENERATION_METRICS, ROUGE, exact_match, rouge_scores, token_f1

    want = tuple(metrics) if metrics is not None else GENERATION_METRICS
    out: dict = {}
    if "bleu" in want:
        from sacrebleu.metrics import BLEU

        out["bleu"] = round(BLEU(effective_order=True).sentence_score(hyp, [ref]).score, 4)
    if "chrf" in want:
        from sacrebleu.metrics import CHRF

        out["chrf"] = round(CHRF().sentence_score(hyp, [ref]).score, 4)
    out.update(rouge_scores([hyp], [ref], tuple(k for k in ROUGE if k in want))[1][0])
    if "exact_match" in want:
        out["exact_match"] = exact_match(hyp, ref)
    if "token_f1" in want:
        out["token_f1"] = round(token_f1(hyp, ref), 4)
    return out
