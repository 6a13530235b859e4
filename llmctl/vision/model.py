"""Image-text models: a LLaVA-style one from scratch (a CLIP or SigLIP vision tower, a two-layer
projector and the llama llmctl builds for text), or a pretrained AutoModelForImageTextToText;
`model.freeze` leaves parts of either untrained.

Processors are the *ImageProcessorPil classes: torchvision does not import beside torch 2.13.
"""

from __future__ import annotations

from llmctl.errors import ConfigError, StageInputError

IMAGE_TOKEN = "<image>"


# model.vision.tower -> how LLaVA reads its features: CLIP's class token comes first and is
# dropped ('default', one extra position); SigLIP has none and every patch is kept ('full').
STRATEGY = {"clip": ("default", 1), "siglip": ("full", 0)}


def new_processor(cfg, tok):
    """A LlavaProcessor for a tokenizer prepare trained: the tower's preprocessing at model.vision.image_size
    (CLIP: resize the short side and centre-crop; SigLIP: resize to the square), `<image>` expanded
    to one token per patch."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor, SiglipImageProcessorPil

    v = cfg.model.vision
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    square = {"height": v.image_size, "width": v.image_size}
    if v.tower == "siglip":
        ip = SiglipImageProcessorPil(size=square)
    else:
        ip = CLIPImageProcessorPil(size={"shortest_edge": v.image_size}, crop_size=square)
    strategy, extra = STRATEGY[v.tower]
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=v.patch_size, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=extra, image_token=IMAGE_TOKEN)


def from_scratch(cfg, tok):
    """A randomly initialised LLaVA: CLIP or SigLIP vision tower (model.vision) + projector + llama (model.*)."""
    import torch
    from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlavaConfig, SiglipVisionConfig

    from llmctl.modeling import build_from_scratch

    v, m = cfg.model.vision, cfg.model
    text = build_from_scratch(cfg, tok).config  # the llama llmctl builds for text, same sizes and rules
    sizes = dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size, intermediate_size=4 * v.hidden_size,
                 num_hidden_layers=v.n_layers, num_attention_heads=v.n_heads)
    if v.tower == "siglip":  # no pooling head: LLaVA reads the patch states, a head would be weights no loss reaches
        vc = SiglipVisionConfig(**sizes, vision_use_head=False)
    else:
        vc = CLIPVisionConfig(**sizes, projection_dim=m.hidden_size)
    mc = LlavaConfig(vision_config=vc, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                     vision_feature_select_strategy=STRATEGY[v.tower][0], vision_feature_layer=-1,
                     projector_hidden_act="gelu_pytorch_tanh" if v.tower == "siglip" else "gelu",  # siglip: the GELU llama.cpp computes
                     tie_word_embeddings=m.tie_embeddings)
    torch.manual_seed(cfg.train.seed if cfg.train.seed is not None else cfg.run.seed)  # same seed, same initial weights
    return AutoModelForImageTextToText.from_config(mc, dtype=torch.float32)


def pretrained(cfg, tok):
    """A pretrained image-text model (Llava, Qwen2-VL, Idefics3/SmolVLM ...), vocabulary grown to the tokenizer's."""
    import torch
    from transformers import AutoModelForImageTextToText

    name = cfg.model.name_or_path
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code,
                                                            use_safetensors=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageInputError(f"model.name_or_path: cannot load '{name}' as an image-text model (AutoModelForImageTextToText): {first}") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    return model


# Where each part sits in transformers' image-text models (LLaVA: model.vision_tower,
# model.multi_modal_projector, model.language_model; Idefics3: model.vision_model, model.connector, model.text_model; Qwen2-VL: model.visual).
PARTS = {"vision": ("vision_tower", "vision_model", "visual"), "projector": ("multi_modal_projector", "connector", "merger"),
         "language": ("language_model", "text_model", "lm_head")}


def part_of(name: str) -> str | None:
    """Which part ('vision', 'projector', 'language') a parameter name belongs to."""
    pieces = name.split(".")
    for part in ("projector", "vision", "language"):  # the merger sits inside Qwen2-VL's visual: projector first
        if any(p in pieces for p in PARTS[part]):
            return part
    return None


def freeze(model, parts: list[str]) -> None:
    """requires_grad False for every parameter of the named parts; a part the model lacks is an error."""
    if not parts:
        return
    found = {p: 0 for p in parts}
    for name, param in model.named_parameters():
        part = part_of(name)
        if part in found:
            param.requires_grad_(False)
            found[part] += 1
    missing = [p for p, n in found.items() if not n]
    if missing:
        raise ConfigError(f"model.freeze: this model ({type(model).__name__}) has no {', '.join(missing)} parameters to freeze")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model.freeze {parts} freezes every parameter: leave at least one part to train")


def build(cfg, tok):
    """The model train starts from (Hooks.build_model): new or pretrained, frozen parts frozen.
    LoRA is applied after this by train's own machinery."""
    model = pretrained(cfg, tok) if cfg.model.name_or_path else from_scratch(cfg, tok)
    freeze(model, cfg.model.freeze)
    return model
