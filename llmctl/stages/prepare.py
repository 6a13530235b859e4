"""`llmctl prepare`: raw data -> tokenizer + tokenized, split dataset in RUN/prepare.

Everything is built in a temporary folder and moved into place at the end; the manifest
says `complete` only after that, so a killed prepare never looks finished.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Iterator

from llmctl import console as _console
from llmctl.checks import builtin_format_problem
from llmctl.data.split import seeded_split
from llmctl.errors import ConfigError, DataError
from llmctl.rundir import RunDir, atomic_write_json, replace_path

SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- records
def _records(cfg, counters) -> tuple[Iterator[tuple[dict, str]], str]:
    """The raw records of the main source (streamed), and a fingerprint of the inputs.

    A hub dataset is cached where `datasets` keeps it (HF_DATASETS_CACHE, else
    ~/.cache/huggingface/datasets), not in the build folder: a re-run or --force must not
    download it again."""
    from llmctl.data import sources

    d = cfg.data
    if d.source == "builtin":
        files = sources.builtin_files(cfg.run.seed, d.max_bytes)
        return sources.iter_builtin(files, counters), sources.builtin_fingerprint(files)
    if d.source == "files":
        files = sources.expand_paths(d.paths)
        return sources.iter_files(files, d.txt_unit, d.on_error, counters), sources.fingerprint(files)
    recs = sources.iter_hub(d.hub_name, d.hub_config, d.hub_split)
    return recs, hashlib.sha256(f"{d.hub_name}|{d.hub_config}|{d.hub_split}".encode()).hexdigest()[:16]


def _explicit(paths: list[str], key: str, cfg, counters) -> tuple[Iterator[tuple[dict, str]], str]:
    from llmctl.data import sources

    files = sources.expand_paths(paths, key=key)
    return sources.iter_files(files, cfg.data.txt_unit, cfg.data.on_error, counters), sources.fingerprint(files)


def _normalise(recs, cfg, counters) -> Iterator[dict]:
    """Keep only the fields the format needs, checking they are there and well typed; `_id`
    says where each document came from (file:line), for the data report's examples."""
    d = cfg.data
    if d.format == "preference":
        yield from _preference_rows(recs, cfg, counters)
        return
    if d.format == "unpaired_preference":
        yield from _unpaired_rows(recs, cfg, counters)
        return
    for rec, where in recs:
        try:
            if d.format == "text":
                field = "text" if "text" in rec and d.source == "builtin" else d.text_field
                _need(rec, field, "data.text_field", where)
                text = rec[field]
                if not isinstance(text, str):
                    raise DataError(f"{where}: field '{field}' is {type(text).__name__}, expected text")
                if text.strip():
                    yield {"text": text, "_id": where}
            elif d.format == "prompt_completion":
                _need(rec, d.prompt_field, "data.prompt_field", where)
                _need(rec, d.completion_field, "data.completion_field", where)
                p, c = rec[d.prompt_field], rec[d.completion_field]
                if not isinstance(p, str) or not isinstance(c, str):
                    raise DataError(f"{where}: '{d.prompt_field}' and '{d.completion_field}' must be strings")
                yield {"prompt": p, "completion": c, "_id": where}
            else:
                _need(rec, d.messages_field, "data.messages_field", where)
                msgs = rec[d.messages_field]
                if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
                    raise DataError(f"{where}: '{d.messages_field}' must be a list of {{role, content}} objects")
                if not any(m["role"] == "assistant" for m in msgs):
                    raise DataError(f"{where}: conversation has no assistant turn to learn from")
                yield {"messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs], "_id": where}
        except DataError:
            if d.on_error == "skip":
                counters.skip("bad_record")
                continue
            raise


def _preference_rows(recs, cfg, counters) -> Iterator[dict]:
    """{prompt, chosen, rejected} pairs, checked like the other formats; a pair whose answers
    are equal teaches nothing and is dropped, counted as `chosen_equals_rejected`."""
    d = cfg.data
    form = None  # text or chat: one form per source, so the Arrow columns agree
    for rec, where in (_builtin_pairs(recs) if d.source == "builtin" else recs):
        try:
            for field, key in ((d.chosen_field, "data.chosen_field"), (d.rejected_field, "data.rejected_field")):
                _need(rec, field, key, where)
            this = "chat" if isinstance(rec[d.chosen_field], list) else "text"
            if form is not None and this != form:
                raise DataError(f"{where}: a {this} pair among {form} pairs: give every row the same form")
            form = this
            row = _chat_pair(rec, d, where) if this == "chat" else _text_pair(rec, d, where)
        except DataError:
            if d.on_error == "skip":
                counters.skip("bad_record")
                continue
            raise
        if row["chosen"].strip() == row["rejected"].strip():
            counters.skip("chosen_equals_rejected")
            continue
        yield {**row, "_id": where}


def _unpaired_rows(recs, cfg, counters) -> Iterator[dict]:
    """{prompt, completion, label} rows for kto; label true (desirable) or false, also as 1/0
    or the strings true/false (a CSV's cells)."""
    d = cfg.data
    labels = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # 1 == True, 0 == False
    for rec, where in recs:
        try:
            for field, key in ((d.prompt_field, "data.prompt_field"), (d.completion_field, "data.completion_field"), (d.label_field, "data.label_field")):
                _need(rec, field, key, where)
            p, c, lab = rec[d.prompt_field], rec[d.completion_field], rec[d.label_field]
            if not isinstance(p, str) or not isinstance(c, str):
                raise DataError(f"{where}: '{d.prompt_field}' and '{d.completion_field}' must be strings")
            key = lab.strip().lower() if isinstance(lab, str) else lab
            if isinstance(key, float) or key not in labels:
                raise DataError(f"{where}: '{d.label_field}' is {lab!r}: expected true (desirable) or false")
        except DataError:
            if d.on_error == "skip":
                counters.skip("bad_record")
                continue
            raise
        yield {"prompt": p, "completion": c, "label": labels[key], "_id": where}


def _text_pair(rec: dict, d, where: str) -> dict:
    _need(rec, d.prompt_field, "data.prompt_field", where)
    p, c, r = rec[d.prompt_field], rec[d.chosen_field], rec[d.rejected_field]
    if not all(isinstance(x, str) for x in (p, c, r)):
        raise DataError(f"{where}: '{d.prompt_field}', '{d.chosen_field}' and '{d.rejected_field}' must be strings")
    return {"prompt": p, "chosen": c, "rejected": r}


def _chat_pair(rec: dict, d, where: str) -> dict:
    """The chat form {chosen: messages, rejected: messages}: the turns both share are the
    prompt (`messages`, rendered with the chat template once the tokenizer exists); each
    side's one remaining turn, an assistant's, is its answer. `prompt` holds the shared
    turns' text for curation and the tokenizer."""
    sides = []
    for field in (d.chosen_field, d.rejected_field):
        msgs = rec[field]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
            raise DataError(f"{where}: '{field}' must be a list of {{role, content}} objects")
        sides.append([{"role": str(m["role"]), "content": str(m["content"])} for m in msgs])
    chosen, rejected = sides
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or len(chosen) != n + 1 or len(rejected) != n + 1 or chosen[n]["role"] != "assistant" or rejected[n]["role"] != "assistant":
        raise DataError(f"{where}: '{d.chosen_field}' and '{d.rejected_field}' must share every turn but a last assistant turn each")
    return {"prompt": "\n".join(m["content"] for m in chosen[:n]), "chosen": chosen[n]["content"], "rejected": rejected[n]["content"],
            "messages": chosen[:n]}


def _builtin_pairs(recs) -> Iterator[tuple[dict, str]]:
    """Pairs from the builtin corpus (the demo): the prompt is a line's context and first half,
    chosen its real continuation, rejected a line's continuation from the previous file. Not
    the same file's: its lines are in the prompt's context, and copying them is no mistake."""
    from llmctl.data.pairs import next_line_pairs

    before: list[str] = []
    for rec, where in recs:
        pairs = list(next_line_pairs(rec["text"]))
        if before:
            for i, (prompt, chosen) in enumerate(pairs):
                yield {"prompt": prompt, "chosen": chosen, "rejected": before[i % len(before)]}, f"{where}#{i}"
        before = [ref for _, ref in pairs] or before


def _to_arrow(rows: Iterator[dict], path: Path, chunk: int = 1000, schema=None):
    """Stream rows into an Arrow file and memory-map it: the corpus never sits in Python.

    Without a schema it is inferred from the first rows, and no rows gives None; with one,
    no rows gives an empty dataset.
    """
    import pyarrow as pa
    from datasets import Dataset

    from llmctl.data import arrowio

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = sink = None
    buf: list[dict] = []

    def open_writer(sch) -> None:
        nonlocal writer, sink, schema
        schema = sch
        sink = pa.OSFile(str(path), "wb")
        writer = pa.ipc.new_stream(sink, schema)

    def flush() -> None:
        nonlocal chunk
        if writer is None:
            open_writer(pa.RecordBatch.from_pylist(buf).schema)
        batch = pa.RecordBatch.from_pylist(buf, schema=schema)
        writer.write_batch(batch)
        buf.clear()
        # then batches of ~16 MB: opening the file reads each batch's header through a mapping,
        # which leaves 64 KB resident per header (2 MB batches: 3% of the corpus)
        chunk = max(chunk, min(100_000, (16 << 20) * batch.num_rows // max(batch.nbytes, 1)))

    if schema is not None:
        open_writer(schema)
    for row in rows:
        buf.append(row)
        if len(buf) >= chunk:
            flush()
    if buf:
        flush()
    if writer is None:
        return None
    writer.close()
    sink.close()
    ds = Dataset.from_file(str(path))
    arrowio.release([path])  # the headers' pages
    return ds


def _need(rec: dict, field: str, key: str, where: str) -> None:
    from llmctl.data.sources import check_field

    check_field(rec, field, key, where)


# --------------------------------------------------------------------------- checks
def _check_block_size(cfg) -> None:
    name = cfg.model.name_or_path
    if not name:
        return
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return  # train reports an unloadable model; prepare need not
    limit = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None)
    if limit and cfg.data.block_size > limit:
        raise ConfigError(
            f"data.block_size ({cfg.data.block_size}) is larger than {name} can take ({limit} positions): "
            f"set data.block_size <= {limit}"
        )


# --------------------------------------------------------------------------- the stage
def run(cfg, rd: RunDir, *, force: bool = False, **_) -> dict:
    con = _console.current()
    t0 = time.time()
    problem = builtin_format_problem(cfg)
    if problem:
        raise ConfigError(f"{cfg.source}: {problem}")
    _check_block_size(cfg)
    from llmctl.data.sources import Counters

    counters = Counters()
    build = rd.stage_dir("prepare") / f".build.tmp-{int(t0)}"
    # Reading records is cheap next to tokenizing; it gives the input fingerprint for caching.
    con.step(f"reading {cfg.data.source} data")
    if cfg.data.format == "image_text":  # images: llmctl/vision/prepare.py
        from llmctl.vision import prepare as vision

        read, extra_hash = vision.inputs(cfg, counters)
        make = lambda: vision.build(cfg, rd, read, counters, build, con)  # noqa: E731
    else:
        recs, extras, extra_hash = _inputs(cfg, counters)
        make = lambda: _build(cfg, rd, recs, extras, counters, build, con)  # noqa: E731
    if not force and rd.up_to_date("prepare", cfg, extra_hash=extra_hash):
        con.info(f"prepare: up to date in {rd.stage_dir('prepare')} (use --force to redo)")
        shutil.rmtree(build, ignore_errors=True)
        return {**rd.manifest("prepare")["headline"], "cached": True}

    with rd.begin("prepare", cfg, extra_hash=extra_hash) as st:
        build.mkdir(parents=True, exist_ok=True)
        try:
            headline = make()
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        _publish(rd, build, headline)
        headline["seconds"] = round(time.time() - t0, 1)
        st.headline.update(headline)
    return headline


def _inputs(cfg, counters) -> tuple[Iterator[tuple[dict, str]], dict, str]:
    """(records of the main source, {split: records} of explicit validation/test files, the
    hash of every input's fingerprint)."""
    recs, fp = _records(cfg, counters)
    extras = {}
    for split, paths, key in (("validation", cfg.data.validation_paths, "data.validation_paths"), ("test", cfg.data.test_paths, "data.test_paths")):
        if paths:
            extras[split], efp = _explicit(paths, key, cfg, counters)
            fp += efp
    return recs, extras, hashlib.sha256(fp.encode()).hexdigest()[:16]


def _publish(rd: RunDir, build: Path, headline: dict) -> None:
    """Move what the build made into RUN/prepare (an output this build did not make goes, so
    nothing stale stays), then write stats.json and report.json, taking both out of the headline."""
    for name in ("tokenizer", "dataset", "pairs"):
        src = build / name
        if src.exists():
            replace_path(src, rd.stage_dir("prepare") / name)
        elif (rd.stage_dir("prepare") / name).exists():
            shutil.rmtree(rd.stage_dir("prepare") / name)
    atomic_write_json(rd.stats_path, headline["stats"])
    report = headline.pop("report")
    if report is not None:
        atomic_write_json(rd.report_path, report)
    elif rd.report_path.exists():
        rd.report_path.unlink()
    shutil.rmtree(build, ignore_errors=True)
    headline.pop("stats")


def _build(cfg, rd: RunDir, recs, extras, counters, build: Path, con) -> dict:
    """Records -> split documents -> curated -> tokenizer -> tokenized dataset and held-out
    pairs, all under `build`; returns the headline (with `stats` and `report` for _publish)."""
    from datasets import disable_progress_bars

    disable_progress_bars()
    d = cfg.data
    splits = _read_splits(cfg, recs, extras, counters, build, con)
    splits, report = _curate(cfg, rd, splits, build, con)
    cf = _counterfactual(cfg, splits, con)
    tok = _tokenizer(cfg, splits["train"], build, con)
    stats: dict = {"format": d.format, "source": d.source, "block_size": d.block_size, "vocab_size": len(tok),
                   "skipped_records": counters.skipped, "skipped_reasons": counters.reasons, "splits": {}}
    _tokenize(cfg, splits, tok, build, con, stats)
    _save_pairs(cfg, tok, splits, build, stats)
    if cf is not None:  # the data report shows the term balance before and after; the copies are not curation's
        stats["counterfactual"] = cf
        if report is not None:
            report["counterfactual"] = cf
    if report is not None:
        from llmctl.data import curate

        curate.add_tokens(report, tok, d.format, {k: v["tokens"] for k, v in stats["splits"].items()})
        for line in curate.summary_lines(report):
            con.info(line)
    return _headline(stats, len(tok), counters, report)


def _counterfactual(cfg, splits: dict, con) -> dict | None:
    """data.curate.counterfactual: swapped copies of the training documents (llmctl.data.counterfactual)."""
    group = cfg.data.curate.counterfactual
    if not group:
        return None
    from llmctl.data.counterfactual import augment

    groups = cfg.data.curate.term_groups or {"female": [], "male": []}
    splits["train"], info = augment(splits["train"], cfg.data.format, group, groups)
    b, a = info["term_groups_before"]["groups"], info["term_groups_after"]["groups"]
    con.info(f"counterfactual ({group}): {info['documents_added']} documents added to train; per 10k words "
             + ", ".join(f"{g} {b[g]['per_10k_words']} -> {a[g]['per_10k_words']}" for g in b))
    return info


def _read_splits(cfg, recs, extras, counters, build: Path, con) -> dict:
    """The documents in Arrow files, split by run.seed; explicit validation/test files
    replace a held-out fraction."""
    d = cfg.data
    docs = _to_arrow(_normalise(recs, cfg, counters), build / "cache" / "raw.arrow")
    if docs is None:
        raise DataError(f"the corpus is empty: no usable {d.format} records in data ({d.source}) — check data.paths and the field names")
    splits = seeded_split(docs, cfg)
    for name, erecs in extras.items():
        splits[name] = _to_arrow(_normalise(erecs, cfg, counters), build / "cache" / f"raw-{name}.arrow")
        if splits[name] is None:
            raise DataError(f"data.{name}_paths: no usable records")
    con.info("documents: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items() if v is not None and len(v)))
    return splits


def _headline(stats: dict, vocab_size: int, counters, report: dict | None) -> dict:
    tr = stats["splits"]["train"]
    headline = {
        "documents": sum(s.get("documents", 0) for s in stats["splits"].values()),
        "train_tokens": tr["tokens"],
        "validation_tokens": stats["splits"].get("validation", {}).get("tokens", 0),
        "vocab_size": vocab_size,
        "bytes_per_token": tr["bytes_per_token"],
        "skipped_records": counters.skipped,
        "pairs": sum(stats.get("pairs", {}).values()),
        "stats": stats,
        "report": report,
    }
    if report is not None:
        headline["curated_out"] = sum(i["documents_before"] - i["documents_after"] for i in report["splits"].values())
    return headline


def _curate(cfg, rd: RunDir, splits: dict, build: Path, con) -> tuple[dict, dict | None]:
    """Dedup, leakage, filters and PII on the split documents (llmctl.data.curate).

    A split that curation empties is an error, and the report is written all the same: it
    says which filters removed what."""
    from llmctl.data import curate

    p = curate.plan(cfg.data)
    if not p.any:
        return splits, None
    con.step(f"curating ({p.content} source): " + ", ".join(
        s for s, on in (("language", p.language), ("quality", p.quality), (f"pii={p.pii}", p.pii != "off"),
                        ("exact dedup", p.exact_dedup), ("near dedup", p.near_dedup), ("leakage", p.leakage)) if on))
    t, cpu = time.time(), time.process_time()
    out, report = curate.curate(splits, cfg.data.format, p, cfg.run.seed, cfg.data.num_proc, build / "cache", con)
    report["seconds"] = round(time.time() - t, 2)
    report["cpu_seconds"] = round(time.process_time() - cpu, 2)  # this process; workers not counted
    for name, info in report["splits"].items():
        if info["documents_before"] and not info["documents_after"]:
            atomic_write_json(rd.report_path, {k: v for k, v in report.items() if not k.startswith("_")})
            raise DataError(f"{curate.emptied_message(name, info, cfg.data.curate)} (the curation report: {rd.report_path})")
    return {**splits, **out}, report


# --------------------------------------------------------------------------- tokenizer and tokens
def _tokenizer(cfg, train_docs, build: Path, con):
    """Load the configured tokenizer or train one on the (curated) training split; set its
    chat template; save it to build/tokenizer."""
    from llmctl.tokenizer import ensure_chat_template, load_tokenizer, train_tokenizer

    d = cfg.data
    chat = d.format == "chat" or (d.format == "preference" and "messages" in train_docs.column_names)
    if cfg.tokenizer.name_or_path:
        con.step(f"loading tokenizer {cfg.tokenizer.name_or_path}")
        tok = load_tokenizer(cfg.tokenizer.name_or_path, cfg.tokenizer.trust_remote_code)
    else:
        con.step(f"training a byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size}) on the training split")
        tok = train_tokenizer(_train_texts(train_docs, d.format, cfg.tokenizer.max_train_bytes), cfg, chat=chat, model_max_length=cfg.model.context_length if not cfg.model.name_or_path else None)
    if chat:
        ensure_chat_template(tok, cfg.tokenizer.chat_template)
    elif cfg.tokenizer.chat_template:
        tok.chat_template = cfg.tokenizer.chat_template
    tok.save_pretrained(build / "tokenizer")
    return tok


def _tokenize(cfg, splits: dict, tok, build: Path, con, stats: dict) -> None:
    """Each split as training examples in build/dataset (`datasets.save_to_disk`'s layout):
    packed blocks (text), encoded pairs and conversations, or preference pairs as text, written
    there as they are made; their numbers go into stats['splits']."""
    from llmctl.data import arrowio

    d = cfg.data
    names = [name for name in SPLITS if splits.get(name) is not None and len(splits[name])]
    for name in names:
        with con.progress(f"tokenizing {name}", total=len(splits[name]), unit="docs") as prog:
            if d.format == "text":
                stats["splits"][name] = _pack_split(name, splits[name], tok, d, build / "dataset" / name, prog)
            elif d.format in ("preference", "unpaired_preference"):
                stats["splits"][name] = _pair_split(name, splits[name], tok, build / "dataset" / name, prog)
            else:
                stats["splits"][name] = _encode_split(name, splits[name], tok, d, build, prog, con)
    if "validation" not in names:
        con.warn("no validation split (data.validation_fraction is 0): train cannot report validation loss")
    arrowio.write_dataset_dict(build / "dataset", names)


def _pack_split(name: str, texts, tok, d, folder: Path, prog) -> dict:
    """Text documents packed into data.block_size blocks (EOS between documents), written into
    `folder` as one split of the dataset as they are made (nothing mapped, nothing copied), and
    their stats."""
    from datasets import Features, List, Value

    from llmctl.data import arrowio, formats

    s = {"documents": 0, "bytes": 0, "tokens": 0, "kept_tokens": 0, "dropped_tokens": 0}
    features = Features({"input_ids": List(Value("int32")), "labels": List(Value("int64"))})
    out = arrowio.SplitWriter(folder, features)
    try:
        for blocks in formats.pack_blocks(_texts_with_progress(texts, prog), tok, d.block_size, tok.eos_token_id, s):
            out.write(formats.blocks_table(blocks))
    except BaseException:
        out.abort()  # the build folder goes with it
        raise
    n = out.close()
    prog.update(completed=len(texts))
    if n == 0:
        raise DataError(
            f"the {name} split has {s['tokens']} tokens, fewer than one block of data.block_size={d.block_size}: "
            "add data or lower data.block_size"
        )
    return {"documents": s["documents"], "tokens": s["tokens"], "blocks": n,
            "dropped_tail_tokens": s["dropped_tokens"], "bytes": s["bytes"],
            "bytes_per_token": round(s["bytes"] / max(s["tokens"], 1), 4)}


def _pair_split(name: str, docs, tok, folder: Path, prog) -> dict:
    """Preference pairs kept as text: the trainer (TRL) tokenizes them with the model's own
    rules and truncates to data.block_size. The chat form is rendered here: the prompt is the
    shared turns with the generation prompt, each answer its turn as the template writes it
    (end-of-turn included). Their sizes in tokens, for the stats.

    Read 1000 pairs at a time in the split's (shuffled) order, in place (`arrowio.RowReader`: the
    strings with `pread`, conversations through the mapping, its pages dropped after each batch),
    and written into `folder` as `save_to_disk` writes it (`SplitWriter`): no copy of the split
    (`flatten_indices`), and nothing of it left resident (issue #30)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Features, Value

    from llmctl.data import arrowio
    from llmctl.data.formats import render_chat_pair

    chat, label = "messages" in docs.column_names, "label" in docs.column_names
    texts = ["prompt", "completion"] if label else ["prompt", "chosen", "rejected"]
    extra = ["label"] if label else []
    features = Features({**{c: Value("string") for c in texts}, **{c: docs.features[c] for c in extra}})
    read = (["messages", "chosen", "rejected"] if chat else texts) + extra
    writer, reader = arrowio.SplitWriter(folder, features), arrowio.RowReader(docs, read)
    tokens = nbytes = done = 0
    try:
        for start in range(0, len(docs), 1000):
            batch = reader.batch(np.arange(start, min(start + 1000, len(docs))))
            if chat:
                pairs = [render_chat_pair(tok, m, c, r) for m, c, r in zip(batch["messages"], batch["chosen"], batch["rejected"])]
                batch = {**{c: [x[c] for x in pairs] for c in texts}, **{c: batch[c] for c in extra}}
            for col in texts:
                tokens += sum(map(len, tok(batch[col], add_special_tokens=False)["input_ids"]))
                nbytes += sum(len(t.encode("utf-8")) for t in batch[col])
            writer.write(pa.table({c: batch[c] for c in texts + extra}, schema=features.arrow_schema))
            done += len(batch[texts[0]])
            prog.update(completed=done)
        rows = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    return {"documents": rows, "examples": rows, "tokens": tokens, "bytes": nbytes,
            "bytes_per_token": round(nbytes / max(tokens, 1), 4)}


def _texts_with_progress(texts, prog) -> Iterator[str]:
    """The documents' texts in the split's order (a shuffle of the corpus's Arrow file), a batch
    at a time, read from the file without mapping it (llmctl.data.arrowio.texts)."""
    from llmctl.data import arrowio

    for i, batch in enumerate(arrowio.texts(texts, "text", batch_size=1000)):
        prog.update(completed=i * 1000)
        yield from batch


def _encode_split(name: str, docs, tok, d, build: Path, prog, con) -> dict:
    """Prompt/completion pairs or conversations encoded (labels on the completion or the
    assistant turns); examples that cannot fit are dropped and counted, and their stats.

    The encoded rows (a cache file) are read a batch at a time, their pages dropped after each, and
    the kept ones written into build/dataset/NAME as `save_to_disk` writes them (`SplitWriter`):
    the split is never resident, nor copied through a mapping (issue #30)."""
    from collections import Counter

    from datasets import Features, List, Value

    from llmctl.data import arrowio, formats

    fn = formats.encode_pairs if d.format == "prompt_completion" else formats.encode_chat
    # the encoder's columns, typed: a first batch whose rows are all dropped (empty lists) would
    # otherwise set the cache file's type to list<null>, and the next batch fails to cast into it
    ints = List(Value("int64"))
    encoded = Features({"input_ids": ints, "labels": ints, **{c: Value("int64") for c in ("_truncated", "_dropped", "_tokens", "_bytes")},
                        **({"_reason": Value("string")} if d.format == "chat" else {})})
    kwargs = {"tok": tok, "block_size": d.block_size} | ({"eos_id": tok.eos_token_id} if d.format == "prompt_completion" else {})
    # the documents in the split's order (through its indices, at random in the corpus file): their
    # pages dropped after every call, where a flatten_indices copy read them all through the mapping
    ds = docs.map(arrowio.Releasing(fn, arrowio.mapped_files(docs), every=1), batched=True, batch_size=256, fn_kwargs=kwargs,
                  remove_columns=docs.column_names, features=encoded, num_proc=d.num_proc if d.num_proc > 1 and len(docs) > 1000 else None,
                  cache_file_name=str(build / "cache" / f"{name}.arrow"))
    arrowio.release(arrowio.mapped_files(docs) + arrowio.mapped_files(ds))
    dropped = trunc = tokens = nbytes = 0
    reasons: Counter = Counter()
    out = arrowio.SplitWriter(build / "dataset" / name, Features({k: ds.features[k] for k in ("input_ids", "labels")}))
    try:
        for batch in arrowio.batches(ds.with_format("arrow"), batch_size=1000):
            drop = batch.column("_dropped").to_pylist()
            dropped += sum(drop)
            trunc += sum(batch.column("_truncated").to_pylist())
            tokens += sum(batch.column("_tokens").to_pylist())
            nbytes += sum(batch.column("_bytes").to_pylist())
            if "_reason" in batch.column_names:
                reasons.update(r for r in batch.column("_reason").to_pylist() if r)
            out.write(batch.select(["input_ids", "labels"]).filter([x == 0 for x in drop]))
    except BaseException:
        out.abort()  # the build folder goes with it
        raise
    kept = out.close()
    why = _drop_reasons(d.format, dropped, reasons)
    prog.update(completed=len(docs))
    what = "conversations" if d.format == "chat" else "pairs"
    if kept == 0:
        raise DataError(f"the {name} split has no usable example: all {len(docs)} {what} dropped: " + "; ".join(f"{n} because {r}" for r, n in why.items()))
    if dropped:
        con.warn(f"{name}: dropped {dropped} of {len(docs)} {what}: " + "; ".join(f"{n} because {r}" for r, n in why.items()))
    if trunc:
        con.info(f"{name}: {trunc} of {len(docs)} {what} cut from the left to fit data.block_size={d.block_size}"
                 + (" (earliest turns first; the last assistant turn is kept whole)" if d.format == "chat" else " (the prompt's start)"))
    return {"documents": len(docs), "examples": kept, "tokens": tokens,
            "dropped_records": dropped, "dropped_reasons": why, "truncated_records": trunc, "bytes": nbytes,
            "bytes_per_token": round(nbytes / max(tokens, 1), 4)}


def _drop_reasons(fmt: str, dropped: int, reasons) -> dict[str, int]:
    """{reason in words: rows} for the rows a format's encoder dropped (`reasons`: the chat
    encoder's `_reason` counts, in the order they first occur)."""
    from llmctl.data.formats import CHAT_DROP_REASONS

    if fmt == "chat":
        return {CHAT_DROP_REASONS.get(r, r): n for r, n in reasons.items()}
    return {"the completion alone does not fit in data.block_size (raise it)": dropped} if dropped else {}


def _train_texts(docs, fmt: str, max_bytes: int | None) -> Iterator[str]:
    from llmctl.data import arrowio

    total = 0
    if fmt == "text" and hasattr(docs, "iter"):
        for batch in arrowio.texts(docs, "text"):
            for text in batch:
                yield text
                total += len(text)
                if max_bytes and total >= max_bytes:
                    return
        return
    for doc in _rows(docs):
        if fmt == "text":
            text = doc["text"]
        elif fmt in ("prompt_completion", "unpaired_preference"):
            text = doc["prompt"] + doc["completion"]
        elif fmt == "preference":
            text = doc["prompt"] + doc["chosen"] + doc["rejected"]
        else:
            text = "\n".join(m["content"] for m in doc["messages"])
        yield text
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def _rows(ds) -> Iterator[dict]:
    """Rows of an Arrow dataset, read a batch at a time."""
    from llmctl.data import arrowio

    if not hasattr(ds, "iter"):
        yield from ds
        return
    for batch in arrowio.batches(ds, batch_size=1000):
        keys = list(batch)
        for i in range(len(batch[keys[0]])):
            yield {k: batch[k][i] for k in keys}


# --------------------------------------------------------------------------- held-out pairs
def _save_pairs(cfg, tok, splits: dict, build: Path, stats: dict) -> None:
    """Held-out prompt/reference pairs for BLEU, in build/pairs."""
    from datasets import Dataset, DatasetDict

    pairs = _pairs(cfg, tok, splits)
    if pairs:
        DatasetDict({k: Dataset.from_dict(v) for k, v in pairs.items()}).save_to_disk(str(build / "pairs"))
        stats["pairs"] = {k: len(v["prompt"]) for k, v in pairs.items()}


def _pairs(cfg, tok, splits) -> dict[str, dict[str, list[str]]]:
    from llmctl.data.pairs import next_line_pairs

    d = cfg.data
    out: dict[str, dict[str, list[str]]] = {}
    for name in ("validation", "test"):
        docs = splits.get(name)
        if docs is None or len(docs) == 0:
            continue
        docs = _rows(docs)
        prompts, refs = [], []
        if d.format == "text" and d.source == "builtin":
            for doc in docs:
                for p, r in next_line_pairs(doc["text"]):
                    prompts.append(p)
                    refs.append(r)
        elif d.format == "prompt_completion":
            for doc in docs:
                prompts.append(doc["prompt"])
                refs.append(doc["completion"])
        elif d.format == "preference":
            # BLEU of the chosen answers: whether preference tuning kept (or bought) the ability to write them
            eos = tok.eos_token or ""
            for doc in docs:
                chat = doc.get("messages")
                prompts.append(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) if chat else doc["prompt"])
                refs.append(doc["chosen"].removesuffix(eos) if eos else doc["chosen"])
        elif d.format == "chat":
            for doc in docs:
                msgs = doc["messages"]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                prompts.append(tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True))
                refs.append(msgs[last]["content"])
        if prompts:
            out[name] = {"prompt": prompts, "reference": refs}
    return out
