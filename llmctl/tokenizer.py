"""Load an existing tokenizer or train a byte-level BPE; pad and EOS handled explicitly."""

from __future__ import annotations

from typing import Iterable

from llmctl.errors import ConfigError, StageInputError

# Assistant turns sit inside {% generation %} so `return_assistant_tokens_mask` marks them;
# EOS is inside the block so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


# ---- the BOS rule: one place decides, for training data, generate, eval and serve ----------------
def wants_bos(tok) -> bool:
    """Whether the model sees BOS first: exactly when the tokenizer itself prepends it
    (`tok(text)` with special tokens starts with bos_token_id where the plain encoding does
    not). A hub Llama or Mistral does (add_bos_token), and llama.cpp (the GGUF's
    add_bos_token, written by the same test) and vLLM then add it too; llmctl's trained
    tokenizers do not (documents are separated by EOS). Asked of the tokenizer's behaviour,
    not its `add_bos_token` attribute: transformers 5 keeps the rule in the post-processor
    of tokenizer.json and reloads the attribute as False."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    full = tok("a")["input_ids"]
    return len(full) > len(tok("a", add_special_tokens=False)["input_ids"]) and full[0] == bos


def with_bos(tok, ids, want: bool | None = None) -> list[int]:
    """Token ids encoded without special tokens (a prompt, a document, a rendered chat) as the
    model sees them: BOS first when `wants_bos` (pass `want` to ask once for many), never
    twice (a chat template may write it)."""
    ids = list(ids)
    if (wants_bos(tok) if want is None else want) and (not ids or ids[0] != tok.bos_token_id):
        return [tok.bos_token_id] + ids
    return ids


def score_prefix(tok) -> int | None:
    """The token the first token of a text is scored after (eval's perplexity, serve's echo
    logprobs), as lm-eval does: BOS, which a `wants_bos` tokenizer puts there anyway, else EOS.
    llmctl's trained tokenizers have a BOS they never add, and keep it here so that eval
    numbers stay comparable with earlier runs."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageInputError(f"tokenizer.name_or_path: cannot load '{name_or_path}': {first}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer.name_or_path: '{name_or_path}' has no fast tokenizer; llmctl needs a tokenizers-backed one")
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer.name_or_path: '{name_or_path}' has no EOS token; documents cannot be separated")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # explicit: padding positions are masked out of the loss
    return tok


def train_tokenizer(texts: Iterable[str], cfg, chat: bool = False, model_max_length: int | None = None):
    """Byte-level BPE trained on `texts` (the training split only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = cfg.tokenizer
    specials = [t.eos_token, t.bos_token, t.pad_token]
    extras = list(t.extra_special_tokens)
    if chat:
        extras += [r for r in CHAT_ROLE_TOKENS if r not in extras]
    specials += [s for s in extras if s not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=t.vocab_size,
        min_frequency=t.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=t.eos_token,
        bos_token=t.bos_token,
        pad_token=t.pad_token,
        add_bos_token=False,  # documents are separated by EOS; prompts start bare (see wants_bos)
        extra_special_tokens=extras or None,
        model_max_length=model_max_length or int(1e30),
    )
    return fast


def ensure_chat_template(tok, template: str | None) -> None:
    if template:
        tok.chat_template = template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
