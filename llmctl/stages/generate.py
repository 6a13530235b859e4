"""`llmctl generate`: prompts from the command line, a file or stdin -> text.

One prompt on a terminal streams tokens as they come; many run batched. Every result goes
to RUN/generate/outputs.jsonl with token counts and the finish reason. The safety rails
check each prompt and output (a blocked one gets finish_reason content_filter); their
interventions are listed on each record and in RUN/generate/audit.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from llmctl import console as _console
from llmctl.chat import has_chat_template, plain_prompts_as_chat, render_chat, user_turn
from llmctl.data.jsonl import read_jsonl
from llmctl.errors import ConfigError, DataError
from llmctl.rundir import RunDir, atomic_write_text


def _read_prompts(cfg, prompts: list[str], prompts_file: str | None) -> list[dict]:
    """[{'prompt': str} | {'messages': [...]}] from flags, file, config, or stdin."""
    out: list[dict] = []
    want_stdin = "-" in prompts
    out += [{"prompt": p} for p in prompts if p != "-"]
    f = prompts_file or cfg.generate.prompts_file
    if f:
        p = Path(f)
        if not p.is_file():
            raise DataError(f"--prompts-file: '{f}' not found")
        if p.suffix.lower() == ".jsonl":
            for i, rec in read_jsonl(p):
                if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                    out.append({"prompt": rec["prompt"]})
                elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    out.append({"messages": rec["messages"]})
                else:
                    raise DataError(f"{f}:{i}: expected an object with 'prompt' (text) or 'messages' (chat)")
        else:
            out += [{"prompt": line} for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out and not want_stdin:
        out += [{"prompt": p} for p in cfg.generate.prompts]
    if want_stdin or (not out and not sys.stdin.isatty()):
        out += [{"prompt": line} for line in sys.stdin.read().splitlines() if line.strip()]
    if not out:
        raise ConfigError("no prompts: pass --prompt TEXT, --prompts-file FILE, set generate.prompts, or pipe prompts on stdin")
    return out


def _guarded_streamer(tok, guard, stops=()):
    """The terminal stream (the inference core's incremental text, cut at the stop strings),
    printing only what the output rails release."""
    from llmctl.inference.detok import TextStream

    class GuardedStream(TextStream):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out = guard.feed(text)
            if stream_end:
                out += guard.finish()
            if out:
                sys.stdout.write(out)
                sys.stdout.flush()

    return GuardedStream(tok, stops)


def surprisal_text(text: str, logprobs: list[dict]):
    """The output as a rich Text, each token on a background as red as its surprisal
    (-logprob; 0 nats white, 8 or more red); text the tokens do not cover stays plain."""
    from rich.text import Text

    t = Text()
    covered = 0
    for r in logprobs:
        s = min(-r["logprob"] / 8.0, 1.0)
        g = int(255 * (1 - s))
        t.append(r["token"], style=f"black on #ff{g:02x}{g:02x}")
        covered += len(r["token"])
    t.append(text[covered:])
    return t


def surprisal_plain(logprobs: list[dict]) -> str:
    """One token a line for logs: token, logprob, entropy."""
    return "\n".join(f"{r['token']!r:<20} {r['logprob']:>8.3f} " + (f"{r['entropy']:>7.3f}" if r["entropy"] is not None else f"{'-':>7}")
                     for r in logprobs)


def run(cfg, rd: RunDir, *, force: bool = True, model: str | None = None, prompts: list[str] | None = None, prompts_file: str | None = None,
        logprobs: int | None = None, surprisal: bool = False, raw: bool = False, images: list[str] | None = None, **_) -> dict:
    import hashlib

    if (images or cfg.data.format == "image_text") and cfg.generate.engine == "llama.cpp":
        raise ConfigError("generate.engine llama.cpp decodes text models; an image-text model is generated with generate.engine: torch")
    if images or cfg.data.format == "image_text":  # images: llmctl/vision/generate.py
        from llmctl.vision.generate import run as with_images

        return with_images(cfg, rd, model=model or cfg.generate.model, prompts=list(prompts or []), images=list(images or []),
                           prompts_file=prompts_file, con=_console.current())

    from llmctl.modeling import load_for_inference, model_identity, resolve_model_path
    from llmctl.safety import AuditLog, Rails

    con = _console.current()
    g = cfg.generate
    explicit = model or g.model
    # Another model's outputs live in their own folder (RUN/generate-<model>), as eval's do: they
    # never stand in for the run's own generate stage, nor for `llmctl run`'s sample.
    stage = "generate-" + rd.other_eval_stage(explicit).removeprefix("eval-") if explicit else "generate"
    identity = model_identity(explicit) if explicit else None
    extra_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16] if identity else None
    outputs_path = rd.stage_dir(stage) / rd.outputs_path.name
    own = explicit or "train" in ((rd.manifest(stage) or {}).get("lineage") or {})
    if not force and not prompts and not prompts_file and own and rd.up_to_date(stage, cfg, extra_hash=extra_hash):
        con.info(f"generate: up to date in {rd.stage_dir(stage)}")
        return {**rd.manifest(stage)["headline"], "cached": True}
    items = _read_prompts(cfg, list(prompts or []), prompts_file)
    audit = AuditLog(None)  # written with the outputs, atomically
    rails = Rails(cfg.safety, stage="generate", audit=audit)
    sp = _sampling(cfg, logprobs, surprisal)
    gguf = None
    if g.engine == "llama.cpp":  # what it cannot do, no llama-server, no GGUF: refused before loading anything
        from llmctl.inference.llamacpp import gguf_to_run, require_server_binary

        require_server_binary("generate.engine")
        gguf = gguf_to_run(cfg, rd, explicit, g.quantize, "generate")
    path = resolve_model_path(explicit, rd, cfg, "generate", prefer_export=gguf is not None and not explicit)
    # With llama.cpp the GGUF carries the precision; the transformers model is the reference it is checked against.
    mdl, tok = load_for_inference(path, quantize=g.quantize if gguf is None else "none", quantize_key="generate.quantize")
    # A chat-trained model answers a user turn; raw text is a prompt it never saw in training.
    as_chat = any("prompt" in it for it in items) and plain_prompts_as_chat(cfg, tok, path, raw)
    if as_chat:
        con.info("generate: data.format is chat, so each plain prompt is sent as a user turn through the chat template (--raw sends the text as it is)")
    texts, refused = _render(items, tok, rails, as_chat, path)
    todo = [i for i in range(len(texts)) if i not in refused]
    stream = len(todo) == 1 and len(texts) == 1 and g.num_return_sequences == 1 and con.is_tty and not con.json_mode and not surprisal
    t0 = time.time()
    records = []
    with rd.begin(stage, cfg, inputs=[] if explicit else ["train"], extra_hash=extra_hash) as st:
        if identity:
            st.manifest["model"] = identity
        with _decoder(mdl, tok, gguf, g, len(todo) * sp.num_return_sequences) as decode_batch:
            if gguf is not None:
                del mdl  # the reference model, checked; not held in memory beside llama-server's copy
            results, decode_s = _decode(decode_batch, tok, texts, refused, sp, rails, stream, g.batch_size, con)
        for idx, choice, r in results:
            rec = _record(items[idx], texts[idx], idx, choice, r, audit.events)
            records.append(rec)
            _show(r, rec, surprisal, stream, con)
        atomic_write_text(outputs_path, "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(rd.audit_path(stage), "".join(json.dumps(e) + "\n" for e in audit.events))
        secs = time.time() - t0
        n_tok = sum(r["completion_tokens"] for r in records)
        head = {"prompts": len(texts), "outputs": len(records), "completion_tokens": n_tok,
                "tokens_per_s": round(n_tok / decode_s, 1) if decode_s > 0 else None, "decode_seconds": round(decode_s, 3), "seconds": round(secs, 2)}
        if audit.events:
            head["safety_interventions"] = len(audit.events)
        if g.quantize != "none":
            head["quantize"] = g.quantize
        if gguf is not None:
            head["engine"] = f"llama.cpp ({Path(gguf).name})"
        st.headline.update(head)
    if con.json_mode:
        return {**head, "model": path, "results": records}
    return {**head, "outputs_file": str(outputs_path)}


def _render(items: list[dict], tok, rails, as_chat: bool, path: str) -> tuple[list[str], dict[int, str]]:
    """(each prompt's text as the model gets it, after the input rails; prompt index -> the
    input rail that blocked it)."""
    from llmctl.safety import Blocked

    texts = []
    refused: dict[int, str] = {}
    for i, it in enumerate(items):
        try:
            if "messages" in it or as_chat:
                if not has_chat_template(tok):
                    raise ConfigError(f"{path}: the tokenizer has no chat template, so 'messages' prompts cannot be rendered; give plain 'prompt' text")
                msgs = it.get("messages") or user_turn(it["prompt"])
                msgs = [{**m, "content": rails.check_input(str(m.get("content") or ""), f"prompt-{i}")} for m in msgs]
                texts.append(render_chat(tok, msgs))
            else:
                texts.append(rails.check_input(it["prompt"], f"prompt-{i}"))
        except Blocked as b:
            refused[i] = b.rail
            texts.append(it.get("prompt") or "")
    return texts, refused


def _sampling(cfg, logprobs: int | None, surprisal: bool):
    from llmctl.generation import Sampling

    g = cfg.generate
    return Sampling(
        max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k,
        top_p=g.top_p, repetition_penalty=g.repetition_penalty, stop=tuple(g.stop),
        num_return_sequences=g.num_return_sequences, seed=g.seed if g.seed is not None else cfg.run.seed,
        logprobs=logprobs if logprobs is not None else (g.logprobs if g.logprobs is not None else (0 if surprisal else None)),
    )


@contextmanager
def _decoder(mdl, tok, gguf: str | None, g, sequences: int):
    """`decode_batch(texts, sp, streamer=None) -> [result]`: the torch model (`generation.generate_batch`),
    or, with a GGUF, a llama-server on it (llmctl/inference/llamacpp_generate.py), checked at
    start against the model's own forward (then the model is let go) and stopped at the end."""
    from llmctl.generation import generate_batch

    if gguf is None:
        yield lambda texts, sp, streamer=None: generate_batch(mdl, tok, texts, sp, streamer=streamer)
        return
    from llmctl.errors import LlmctlError
    from llmctl.inference.context import context_length
    from llmctl.inference.llamacpp import GGUF_TYPE, LlamaServer, disagreement
    from llmctl.inference.llamacpp_generate import generate_llamacpp

    ctx = context_length(mdl)
    eos = mdl.generation_config.eos_token_id if mdl.generation_config.eos_token_id is not None else tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    server = LlamaServer(gguf, max(1, min(g.batch_size, sequences)), ctx or 4096)
    server.start()
    try:
        why = disagreement(server, mdl, tok, GGUF_TYPE[g.quantize])
        if why:
            raise LlmctlError(f"generate.engine llama.cpp: {why}; not generating with it (set generate.engine: torch to generate with transformers)")
        mdl = None  # checked: llama.cpp holds the weights from here on (the caller lets go of its reference too)
        yield lambda texts, sp, streamer=None: generate_llamacpp(server, tok, texts, sp, eos_ids, ctx, streamer=streamer)
    finally:
        server.stop()


def _decode(decode_batch, tok, texts: list[str], refused: dict[int, str], sp, rails, stream: bool, batch_size: int, con) -> tuple[list, float]:
    """([(prompt index, choice, result)] in order, decode seconds: the decoding only, not
    loading, the decoder's build, rails or writing). Streamed to the terminal when `stream`."""
    from llmctl.safety import CONTENT_FILTER

    if stream:
        guard = rails.guard("prompt-0", choice=0)
        sys.stdout.write(texts[0])
        res = decode_batch(texts, sp, streamer=_guarded_streamer(tok, guard, sp.stop))
        sys.stdout.write("\n")
        # The terminal saw what the guard released; the record says the same.
        return [(0, 0, {**res[0], "text": guard.released, "raw_text": res[0]["text"], "finish_reason": CONTENT_FILTER if guard.blocked else res[0]["finish_reason"]})], res[0]["decode_seconds"]
    todo = [i for i in range(len(texts)) if i not in refused]
    n_seq = sp.num_return_sequences
    decode_s = 0.0
    results = []
    with con.progress("generating", total=len(todo), unit="prompts") as prog:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            res = decode_batch([texts[j] for j in batch], sp)
            decode_s += res[0]["decode_seconds"] if res else 0.0
            for k, r in enumerate(res):
                idx, choice = batch[k // n_seq], k % n_seq
                text, blocked = rails.check_output(r["text"], f"prompt-{idx}", choice=choice)
                results.append((idx, choice, {**r, "text": text, "raw_text": r["text"], "finish_reason": CONTENT_FILTER if blocked else r["finish_reason"]}))
            prog.update(advance=len(batch))
    for i, rail in refused.items():
        results.append((i, 0, {"text": "", "finish_reason": CONTENT_FILTER, "prompt_tokens": 0, "completion_tokens": 0}))
    results.sort(key=lambda x: x[:2])
    return results, decode_s


def _record(item: dict, text: str, idx: int, choice: int, r: dict, events: list[dict]) -> dict:
    """One line of outputs.jsonl."""
    rec = {"index": idx, **({"messages": item["messages"]} if "messages" in item else {}), "prompt": text, "output": r["text"], **{k: r[k] for k in ("prompt_tokens", "completion_tokens", "finish_reason")}}
    if "logprobs" in r and r["text"] == r.get("raw_text", r["text"]):
        rec["logprobs"] = r["logprobs"]  # not when a rail changed the text: the tokens would show it
    mine = [{k: e[k] for k in ("rail", "action", "kinds")} for e in events if e["request_id"] == f"prompt-{idx}" and e.get("choice", choice) == choice]
    if mine:
        rec["safety"] = mine
    return rec


def _show(r: dict, rec: dict, surprisal: bool, stream: bool, con) -> None:
    """An output on stdout (unless it streamed there, or --json): coloured by surprisal if asked."""
    if surprisal and not con.json_mode and "logprobs" in rec:
        if sys.stdout.isatty():
            from rich.console import Console

            Console().print(surprisal_text(r["text"], r["logprobs"]))
        else:
            sys.stdout.write(r["text"] + "\n" + surprisal_plain(r["logprobs"]) + "\n")
    elif not stream and not con.json_mode:
        sys.stdout.write(r["text"] + "\n")
