"""Preference training: data.format=preference, train.method dpo/orpo/simpo, the preference eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import invoke_cli, tiny_config_dict, write_config

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def write_pairs(path: Path, n: int = 40, extra: list[dict] | None = None) -> Path:
    """Pairs whose chosen answer repeats the prompt's word and whose rejected answer is noise."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append({"prompt": f"say {w} {i}:", "chosen": f" {w} {w} {w}", "rejected": f" zz qq {i % 3}"})
    rows += extra or []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_config(tmp_path: Path, train: dict | None = None, data: dict | None = None, **sections) -> Path:
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = tiny_config_dict(tmp_path / "run", **sections)
    cfg["data"].update({"paths": [str(pairs)], "format": "preference", "validation_fraction": 0.2, "block_size": 48}, **(data or {}))
    cfg["train"].update({"method": "dpo", "lr": 5e-3, "eval_every": 100, "save_every": 100}, **(train or {}))
    return write_config(tmp_path / "cfg.yaml", cfg)


# --------------------------------------------------------------------------- data
def test_prepare_writes_pairs_and_drops_equal_answers(tmp_path):
    from datasets import load_from_disk

    extra = [{"prompt": "same", "chosen": "x", "rejected": "x"}, {"prompt": "same2", "chosen": " y ", "rejected": "y"}]
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=20, extra=extra)
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(pairs)], "format": "preference", "validation_fraction": 0.2})
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode == 0, r.stderr
    ds = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))
    assert set(ds) == {"train", "validation"}
    assert len(ds["train"]) + len(ds["validation"]) == 20
    assert ds["train"].column_names == ["prompt", "chosen", "rejected"]
    stats = json.loads((tmp_path / "run" / "prepare" / "stats.json").read_text())
    assert stats["format"] == "preference"
    assert stats["skipped_reasons"] == {"chosen_equals_rejected": 2}
    assert stats["splits"]["train"]["examples"] == len(ds["train"]) and stats["splits"]["train"]["tokens"] > 0


def test_missing_field_names_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a", "good": "b", "rejected": "c"}) + "\n")
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(p)], "format": "preference"})
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode != 0
    assert "pairs.jsonl:2" in r.stderr and "chosen" in r.stderr and "data.chosen_field" in r.stderr


def test_field_names_configurable_and_dedup_on_the_pair(tmp_path):
    from datasets import load_from_disk

    rows = [{"q": f"q{i % 5}", "good": "yes", "bad": f"no{i % 5}"} for i in range(20)]  # 5 distinct pairs, each 4 times
    rows += [{"q": "q0", "good": "yes", "bad": "other"}]  # same prompt and chosen, another rejected: a new pair
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config_dict(tmp_path / "run")
    cfg["data"].update({"paths": [str(p)], "format": "preference", "prompt_field": "q", "chosen_field": "good", "rejected_field": "bad",
                        "validation_fraction": 0.0, "curate": {"enabled": True, "near_dedup": {"enabled": False}}})
    cfg["train"]["method"] = "dpo"
    r = invoke_cli("prepare", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert r.returncode == 0, r.stderr
    ds = load_from_disk(str(tmp_path / "run" / "prepare" / "dataset"))
    assert len(ds["train"]) == 6
    report = json.loads((tmp_path / "run" / "prepare" / "report.json").read_text())
    assert not report["plan"].get("quality") and not report["plan"].get("language")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("train, data, words", [
    ({"method": "orpo", "loss_type": "ipo"}, {}, ["train.loss_type", "orpo"]),
    ({"method": "dpo", "simpo_gamma": 0.5}, {}, ["train.simpo_gamma", "dpo"]),
    ({"method": "sft", "beta": 0.1}, {"format": "text"}, ["train.beta", "sft"]),
    ({"method": "kto"}, {}, ["kto", "not built"]),
    ({"method": "dpo"}, {"format": "text"}, ["data.format=text", "preference"]),
])
def test_wrong_key_for_method_is_exit_2(tmp_path, train, data, words):
    r = invoke_cli("config", "validate", str(pref_config(tmp_path, train=train, data=data)))
    assert r.returncode == 2, r.stdout + r.stderr
    for w in words:
        assert w in r.stderr + r.stdout
