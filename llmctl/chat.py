"""Chat prompts: when a plain prompt goes through the model's chat template, and how it is rendered.

One rule for the stages that prompt a model with text from the user (generate, explain): on a
chat run (`data.format: chat`) a plain prompt is a user turn, rendered by the tokenizer's chat
template with the assistant's turn opened, because that is what the model saw in training.
`--raw` opts out and sends the text as it is.
"""

from __future__ import annotations

from llmctl.errors import ConfigError


def plain_prompts_as_chat(cfg, tok, model_path: str, raw: bool = False) -> bool:
    """True when plain prompts go through the chat template: a chat run, unless `raw`.

    A chat run whose tokenizer has no template is a ConfigError that names the way out."""
    if cfg.data.format != "chat" or raw:
        return False
    if not has_chat_template(tok):
        raise ConfigError(f"{model_path}: data.format is chat but the tokenizer has no chat template; pass --raw to send prompts as they are")
    return True


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def render_chat(tok, messages: list[dict]) -> str:
    """The conversation as text, ending with the opened assistant turn the model answers in."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def user_turn(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]
