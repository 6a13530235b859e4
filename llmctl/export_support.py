"""Which model architectures each export format takes: read by the pre-flight checks
(llmctl/checks.py, before any training) and by the exporters themselves, so that neither
reaches into the other. A format not listed takes every architecture.

Only the standard library: `config validate` and every stage import it.
"""

from __future__ import annotations

# model_type values (config.json) an export format writes; gguf: llama.cpp's llama graph
ARCHITECTURES: dict[str, tuple[str, ...]] = {"gguf": ("llama",)}


def architectures(fmt: str) -> tuple[str, ...] | None:
    """The model types `fmt` takes; None: any."""
    return ARCHITECTURES.get(fmt)


# Why an image-text model (data.format=image_text) cannot take a format: refused before any work.
IMAGE_TEXT_REFUSED: dict[str, str] = {
    "onnx": "llmctl's ONNX export traces a text-only causal LM (input_ids -> logits); it has no pixel_values input",
    "hf-int8": "the int8 HF export quantizes a causal LM's Linear layers and is verified by text-only logits",
}

# gguf for an image-text model: llama.cpp's two files, the language model and an mmproj holding the
# vision tower and projector (llmctl/exporters/mmproj.py, which checks the loaded model in full).
IMAGE_TEXT_GGUF_TYPES = ("llava",)  # config.json model_type
IMAGE_TEXT_GGUF_TOWERS = ("siglip",)  # model.vision.tower, from scratch
CLIP_TOWER_REFUSED = ("llama.cpp's LLaVA graph puts CLIP's class token after the patches while still reading rows 1..N as the "
                      "image, so every patch would get its neighbour's position and the class token would be read as a patch "
                      "(ggml-org/llama.cpp#25814)")


def check_image_text_formats(formats, tower: str | None = None, model_type: str | None = None) -> None:
    """ConfigError naming why, for a format an image-text model cannot be exported to. `tower`:
    model.vision.tower of a model built from scratch; `model_type`: a pretrained model's (None: unknown)."""
    from llmctl.errors import ConfigError

    fix = "Drop it from export.formats (the hf export loads with AutoModelForImageTextToText and AutoProcessor)"
    for fmt in formats:
        if fmt in IMAGE_TEXT_REFUSED:
            raise ConfigError(f"export.formats has {fmt}, which llmctl cannot write for an image-text model: {IMAGE_TEXT_REFUSED[fmt]}. {fix}")
    if "gguf" not in formats:
        return
    if tower is not None and tower not in IMAGE_TEXT_GGUF_TOWERS:
        why = CLIP_TOWER_REFUSED if tower == "clip" else f"llmctl writes llama.cpp's mmproj for {', '.join(IMAGE_TEXT_GGUF_TOWERS)} towers"
        raise ConfigError(f"export.formats has gguf, which llama.cpp cannot run as trained for model.vision.tower: {tower}: {why}. "
                          f"Set model.vision.tower: siglip (before training), or drop gguf from export.formats")
    if model_type is not None and model_type not in IMAGE_TEXT_GGUF_TYPES:
        raise ConfigError(f"export.formats has gguf, which llmctl writes for image-text models of type {', '.join(IMAGE_TEXT_GGUF_TYPES)} "
                          f"(llama.cpp's model + mmproj pair), not '{model_type}'. {fix}")
