"""The training section: loss against step and tokens with the learning rate on a second axis,
the time-fitted plan and its re-plans, resumes, tokens/s and gradient norm (train/metrics.jsonl)."""

from __future__ import annotations

from llmctl.report.common import Section, kv_table, note, read_jsonl
from llmctl.report.svg import Marker, Series, bar_chart, line_chart


def _processes(history: list[dict]) -> list[int]:
    """Indexes where a new training process began (a resume or restart): each process counts
    elapsed_s from its own start, so the clock goes back; or the step goes back (a resume from
    a checkpoint before the last logged step)."""
    starts, last_t, last_step = [], None, None
    for i, r in enumerate(history):
        t, step = r.get("elapsed_s"), r.get("step")
        if (t is not None and last_t is not None and t < last_t) or (step is not None and last_step is not None and step < last_step):
            starts.append(i)
        last_t = t if t is not None else last_t
        last_step = step if step is not None else last_step
    return starts


def _plan_markers(train: list[dict]) -> list[Marker]:
    """The planned end of a time-fitted schedule each time it moved: the first plan, then re-plans."""
    out, last = [], None
    for r in train:
        p = r.get("planned_steps")
        if p is not None and p != last:
            what = "plan" if last is None else "re-plan"
            out.append(Marker(float(p), f"{what} at step {r['step']}: end at step {p}", cls="mk plan", short=f"{what}: end {p}"))
            last = p
    return out


def _tokens_at(train: list[dict]):
    """step -> tokens seen, interpolated between logged steps (validation records carry no count)."""
    known = [(r["step"], r["tokens"]) for r in train if r.get("tokens") is not None]

    def at(step: float) -> float | None:
        if not known:
            return None
        if step <= known[0][0]:
            return known[0][1] * step / known[0][0] if known[0][0] else 0.0
        for (s0, t0), (s1, t1) in zip(known, known[1:]):
            if s0 <= step <= s1:
                return t0 + (t1 - t0) * (step - s0) / ((s1 - s0) or 1)
        s, t = known[-1]
        return t * step / s if s else t

    return at


def training_section(rd) -> Section:
    history = read_jsonl(rd.metrics_path)
    m = rd.manifest("train") or {}
    verb = "distill" if m.get("teacher") else "train"
    if not history:
        why = "no train/metrics.jsonl in this run" if not m else "train/metrics.jsonl holds no logged step yet"
        return Section("training", "Training", "", f"{why}: run 'llmctl {verb} CONFIG'")
    train = [r for r in history if r.get("loss") is not None]
    val = [r for r in history if r.get("val_loss") is not None]
    resumes = [Marker(float(history[i]["step"]), f"resumed at step {history[i]['step']}", cls="mk resume", short="resumed")
               for i in _processes(history)]
    plans = _plan_markers(train)
    loss = [
        Series("train loss", [(r["step"], r["loss"]) for r in train], cls="s0"),
        Series("validation loss", [(r["step"], r["val_loss"]) for r in val], dots=True, cls="s1"),
        Series("learning rate", [(r["step"], r["lr"]) for r in train if r.get("lr") is not None], right=True, cls="s2", fmt="{:.3e}"),
    ]
    parts = [_summary(m, history, resumes)]
    parts.append(line_chart(loss, x_label="step", y_label="loss (nats)", y2_label="learning rate", markers=plans + resumes,
                            title="Loss and learning rate against step", chart_id="loss-step"))
    at = _tokens_at(train)
    by_tokens = [
        Series("train loss", [(at(r["step"]), r["loss"]) for r in train if at(r["step"]) is not None], cls="s0"),
        Series("validation loss", [(at(r["step"]), r["val_loss"]) for r in val if at(r["step"]) is not None], dots=True, cls="s1"),
    ]
    parts.append(line_chart(by_tokens, x_label="tokens seen", y_label="loss (nats)", title="Loss against tokens seen", chart_id="loss-tokens"))
    speed = [Series("tokens/s", [(r["step"], r["tokens_per_s"]) for r in train if r.get("tokens_per_s") is not None], cls="s3"),
             Series("grad norm", [(r["step"], r["grad_norm"]) for r in train if r.get("grad_norm") is not None], right=True, cls="s4")]
    parts.append(line_chart(speed, x_label="step", y_label="tokens/s", y2_label="gradient norm (before clipping)", markers=resumes,
                            title="Throughput and gradient norm", chart_id="speed"))
    extra = [k for k in (m.get("headline") or {}) if k.startswith("eval_") or k.startswith("rewards")]
    if extra:  # preference methods: their eval metrics as bars
        h = m["headline"]
        parts.append(bar_chart([(k, float(h[k]), f"{k} {h[k]}") for k in extra if isinstance(h[k], (int, float))], title="Last evaluation (preference)", chart_id="pref"))
    if plans:
        parts.append(note("The learning-rate schedule was fitted to train.max_time: dashed lines mark where the plan put its end, "
                          "first and after each re-plan (the decay ends when the time budget does)."))
    return Section("training", "Training", "".join(parts))


def _summary(m: dict, history: list[dict], resumes: list[Marker]) -> str:
    h = m.get("headline") or {}
    status = m.get("status") or "unknown"
    if status == "running" and m.get("progress"):
        status += f" (step {m['progress'].get('step')} of {m['progress'].get('total')})"
    rows = [
        ("status", status),
        ("steps", h.get("steps", history[-1].get("step"))),
        ("stopped by", h.get("stopped_by")),
        ("parameters", h.get("parameters")),
        ("trainable parameters", h.get("trainable_parameters")),
        ("tokens", h.get("tokens")),
        ("tokens/s (last log)", h.get("tokens_per_s")),
        ("validation loss: start -> end", f"{h['init_val_loss']} -> {h['val_loss']}" if h.get("init_val_loss") is not None and h.get("val_loss") is not None else None),
        ("validation perplexity: start -> end", f"{h['init_val_ppl']} -> {h['val_ppl']}" if h.get("init_val_ppl") is not None and h.get("val_ppl") is not None else None),
        ("planned steps (time-fitted)", h.get("planned_steps")),
        ("seconds", h.get("seconds")),
        ("device", h.get("device")),
        ("processes (resumes)", f"{len(resumes) + 1} ({', '.join(r.label for r in resumes)})" if resumes else "1 (no resume)"),
    ]
    return kv_table(rows)
