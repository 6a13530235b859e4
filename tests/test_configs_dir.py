"""Every ready-made experiment in configs/ validates and opens with its how-to comment."""

from __future__ import annotations

import pytest

from conftest import REPO, invoke_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "gpt2-finetune.yaml", "lora-sft.yaml", "ddp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    r = invoke_cli("config", "validate", str(path))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_purpose_and_command(path):
    head = path.read_text().splitlines()
    comments = [line for line in head[:6] if line.startswith("#")]
    assert comments, f"{path.name} must open with a comment saying what it is for"
    assert any("llmctl " in line or "make " in line for line in comments), f"{path.name}: say the command that runs it"
