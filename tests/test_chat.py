"""Chat fine-tuning of hub-style models: templates without `{% generation %}` markers.

The tiny model and tokenizer here mimic Qwen2.5-Instruct (ChatML turns, `<|im_end|>` as
EOS, a default system prompt, no generation markers), built and saved locally.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, invoke_cli, sentences
from llmctl.data import formats
from llmctl.rundir import RunDir

# Qwen2.5-Instruct's template without the tool-calling branches: no generation markers.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ANSWER = "the quick brown fox jumps."


def qwen_style_tokenizer(out_dir: Path | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = sentences(200, seed=5) + ["system user assistant You are a helpful assistant.", ANSWER]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def tiny_qwen2(out_dir: Path):
    """A random 1-layer qwen2 with grouped-query attention, saved like a hub model."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = qwen_style_tokenizer(out_dir)
    torch.manual_seed(0)
    mc = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, eos_token_id=tok.eos_token_id, initializer_range=0.3,
                     pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(mc).save_pretrained(out_dir)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return tok


def _learned(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != formats.IGNORE])


def test_assistant_turns_found_without_generation_markers():
    tok = qwen_style_tokenizer()
    msgs = [{"role": "user", "content": "say one"}, {"role": "assistant", "content": "one."},
            {"role": "user", "content": "say two"}, {"role": "assistant", "content": "two."}]
    out = formats.encode_chat({"messages": [msgs]}, tok, block_size=256)
    assert out["_dropped"] == [0]
    learned = _learned(tok, out["input_ids"][0], out["labels"][0])
    # Both turns and their end-of-turn tokens, nothing of the prompt.
    assert learned == "one.<|im_end|>\ntwo.<|im_end|>\n"
    assert tok.decode(out["input_ids"][0]) == tok.apply_chat_template(msgs, tokenize=False)


def test_long_chats_lose_earliest_turns_not_the_last_answer():
    tok = qwen_style_tokenizer()
    s = sentences(6, seed=2, length=(12, 14))
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(3):
        msgs += [{"role": "user", "content": s[2 * i]}, {"role": "assistant", "content": s[2 * i + 1]}]
    def n_tokens(m):
        return len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])

    full, last_exchange = n_tokens(msgs), n_tokens([msgs[0]] + msgs[-2:])
    out = formats.encode_chat({"messages": [msgs]}, tok, block_size=last_exchange + 2)
    assert full > last_exchange + 2 and out["_dropped"] == [0] and out["_truncated"] == [1]
    text = tok.decode(out["input_ids"][0])
    assert text.startswith("<|im_start|>system\nbe brief") and s[0] not in text
    assert text.endswith(s[5] + "<|im_end|>\n")
    assert _learned(tok, out["input_ids"][0], out["labels"][0]) == s[5] + "<|im_end|>\n"

    # Cut inside the last exchange: its start goes, the answer and its end stay.
    out = formats.encode_chat({"messages": [msgs]}, tok, block_size=last_exchange - 4)
    assert out["_truncated"] == [1] and len(out["input_ids"][0]) == last_exchange - 4
    assert _learned(tok, out["input_ids"][0], out["labels"][0]) == s[5] + "<|im_end|>\n"

    # The answer alone does not fit: dropped, and why.
    out = formats.encode_chat({"messages": [msgs]}, tok, block_size=8)
    assert out["_dropped"] == [1] and out["_reason"] == ["too_long"]


def _chats(path: Path, n: int = 48) -> None:
    rows = []
    for i, s in enumerate(sentences(n, seed=9)):
        msgs = [{"role": "user", "content": s}, {"role": "assistant", "content": ANSWER}]
        if i % 4 == 0:
            msgs = [{"role": "system", "content": "answer with the fox"}] + msgs
        rows.append({"messages": msgs})
    rows.append({"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": " ".join(sentences(20, seed=1))}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lora_sft_config(tmp_path: Path) -> Path:
    """configs/lora-sft.yaml with the hub model swapped for a local tiny one."""
    tiny_qwen2(tmp_path / "base")
    _chats(tmp_path / "chats.jsonl")
    d = yaml.safe_load((REPO / "configs" / "lora-sft.yaml").read_text())
    d["run"] = {"name": "sft", "dir": str(tmp_path / "run"), "seed": 0}
    d["data"].update(paths=[str(tmp_path / "chats.jsonl")], block_size=64, validation_fraction=0.1)
    d["tokenizer"]["name_or_path"] = d["model"]["name_or_path"] = str(tmp_path / "base")
    d["model"]["lora"].update(r=8, alpha=16, dropout=0.0)
    d["train"].update(max_steps=60, micro_batch_size=8, grad_accum=1, lr=3e-2, warmup_steps=0, eval_every=60, save_every=60, log_every=10)
    d["generate"] = {"max_new_tokens": 12, "do_sample": False}
    path = tmp_path / "lora-sft.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.slow  # LoRA: test_train.py; chat labels: test_prepare.py; the template unless --raw: test_chat_prompts.py; chat runs: test_scenarios.py
def test_lora_sft_end_to_end_on_a_local_chat_model(tmp_path):
    path = lora_sft_config(tmp_path)
    r = invoke_cli("config", "validate", str(path))
    assert r.returncode == 0, r.stderr
    r = invoke_cli("prepare", str(path), "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(RunDir(tmp_path / "run").stats_path.read_text())["splits"]
    kept = sum(s["examples"] for s in stats.values())
    assert kept == 48  # every ordinary conversation is kept
    assert "dropped 1 of" in r.stderr and "does not fit in data.block_size" in r.stderr

    r = invoke_cli("train", str(path), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    # Loss on the assistant turns only: from ~log(vocab) to a fraction of it.
    assert res["trainable_parameters"] < res["parameters"] and res["val_loss"] < 1.5 < res["init_val_loss"]

    # A plain prompt on a chat-trained run is sent through the chat template.
    r = invoke_cli("generate", str(path), "-p", "the river stones glow", "--json")
    assert r.returncode == 0, r.stderr
    assert "chat template" in r.stderr
    rec = json.loads(r.stdout)["results"][0]
    assert rec["prompt"].endswith("<|im_start|>assistant\n") and "the river stones glow" in rec["prompt"]
    assert rec["output"].startswith("the quick brown fox")  # the answer it was taught, not an empty string

    # --raw sends the text as it is.
    r = invoke_cli("generate", str(path), "-p", "the river stones glow", "--raw", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["prompt"] == "the river stones glow"
