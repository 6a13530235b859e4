"""`llmctl prepare`: sources, formats, tokenizer, splits, caching, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import invoke_cli, sentences, tiny_config_dict, train_tiny_tokenizer, write_config

from llmctl.config import load_config
from llmctl.data.split import seeded_split
from llmctl.errors import StageInputError
from llmctl.rundir import RunDir
from llmctl.stages import prepare


def _cfg(tmp_path, data: dict, **sections):
    d = tiny_config_dict(tmp_path / "run", data=data, **sections)
    path = write_config(tmp_path / "c.yaml", d)
    return path, load_config(path)


def _text_files(tmp_path, n=40):
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(sentences(n, seed=3)) + "\n")
    return f


def test_text_packing_and_split(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    f = _text_files(tmp_path)
    path, cfg = _cfg(tmp_path, {"paths": [str(f)], "validation_fraction": 0.2, "block_size": 16})
    res = prepare.run(cfg, RunDir(cfg.run.dir))
    rd = RunDir(cfg.run.dir)
    ds = load_from_disk(str(rd.dataset_dir))
    assert set(ds) == {"train", "validation"}
    assert all(len(r) == 16 for r in ds["train"]["input_ids"])
    assert ds["train"]["input_ids"] == ds["train"]["labels"]
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    assert tok.pad_token == "<|pad|>" and tok.eos_token_id is not None
    stream = [t for row in ds["train"]["input_ids"] for t in row]
    assert tok.eos_token_id in stream  # documents joined with EOS
    stats = json.loads(rd.stats_path.read_text())
    tr = stats["splits"]["train"]
    assert tr["documents"] == 32 and stats["splits"]["validation"]["documents"] == 8
    assert tr["blocks"] * 16 + tr["dropped_tail_tokens"] == tr["tokens"] == res["train_tokens"]
    assert tr["bytes_per_token"] > 1


def test_split_is_deterministic_and_disjoint(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": f"document number {i} " * 3}) + "\n" for i in range(50)))
    path, cfg = _cfg(tmp_path, {"paths": [str(f)], "validation_fraction": 0.2, "test_fraction": 0.1})
    a = seeded_split([{"text": str(i)} for i in range(50)], cfg)
    b = seeded_split([{"text": str(i)} for i in range(50)], cfg)
    assert a == b
    sets = {k: {d["text"] for d in v} for k, v in a.items()}
    assert len(sets["validation"]) == 10 and len(sets["test"]) == 5 and len(sets["train"]) == 35
    assert not (sets["train"] & sets["validation"]) and not (sets["train"] & sets["test"]) and not (sets["validation"] & sets["test"])
    other = load_config(path, ["run.seed=1"])
    assert seeded_split([{"text": str(i)} for i in range(50)], other) != a


def test_prompt_completion_masks_prompt_and_appends_eos(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    f = tmp_path / "pairs.jsonl"
    recs = [{"q": f"question {s}", "a": f" answer {s}"} for s in sentences(30, seed=5)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    path, cfg = _cfg(tmp_path, {"paths": [str(f)], "format": "prompt_completion", "prompt_field": "q", "completion_field": "a", "validation_fraction": 0.2, "block_size": 256}, model={"context_length": 256})
    prepare.run(cfg, RunDir(cfg.run.dir))
    assert json.loads(RunDir(cfg.run.dir).stats_path.read_text())["splits"]["train"]["truncated_records"] == 0
    rd = RunDir(cfg.run.dir)
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    row = load_from_disk(str(rd.dataset_dir))["train"][0]
    ids, labels = row["input_ids"], row["labels"]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    n_masked = labels.index(next(x for x in labels if x != -100))
    assert n_masked > 0 and all(x == -100 for x in labels[:n_masked])
    assert tok.decode(ids[:n_masked]).startswith("question")
    assert tok.decode(ids[n_masked:-1]).startswith(" answer")
    pairs = load_from_disk(str(rd.pairs_dir))["validation"]
    assert len(pairs) == 6 and pairs[0]["prompt"].startswith("question") and pairs[0]["reference"].startswith(" answer")


def test_chat_labels_only_assistant_turns(tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    f = tmp_path / "chat.jsonl"
    rows = []
    for s in sentences(20, seed=7):
        rows.append({"messages": [{"role": "user", "content": "say " + s}, {"role": "assistant", "content": s}]})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, cfg = _cfg(tmp_path, {"paths": [str(f)], "format": "chat", "validation_fraction": 0.2, "block_size": 256}, model={"context_length": 256})
    prepare.run(cfg, RunDir(cfg.run.dir))
    rd = RunDir(cfg.run.dir)
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    assert tok.chat_template
    row = load_from_disk(str(rd.dataset_dir))["train"][0]
    learned = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    text = tok.decode(learned)
    assert "say" not in text and "<|user|>" not in text and text.endswith(tok.eos_token)
    pairs = load_from_disk(str(rd.pairs_dir))["validation"]
    assert pairs[0]["prompt"].endswith("<|assistant|>\n") and "say" in pairs[0]["prompt"]


def test_builtin_corpus_and_next_line_pairs(tmp_path):
    from datasets import load_from_disk

    path, cfg = _cfg(tmp_path, {"source": "builtin", "paths": [], "max_bytes": 300_000, "validation_fraction": 0.3})
    res = prepare.run(cfg, RunDir(cfg.run.dir))
    assert res["documents"] > 5 and res["pairs"] > 0
    pairs = load_from_disk(str(RunDir(cfg.run.dir).pairs_dir))["validation"]
    for p in pairs:  # preceding lines, then the first half of a line; the reference is the rest of it
        head = p["prompt"].splitlines()[-1].strip()
        assert "\n" in p["prompt"] and head and not p["prompt"].endswith(" ")
        assert len(head) <= len(p["reference"]) + 2  # the cut is at or before the line's middle
        assert p["reference"] and "\n" not in p["reference"] and p["reference"] == p["reference"].strip()


def test_next_line_pairs_come_from_code_lines():
    from llmctl.data.pairs import next_line_pairs

    src = (
        '"""Module docstring.\n\nreturn inside a docstring is not code.\n"""\n'
        "import os\n\n\n"
        "def load(path):\n"
        "    # return in a comment is not code either\n"
        "    with open(path) as f:\n"
        "        data = f.read().splitlines()\n"
        "    for name, value in sorted(data.items()):\n"
        "        print(name)\n"
        "    return [line.strip() for line in data]\n"
    )
    pairs = list(next_line_pairs(src, max_per_doc=10))
    # each line is cut at the last space at or before its middle (print(name) has none: no pair)
    assert [(p.splitlines()[-1].strip(), r) for p, r in pairs] == [
        ("def", "load(path):"), ("with", "open(path) as f:"), ("data =", "f.read().splitlines()"),
        ("for name, value in", "sorted(data.items()):"), ("return", "[line.strip() for line in data]"),
    ]
    lines = src.splitlines()
    for p, r in pairs:  # the prompt is the file up to the cut, as written; so is the line
        assert src.startswith(p) and p.splitlines()[-1] + " " + r in lines


def test_hub_code_path_on_local_dataset(tmp_path):
    import pandas as pd

    d = tmp_path / "hubdata"
    d.mkdir()
    pd.DataFrame({"content": sentences(30, seed=9)}).to_parquet(d / "train.parquet")
    path, cfg = _cfg(tmp_path, {"source": "hub", "paths": [], "hub_name": str(d), "text_field": "content"})
    res = prepare.run(cfg, RunDir(cfg.run.dir))
    assert res["documents"] == 30


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_structured_files(tmp_path, ext):
    import pandas as pd

    df = pd.DataFrame({"text": sentences(30, seed=11)})
    f = tmp_path / f"d.{ext}"
    if ext == "csv":
        df.to_csv(f, index=False)
    elif ext == "parquet":
        df.to_parquet(f)
    else:
        f.write_text(json.dumps(df.to_dict("records")))
    path, cfg = _cfg(tmp_path, {"paths": [str(tmp_path / f"*.{ext}")]})
    assert prepare.run(cfg, RunDir(cfg.run.dir))["documents"] == 30


def test_tokenizer_loaded_from_local_dir(tmp_path):
    from conftest import train_tiny_tokenizer
    from transformers import AutoTokenizer

    tokdir = tmp_path / "tok"
    train_tiny_tokenizer(sentences(50), tokdir)
    f = _text_files(tmp_path)
    path, cfg = _cfg(tmp_path, {"paths": [str(f)]}, tokenizer={"name_or_path": str(tokdir)})
    res = prepare.run(cfg, RunDir(cfg.run.dir))
    assert res["vocab_size"] == len(AutoTokenizer.from_pretrained(tokdir))
    assert AutoTokenizer.from_pretrained(RunDir(cfg.run.dir).tokenizer_dir).get_vocab() == AutoTokenizer.from_pretrained(tokdir).get_vocab()


def test_rerun_is_cached_and_force_redoes(tmp_path):
    f = _text_files(tmp_path)
    path, _ = _cfg(tmp_path, {"paths": [str(f)]})
    r1 = invoke_cli("prepare", str(path), "--json")
    assert r1.returncode == 0, r1.stderr
    r2 = invoke_cli("prepare", str(path), "--json")
    assert r2.returncode == 0 and json.loads(r2.stdout)["cached"] is True and "up to date" in r2.stderr
    f.write_text(f.read_text() + "\n\nbrand new paragraph of text here.\n")  # input changed: redo
    r3 = invoke_cli("prepare", str(path), "--json")
    assert "cached" not in json.loads(r3.stdout)
    r4 = invoke_cli("prepare", str(path), "--json", "--force")
    assert r4.returncode == 0 and "cached" not in json.loads(r4.stdout)


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda d: None, "not found"),
        (lambda d: (d / "x.jsonl").write_text('{"text": "ok"}\n{"text": broken\n'), "x.jsonl:2: malformed JSON"),
        (lambda d: (d / "x.jsonl").write_text('{"body": "no text field"}\n'), "x.jsonl:1: record has no field 'text' (fields: body)"),
        (lambda d: (d / "x.txt").write_bytes(b"fine line\n\nbad \xff\xfe bytes\n"), "x.txt:3: invalid UTF-8"),
        (lambda d: (d / "x.txt").write_text("   \n\n"), "corpus is empty"),
    ],
    ids=["missing", "malformed-jsonl", "missing-field", "invalid-utf8", "empty"],
)
def test_bad_input_exit_2_one_line(tmp_path, setup, needle):
    data = tmp_path / "data"
    data.mkdir()
    setup(data)
    name = next((p.name for p in data.iterdir()), "missing.txt")
    path, _ = _cfg(tmp_path, {"paths": [str(data / name)]})
    r = invoke_cli("prepare", str(path))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr  # one line, and it names the problem
    m = RunDir(tmp_path / "run").manifest("prepare")
    assert m is None or m["status"] != "complete"
    assert not (tmp_path / "run" / "prepare" / "dataset").exists()


def test_skip_counts_bad_records(tmp_path):
    f = tmp_path / "x.jsonl"
    good = [json.dumps({"text": s}) for s in sentences(20)]
    f.write_text("\n".join(good[:10] + ["{broken", '{"other": 1}'] + good[10:]) + "\n")
    path, cfg = _cfg(tmp_path, {"paths": [str(f)], "on_error": "skip", "validation_fraction": 0.3})
    res = prepare.run(cfg, RunDir(cfg.run.dir))
    assert res["skipped_records"] == 2 and res["documents"] == 20


def test_block_size_larger_than_pretrained_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    mdir = tmp_path / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)).save_pretrained(mdir)
    train_tiny_tokenizer(sentences(32), mdir)
    f = _text_files(tmp_path)
    path, _ = _cfg(tmp_path, {"paths": [str(f)], "block_size": 64}, model={"name_or_path": str(mdir)}, tokenizer={"name_or_path": str(mdir)})
    r = invoke_cli("prepare", str(path))
    assert r.returncode == 2 and "block_size (64) is larger than" in r.stderr and "32 positions" in r.stderr


def test_failure_midway_leaves_nothing_complete(tmp_path, monkeypatch):
    f = _text_files(tmp_path)
    path, cfg = _cfg(tmp_path, {"paths": [str(f)]})

    def boom(*a, **k):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(prepare, "_pairs", boom)
    with pytest.raises(RuntimeError):
        prepare.run(cfg, RunDir(cfg.run.dir))
    rd = RunDir(cfg.run.dir)
    assert rd.manifest("prepare")["status"] == "failed"
    assert not rd.dataset_dir.exists() and not rd.tokenizer_dir.exists()
    assert not [p for p in rd.stage_dir("prepare").iterdir() if p.name.startswith(".build")]
    with pytest.raises(StageInputError, match="is failed"):
        rd.require("prepare", cfg)


def test_csv_quoted_fields_keep_their_newlines(tmp_path):
    import csv

    from llmctl.data.sources import Counters, read_file
    from llmctl.errors import DataError

    texts = ["first line\nsecond line", 'a "quoted", comma, field', "crlf\r\ninside", "plain"]
    f = tmp_path / "d.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        for i, t in enumerate(texts):
            w.writerow([i, t])
    recs = list(read_file(f, "paragraph", "error", Counters()))
    assert [r["text"] for r, _ in recs] == texts
    assert [where.rsplit(":", 1)[1] for _, where in recs] == ["2", "4", "5", "7"]  # the line each record starts on
    f.write_text("id,text\n1,fine\n2,one,too many\n")
    with pytest.raises(DataError, match=r"d.csv:3: 3 fields where the header has 2"):
        list(read_file(f, "paragraph", "error", Counters()))
    c = Counters()
    assert [r["text"] for r, _ in read_file(f, "paragraph", "skip", c)] == ["fine"]


def test_hub_dataset_cache_outlives_the_build_folder(tmp_path, monkeypatch):
    import datasets
    import pandas as pd

    d = tmp_path / "hubdata"
    d.mkdir()
    pd.DataFrame({"content": sentences(30, seed=9)}).to_parquet(d / "train.parquet")
    seen = []
    real = datasets.load_dataset

    def spy(*a, **kw):
        seen.append(kw.get("cache_dir"))
        return real(*a, **{**kw, "cache_dir": str(tmp_path / "hf-cache")})

    monkeypatch.setattr(datasets, "load_dataset", spy)
    path, cfg = _cfg(tmp_path, {"source": "hub", "paths": [], "hub_name": str(d), "text_field": "content"})
    prepare.run(cfg, RunDir(cfg.run.dir))
    # datasets' own cache (HF_DATASETS_CACHE), not RUN/prepare/.build.tmp-*/ that is deleted after each run
    assert seen == [None]


def test_a_stage_that_fails_before_doing_anything_leaves_no_run_dir(tmp_path):
    from conftest import invoke_cli

    path, cfg = _cfg(tmp_path, {"paths": [str(tmp_path / "missing.txt")]})
    for args in (["prepare", str(path)], ["train", str(path)], ["eval", str(path)], ["export", str(path)], ["generate", str(path), "-p", "hi"]):
        r = invoke_cli(*args)
        assert r.returncode in (2, 3), (args, r.stderr)
        assert not (tmp_path / "run").exists(), args


def test_a_first_batch_of_pairs_all_dropped_does_not_fix_the_column_types(tmp_path):
    """The encoder's first batch (256 rows) holds only pairs whose completion alone does not fit:
    their rows are empty lists. Typed columns keep the cache file's type int64, so the pairs that
    fit after them are written (they failed with "Couldn't cast array of type int64 to null")."""
    from types import SimpleNamespace

    from datasets import Dataset, load_from_disk

    f = _text_files(tmp_path)
    _, cfg = _cfg(tmp_path, {"paths": [str(f)], "format": "prompt_completion", "block_size": 16}, model={"context_length": 16})
    tok = train_tiny_tokenizer(sentences(40, seed=3), tmp_path / "tok")
    long = " ".join(sentences(4, seed=1))
    docs = Dataset.from_list([{"prompt": "q", "completion": long}] * 256 + [{"prompt": "q", "completion": " a b"}] * 10)
    build = tmp_path / "build"
    (build / "cache").mkdir(parents=True)
    quiet = SimpleNamespace(warn=lambda *a: None, info=lambda *a: None)
    stats = prepare._encode_split("train", docs, tok, cfg.data, build, SimpleNamespace(update=lambda **k: None), quiet)
    assert stats["dropped_records"] == 256 and stats["examples"] == 10
    (build / "dataset" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    rows = load_from_disk(str(build / "dataset"))["train"]
    assert len(rows) == 10 and rows.features["input_ids"].feature.dtype == "int64"
