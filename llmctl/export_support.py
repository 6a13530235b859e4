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


# the mmproj llmctl writes (llmctl/exporters/mmproj.py): towers and activations clip.cpp runs as trained
MMPROJ_TOWERS = ("siglip_vision_model",)
# vision tower hidden_act -> the clip.cpp flag that selects it (none set: quick GELU)
MMPROJ_ACTS = {"gelu_pytorch_tanh": "use_gelu", "gelu": "use_gelu", "quick_gelu": None, "silu": "use_silu"}
MMPROJ_FIX = "drop gguf from export.formats (the hf export loads with AutoModelForImageTextToText and AutoProcessor)"


def _refuse_mmproj(why: str):
    from llmctl.errors import ConfigError

    raise ConfigError(f"export gguf: llama.cpp cannot run this image-text model as trained: {why}; {MMPROJ_FIX}")


def check_image_text_model_config(c) -> None:
    """What llama.cpp's LLaVA graph (clip.cpp) needs of an image-text model's config: ConfigError
    naming why (exit 2). Train checks it before training, the GGUF export again on the loaded model."""
    if c.model_type != "llava":
        _refuse_mmproj(f"it is '{c.model_type}'; llmctl writes llama.cpp's mmproj for LLaVA models (a ViT tower, an MLP projector, a llama) only")
    v = c.vision_config
    if v.model_type == "clip_vision_model":
        _refuse_mmproj(f"its vision tower is CLIP: {CLIP_TOWER_REFUSED}; a model built with model.vision.tower: siglip exports")
    if v.model_type not in MMPROJ_TOWERS:
        _refuse_mmproj(f"its vision tower is '{v.model_type}'; llmctl writes the mmproj for {', '.join(MMPROJ_TOWERS)} towers")
    if c.text_config.model_type != "llama":
        _refuse_mmproj(f"its language model is '{c.text_config.model_type}'; llmctl's GGUF writer writes llama")
    if not isinstance(c.vision_feature_layer, int):
        _refuse_mmproj(f"vision_feature_layer is {c.vision_feature_layer} (several layers concatenated); llmctl writes one feature layer")
    if c.vision_feature_select_strategy != "full":
        _refuse_mmproj(f"vision_feature_select_strategy is '{c.vision_feature_select_strategy}'; a SigLIP tower has no class token to drop")
    if v.hidden_act not in MMPROJ_ACTS:
        _refuse_mmproj(f"the vision tower's hidden_act is '{v.hidden_act}'; clip.cpp has {', '.join(MMPROJ_ACTS)}")
    if c.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh"):
        _refuse_mmproj(f"projector_hidden_act is '{c.projector_hidden_act}'; clip.cpp's mlp projector applies GELU")
    if not getattr(c, "multimodal_projector_bias", True):
        _refuse_mmproj("the projector has no biases; clip.cpp's mlp projector adds them")
    if v.intermediate_size == v.hidden_size:
        _refuse_mmproj("the tower's intermediate_size equals its hidden_size; clip.cpp then takes ffn_up/ffn_down for an old converter's swapped pair")
