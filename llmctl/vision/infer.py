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


# Processors whose video processor alone needs torchvision (which does not import beside torch
# 2.13): built without it, images only, under their own class name.
IMAGE_ONLY = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


def load_processor(path):
    """The processor saved in a model or tokenizer directory (AutoProcessor; a Qwen2-VL-style one
    without its video processor where torchvision is missing). Any other processor that needs
    torchvision is refused in one line (exit 2) before transformers fails on it."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    name = _processor_class(path)
    if not is_torchvision_available() and _takes_video(name):
        if name not in IMAGE_ONLY:
            raise _needs_torchvision(path, name, "its video processor")
        proc = _image_only(name, path)
    else:
        try:
            proc = AutoProcessor.from_pretrained(str(path))
        except ImportError as e:
            if "torchvision" not in str(e).lower():
                raise
            raise _needs_torchvision(path, name, (str(e).strip().splitlines() or [""])[0].split(". ")[0]) from None
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return proc


def _needs_torchvision(path, name: str | None, why: str):
    from llmctl.errors import ConfigError

    return ConfigError(f"{path}: its processor ({name or 'unknown class'}) needs torchvision ({why}), which is not installed "
                       "(and does not import beside this torch): point model.name_or_path and tokenizer.name_or_path at a model "
                       "whose processor works without it (LLaVA, Idefics3/SmolVLM-Instruct, Qwen2-VL, Qwen2.5-VL)")


def _takes_video(name: str | None) -> bool:
    """Whether transformers' processor class `name` takes a video processor (torchvision-only in transformers 5)."""
    import inspect

    import transformers

    cls = getattr(transformers, name, None) if name else None
    return cls is not None and "video_processor" in inspect.signature(cls.__init__).parameters


def _processor_class(path) -> str | None:
    """The processor class a directory names (processor_config.json, preprocessor_config.json,
    else its config.json's model type through transformers' processor table)."""
    import json
    from pathlib import Path

    for name in (*PROCESSOR_FILES, "tokenizer_config.json"):
        f = Path(path) / name
        if f.is_file():
            cls = json.loads(f.read_text(encoding="utf-8")).get("processor_class")
            if cls:
                return cls
    f = Path(path) / "config.json"
    if f.is_file():
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        return PROCESSOR_MAPPING_NAMES.get(json.loads(f.read_text(encoding="utf-8")).get("model_type"))
    return None


def _image_only(name: str, path):
    """`name` (a processor taking image_processor, tokenizer, video_processor) built without its
    video processor: the class keeps its name, so a saved directory still loads with AutoProcessor
    where torchvision is installed."""
    import transformers

    base = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__}).from_pretrained(str(path))


def _user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_text(proc, question: str) -> str:
    """The text the model sees before its answer, image placeholder included."""
    if getattr(proc, "chat_template", None):
        return proc.apply_chat_template(_user_turn(question), add_generation_prompt=True, tokenize=False)
    return f"{proc.image_token}{question}\n"


# Processor outputs that hold every image's patches in one flat tensor, not one row per prompt
# (Qwen2-VL: pixel_values [patches, dim] beside image_grid_thw [images, 3]): concatenated, not stacked.
FLAT_KEYS = ("pixel_values", "image_grid_thw")
# Processor outputs with one value per token (Qwen2-VL's and Idefics3's mm_token_type_ids): padded like input_ids.
TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")


def _flat(enc) -> tuple[str, ...]:
    return FLAT_KEYS if "image_grid_thw" in enc else ()


def encode_prompt(proc, question: str, image) -> dict:
    """Processor outputs for one prompt and image as lists/arrays (no batch axis): input_ids
    with the image tokens expanded, pixel_values and whatever else the model takes."""
    enc = proc(images=[image], text=[prompt_text(proc, question)], return_tensors="np")
    flat = _flat(enc)
    return {k: v if k in flat else v[0] for k, v in enc.items() if k != "attention_mask"}


def answer_text(proc, question: str, answer: str) -> str:
    """What the model writes after the prompt: with a chat template, the assistant turn as the
    template renders it (" answer" after SmolVLM's "Assistant:"), up to its end-of-turn token;
    without one, the answer itself. EOS follows either (encode_example)."""
    if not getattr(proc, "chat_template", None):
        return answer
    prompt = prompt_text(proc, question)
    full = proc.apply_chat_template(_user_turn(question) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    if not full.startswith(prompt) or answer not in full[len(prompt):]:
        return answer  # a template that renders the conversation otherwise: the bare answer
    text = full[len(prompt):].rstrip()
    eos = proc.tokenizer.eos_token
    return text[: -len(eos)] if eos and text.endswith(eos) else text


def encode_example(proc, question: str, answer: str, image) -> dict:
    """A training row: prompt (with image tokens) + answer + EOS, labels on the answer and EOS only."""
    from llmctl.data.formats import IGNORE

    tok = proc.tokenizer
    enc = encode_prompt(proc, question, image)
    prompt_ids = enc.pop("input_ids").tolist()
    answer_ids = tok(answer_text(proc, question, answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for k in TOKEN_KEYS:  # the answer's tokens are text
        if k in enc:
            enc[k] = list(enc[k]) + [0] * len(answer_ids)
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids,
            **{k: v.tolist() if hasattr(v, "tolist") else v for k, v in enc.items()}}


class Collator:
    """A batch of encoded rows: input_ids/labels right-padded (llmctl.data.formats.pad_right),
    per-token inputs padded with 0, flat patch tensors concatenated, the rest stacked (a row
    with fewer images than another, Idefics3's split crops, is padded with all-zero images,
    which the model skips)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        from llmctl.data.formats import pad_right

        ids, labels, mask = pad_right(rows, self.pad_id)
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        flat = _flat(rows[0])
        for k in rows[0]:
            if k in out:
                continue
            vals = [torch.as_tensor(r[k]) for r in rows]
            if k in TOKEN_KEYS:
                out[k] = torch.zeros_like(ids)
                for i, v in enumerate(vals):
                    out[k][i, : len(v)] = v
            elif k in flat:
                out[k] = torch.cat(vals)
            else:
                n = max(v.shape[0] for v in vals) if vals[0].dim() else 0
                if vals[0].dim() >= 3 and any(v.shape[0] != n for v in vals):  # [images, ...]: pad with empty images
                    vals = [torch.cat([v, v.new_zeros((n - v.shape[0], *v.shape[1:]))]) for v in vals]
                out[k] = torch.stack(vals)
        return out


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


# Image-text models whose forward computes its own positions from the image grid (M-RoPE): the
# serving engine's explicit 1-D position_ids would silently change their outputs; serve refuses them.
OWN_POSITIONS = ("qwen2_vl", "qwen2_5_vl")


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
