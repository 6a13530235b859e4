"""Prompts with images, as every stage writes them, and decoding them on the one inference
core (llmctl.generation's sampler, stop rule and finish reasons).

One prompt rule for prepare, train, eval, generate, serve and explain: a processor with a
chat template gets one user turn holding the image and the question; one without (the
LLaVA-style models llmctl builds) gets `<image>question\\n`. The answer follows, then EOS.
"""

from __future__ import annotations

import io

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")

# The prompt rule below for a processor without a chat template, as a chat template: what a
# runtime that formats turns itself (llama.cpp's GGUF export) needs to build the same text. A user
# turn is its content (the image placeholder, then the question) and a newline; an answer, then EOS.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def has_processor(path) -> bool:
    """Whether a model or tokenizer directory holds an image processor."""
    from pathlib import Path

    return any((Path(path) / f).is_file() for f in PROCESSOR_FILES)


def load_processor(path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(path))
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc


def prompt_text(proc, question: str) -> str:
    """The text the model sees before its answer, image placeholder included."""
    template = getattr(proc, "chat_template", None)
    if template:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return f"{proc.image_token}{question}\n"


def encode_prompt(proc, question: str, image) -> dict:
    """Processor outputs for one prompt and image as lists/arrays (no batch axis): input_ids
    with the image tokens expanded, pixel_values and whatever else the model takes."""
    enc = proc(images=[image], text=[prompt_text(proc, question)], return_tensors="np")
    return {k: v[0] for k, v in enc.items() if k != "attention_mask"}


def encode_example(proc, question: str, answer: str, image) -> dict:
    """A training row: prompt (with image tokens) + answer + EOS, labels on the answer and EOS only."""
    from llmctl.data.formats import IGNORE

    tok = proc.tokenizer
    enc = encode_prompt(proc, question, image)
    prompt_ids = enc.pop("input_ids").tolist()
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids,
            **{k: v.tolist() if hasattr(v, "tolist") else v for k, v in enc.items()}}


def open_image(raw: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(raw)).convert("RGB")


def batch_inputs(proc, questions: list[str], images: list, device) -> dict:
    """A left-padded batch of prompts with their images, as tensors on `device`."""
    tok = proc.tokenizer
    tok.padding_side = "left"  # decoder-only batching: real tokens end at the same position
    enc = proc(images=images, text=[prompt_text(proc, q) for q in questions], return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in enc.items()}


def generate(model, proc, questions: list[str], images: list, sp) -> list[dict]:
    """One dict per prompt (text, finish_reason, token counts) from the one sampler and stop rule
    (llmctl.generation), for prompts that each come with one image."""
    import time

    import torch

    from llmctl.generation import _finish, _hf_generate

    tok = proc.tokenizer
    if sp.seed is not None:
        torch.manual_seed(sp.seed)
    enc = batch_inputs(proc, questions, images, model.device)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    t0 = time.perf_counter()
    out, _ = _hf_generate(model, tok, enc, sp, sp.max_new_tokens, eos_ids)
    decode_s = time.perf_counter() - t0
    n_in = enc["input_ids"].shape[1]
    lens = enc["attention_mask"].sum(dim=1).tolist()
    results = []
    for row in range(out.shape[0]):
        text, finish, n_tokens, new = _finish(tok, out[row, n_in:].tolist(), eos_ids, sp.stop)
        results.append({"text": text, "finish_reason": finish, "prompt_tokens": int(lens[row // sp.num_return_sequences]),
                        "completion_tokens": n_tokens, "decode_seconds": decode_s, "token_ids": new})
    return results


def is_image_text(path) -> bool:
    """Whether a local model directory holds an image-text model (a processor and a vision config)."""
    import json
    from pathlib import Path

    cfg = Path(str(path)) / "config.json"
    if not (cfg.is_file() and has_processor(path)):
        return False
    try:
        return "vision_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_model(path, device=None, quantize: str | None = None):
    """(model, processor) of an image-text model directory, for inference."""
    import torch
    from transformers import AutoModelForImageTextToText

    from llmctl.errors import ConfigError
    from llmctl.modeling import pick_device

    if quantize not in (None, "none"):
        raise ConfigError(f"quantize={quantize}: llmctl quantizes text-only causal LMs; serve an image-text model with quantize: none")

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
    model.to(device or pick_device("auto")).eval()
    return model, load_processor(path)
