"""llmctl.chat: the one rule generate and explain share for plain prompts on a chat run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import train_tiny_tokenizer
from llmctl.chat import plain_prompts_as_chat, render_chat, user_turn
from llmctl.errors import ConfigError
from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE


def _cfg(fmt: str):
    return SimpleNamespace(data=SimpleNamespace(format=fmt))


def test_plain_prompts_go_through_the_template_on_a_chat_run_unless_raw(tmp_path):
    tok = train_tiny_tokenizer(["the quick brown fox"], tmp_path, vocab_size=280)
    assert plain_prompts_as_chat(_cfg("text"), tok, "m") is False  # no template needed off a chat run
    with pytest.raises(ConfigError, match="--raw"):
        plain_prompts_as_chat(_cfg("chat"), tok, "m")
    assert plain_prompts_as_chat(_cfg("chat"), tok, "m", raw=True) is False
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    assert plain_prompts_as_chat(_cfg("chat"), tok, "m") is True
    assert render_chat(tok, user_turn("hi")) == "<|user|>\nhi\n<|assistant|>\n"  # the assistant's turn is opened
