"""The schema: defaults, unknown keys with suggestions, types, overrides, cross-field checks."""

from __future__ import annotations

import pytest

from conftest import invoke_cli, write_config
from llmctl.config import Config, config_doc, config_to_yaml, load_config
from llmctl.errors import ConfigError


def test_defaults_fill_every_section(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"run": {"name": "x"}}))
    assert cfg.run.name == "x"
    assert cfg.data.source == "builtin" and cfg.model.arch == "llama" and cfg.serve.host == "127.0.0.1"
    # the resolved config round-trips through YAML
    again = load_config(write_config(tmp_path / "d.yaml", __import__("yaml").safe_load(config_to_yaml(cfg))))
    assert again.model_dump() == cfg.model_dump()


def test_empty_file_is_all_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p).model_dump() == Config().model_dump()


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: x\ntrain:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:4" in msg and "train.max_step" in msg and "did you mean 'train.max_steps'" in msg


def test_unknown_section_suggests_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tokeniser:\n  vocab_size: 100\n")
    with pytest.raises(ConfigError, match="did you mean 'tokenizer'"):
        load_config(p)


def test_wrong_type_names_key_and_value(tmp_path):
    p = write_config(tmp_path / "c.yaml", {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.lr" in str(e.value) and "'fast'" in str(e.value)


def test_override_is_parsed_as_yaml_and_validated(tmp_path):
    p = write_config(tmp_path / "c.yaml", {})
    cfg = load_config(p, ["train.lr=1e-3", "data.paths=[a.txt, b.txt]", "data.source=files", "train.max_time=1h"])
    assert cfg.train.lr == 1e-3 and cfg.data.paths == ["a.txt", "b.txt"] and cfg.train.max_time == "1h"
    with pytest.raises(ConfigError, match=r"--set train.lrr.*did you mean 'train.lr'"):
        load_config(p, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["train.lr"])


def test_cross_field_checks(tmp_path):
    p = write_config(tmp_path / "c.yaml", {"data": {"block_size": 1024}, "model": {"context_length": 512}})
    with pytest.raises(ConfigError, match="data.block_size .* model.context_length"):
        load_config(p)
    with pytest.raises(ConfigError, match="data.paths is empty"):
        load_config(write_config(tmp_path / "d.yaml", {"data": {"source": "files"}}))
    with pytest.raises(ConfigError, match="divisible"):
        load_config(write_config(tmp_path / "e.yaml", {"model": {"hidden_size": 30, "n_heads": 4}}))


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_section_hash_tracks_only_its_sections(tmp_path):
    a = load_config(write_config(tmp_path / "a.yaml", {}))
    b = load_config(write_config(tmp_path / "b.yaml", {"train": {"lr": 1.0}}))
    assert a.section_hash("data", "tokenizer") == b.section_hash("data", "tokenizer")
    assert a.section_hash("train") != b.section_hash("train")


def test_doc_lists_every_section_key():
    doc = config_doc()
    for key in ("run.name", "data.block_size", "model.lora.r", "train.max_time", "eval.thresholds.bleu_min", "serve.api_key"):
        assert f"`{key}`" in doc


def test_cli_config_show_and_validate(tmp_path):
    p = write_config(tmp_path / "c.yaml", {"run": {"name": "zz"}})
    r = invoke_cli("config", "show", str(p), "--set", "train.lr=0.5")
    assert r.returncode == 0 and "name: zz" in r.stdout and "lr: 0.5" in r.stdout
    r = invoke_cli("config", "validate", str(p))
    assert r.returncode == 0
    r = invoke_cli("config", "validate", str(p), "--set", "model.archh=gpt2")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "did you mean 'model.arch'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_validate_catches_a_bad_duration(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: x\ntrain:\n  max_time: 3 fortnights\n")
    r = invoke_cli("config", "validate", str(p))
    assert r.returncode == 2 and f"{p}:4: train.max_time: cannot read '3 fortnights'" in r.stderr and "'1h30m'" in r.stderr
    for ok in ("90s", "1h30m", 3600, "45m"):
        assert load_config(None, [f"train.max_time={ok}"])
    with pytest.raises(ConfigError, match="--set train.max_time"):
        load_config(None, ["train.max_time=soon"])


def test_duplicate_keys_name_both_lines(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.1\n  max_steps: 10\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:4: duplicate key 'train.lr' (first at line 2)" in str(e.value)
    p.write_text("train:\n  lr: 0.1\nmodel:\n  n_layers: 2\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r":5: duplicate key 'train' \(first at line 1\)"):
        load_config(p)


@pytest.mark.parametrize(
    "line, message",
    [
        ("train:\n  max_steps: true", "train.max_steps: expected a number, not true/false"),
        ("train:\n  keep_best: 1", "train.keep_best: expected true or false"),
        ("train:\n  save_every: '100'", "train.save_every: expected a whole number, not a quoted string"),
        ("train:\n  warmup_steps: 2.5", "train.warmup_steps: expected a whole number"),
        ("model:\n  lora:\n    enabled: 'yes'", "model.lora.enabled: expected true or false"),
        ("run:\n  seed: false", "run.seed: expected a number"),
    ],
)
def test_booleans_and_integers_are_strict(tmp_path, line, message):
    p = tmp_path / "c.yaml"
    p.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_numbers_stay_numbers(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", {"train": {"lr": 1, "max_steps": 10.0}, "model": {"dropout": 0}}))
    assert cfg.train.lr == 1.0 and cfg.train.max_steps == 10 and cfg.model.dropout == 0.0
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 reads 3e-4 as text


def test_export_format_the_architecture_cannot_take_is_refused_before_any_work(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import sentences, tiny_config_dict, train_tiny_tokenizer

    # From scratch: model.arch decides.
    d = tiny_config_dict(tmp_path / "run", model={"arch": "gpt2"}, export={"formats": ["hf", "gguf"]})
    p = write_config(tmp_path / "c.yaml", d)
    for cmd in (("config", "validate"), ("prepare",), ("train",), ("export",)):
        r = invoke_cli(*cmd, str(p))
        assert r.returncode == 2, (cmd, r.stderr)
        assert "export.formats has gguf" in r.stderr and "model.arch is 'gpt2'" in r.stderr and "drop gguf" in r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started
    r = invoke_cli("config", "validate", str(p), "--set", "model.arch=llama")
    assert r.returncode == 0, r.stderr

    # A pretrained model: its config.json decides.
    mdir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(mdir)
    train_tiny_tokenizer(sentences(32), mdir)
    d = tiny_config_dict(tmp_path / "run2", model={"name_or_path": str(mdir)}, tokenizer={"name_or_path": str(mdir)}, export={"formats": ["gguf"]})
    r = invoke_cli("config", "validate", str(write_config(tmp_path / "p.yaml", d)))
    assert r.returncode == 2 and f"model.name_or_path ({mdir}) is 'gpt2'" in r.stderr
