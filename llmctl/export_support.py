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
    "gguf": "llama.cpp runs image-text models as two files (the language model plus an mmproj file holding the vision "
            "tower and projector, written by llama.cpp's own convert_hf_to_gguf.py --mmproj); llmctl's GGUF writer writes "
            "the llama graph alone, and a GGUF without its mmproj cannot see images",
    "onnx": "llmctl's ONNX export traces a text-only causal LM (input_ids -> logits); it has no pixel_values input",
    "hf-int8": "the int8 HF export quantizes a causal LM's Linear layers and is verified by text-only logits",
}


def check_image_text_formats(formats) -> None:
    """ConfigError naming why, for a format an image-text model cannot be exported to."""
    from llmctl.errors import ConfigError

    for fmt in formats:
        if fmt in IMAGE_TEXT_REFUSED:
            raise ConfigError(f"export.formats has {fmt}, which llmctl cannot write for an image-text model: {IMAGE_TEXT_REFUSED[fmt]}. "
                              "Drop it from export.formats (the hf export loads with AutoModelForImageTextToText and AutoProcessor)")
